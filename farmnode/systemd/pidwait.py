"""Waiting for a process to end on the event loop, through a pidfd.

The event loop is told when the process exits, with no thread per process; it works for a
process that is no child of ours too (a shim a previous agent started). Standard library only.
"""

from __future__ import annotations

import asyncio
import os


async def wait_pid(pid: int) -> None:
    loop = asyncio.get_running_loop()
    pidfd = os.pidfd_open(pid)
    done: asyncio.Future[None] = loop.create_future()

    def exited() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_reader(pidfd, exited)
    try:
        await done
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
