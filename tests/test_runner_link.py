"""The agent's side of the shim link (AssignmentRun._serve), with the test playing the shim
over a real socketpair: the orderings a restart can leave in the link, pinned down one by
one (the system tier finds them by killing a real agent at random moments). The scope
manager is a stand-in that only records the stop: no scope exists here."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import uuid
from collections.abc import Callable
from pathlib import Path

from farmnode.agent.runner import AssignmentRun
from farmnode.config import Config
from farmnode.systemd import link
from farmnode.tasks.model import Assignment, Job, JobTypeRef, Task, TaskState


class Scopes:
    def __init__(self) -> None:
        self.stopped: list[str] = []

    async def stop_scope(self, unit: str) -> bool:
        self.stopped.append(unit)
        return True


def make_run(tmp_path: Path) -> tuple[AssignmentRun, list[tuple[int, TaskState]], Scopes]:
    a = Assignment(str(uuid.uuid4()), Job(id=1, by=1), JobTypeRef("command", 1),
                   (Task(42, 1.0),))
    config = dataclasses.replace(Config(), agent_runtime_dir=str(tmp_path))
    states: list[tuple[int, TaskState]] = []
    scopes = Scopes()
    run = AssignmentRun(a, config, scopes,  # type: ignore[arg-type]
                        lambda _a, changes: states.extend((c.task_id, c.state)
                                                          for c in changes),
                        lambda *_: None, lambda *_: None)
    run.started = True
    return run, states, scopes


Packet = tuple[bytes, int, int, bytes]


async def serve_against(run: AssignmentRun, queued: list[bytes],
                        answer: Callable[[bytes], list[bytes]]) -> list[Packet]:
    """Run the agent's side (an adopted run) against a scripted shim: `queued` is what a
    dead agent left unread in the link; `answer(nonce)` is what the shim sends once both
    RESUMEs arrived. Returns every packet the agent sent, up to its EXIT_ACK."""
    loop = asyncio.get_running_loop()
    agent_end, shim = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    shim.setblocking(False)
    for packet in queued:
        shim.send(packet)

    async def play_shim() -> list[Packet]:
        seen: list[Packet] = []

        async def until(kind: bytes, count: int) -> None:
            while sum(1 for p in seen if p[0] == kind) < count:
                seen.append(link.unpack(await loop.sock_recv(shim, 1 << 18)))

        await until(link.RESUME, 2)
        (nonce,) = {p[2] for p in seen if p[0] == link.RESUME}  # one per agent
        for packet in answer(int(nonce).to_bytes(8, "big")):
            shim.send(packet)
        await until(link.EXIT_ACK, 1)
        shim.close()
        return seen

    shim_task = asyncio.create_task(play_shim())
    await run._serve(agent_end, resume=True)
    return await shim_task


def test_stale_exit_before_resumed_is_not_taken(tmp_path: Path) -> None:
    """The shim sent its last stderr line and EXIT to an agent that died unread; the new
    agent must not conclude on that EXIT (it drops the stale DATA before RESUMED) but on the
    one the shim sends after resending."""
    run, states, scopes = make_run(tmp_path)
    record = json.dumps({"exit_code": 0, "ends": [0, 4]}).encode()
    stale = [link.pack(link.DATA, link.STDERR, 0, b"bye\n"), link.pack(link.EXIT, payload=record)]
    seen = asyncio.run(serve_against(run, stale, lambda nonce: [
        link.pack(link.RESUMED, link.STDOUT, 0, nonce),
        link.pack(link.RESUMED, link.STDERR, 0, nonce),
        link.pack(link.DATA, link.STDERR, 0, b"bye\n"),
        link.pack(link.EXIT, payload=record),
    ]))
    kinds = [p[0] for p in seen]
    writes = [(p[1], p[2], p[3]) for p in seen if p[0] == link.WRITE]
    assert writes == [(link.STDERR, 4, b"<4>bye\n")]
    assert kinds.index(link.WRITE) < kinds.index(link.EXIT_ACK)
    assert states == [(42, TaskState.DONE)]
    assert scopes.stopped == ["farmnode-task-42.scope"]


def test_resumed_offset_is_where_writes_continue(tmp_path: Path) -> None:
    """A new agent learns from the RESUMED with its own nonce how far the shim journaled
    (not from one meant for an agent that died while resuming), and its WRITEs cover the
    resent bytes from there on."""
    run, states, _ = make_run(tmp_path)
    seen = asyncio.run(serve_against(run, [], lambda nonce: [
        # the answer to an agent that died while resuming, and what followed it, first
        link.pack(link.RESUMED, link.STDOUT, 4, b"\0" * 8),
        link.pack(link.DATA, link.STDOUT, 4, b"two\nthree\nfo"),
        link.pack(link.RESUMED, link.STDOUT, 8, nonce),  # "one\ntwo\n" is journaled
        link.pack(link.RESUMED, link.STDERR, 0, nonce),
        link.pack(link.DATA, link.STDOUT, 8, b"three\nfo"),
        link.pack(link.EXIT, payload=json.dumps({"exit_code": 0}).encode()),
    ]))
    writes = [(p[1], p[2], p[3]) for p in seen if p[0] == link.WRITE]
    # offsets count from the resume point; the unterminated tail is journaled at the exit
    assert writes == [(link.STDOUT, 14, b"<6>three\n"), (link.STDOUT, 16, b"<6>fo\n")]
    assert states == [(42, TaskState.DONE)]
