"""What the task objects cost: a 5,000-task assignment on a private dbus-daemon.

    python3 bench/dbus_objects.py     # about half a minute; prints the figures

Each figure is a ratio against a reference measured in the same run: announcing the
assignment, and one task's state change (median of 20) in it, with the D-Bus service
exported against the core alone (the same store writes and listeners, no objects); and
GetManagedObjects of 5,000 objects (busctl, a fresh process) against 10. Memory: the RSS
the announcement adds with the objects against the core alone.
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent)]

import psutil  # noqa: E402

from farmnode.agent.core import Agent  # noqa: E402
from farmnode.config import Config  # noqa: E402
from farmnode.systemd.scope import ScopeManager  # noqa: E402
from farmnode.tasks.model import StateChange, TaskState  # noqa: E402
from farmnode.tasks.store import Store  # noqa: E402
from tests.private_bus import busctl, private_bus, serve, stored  # noqa: E402

N = 5000
SMALL = 10
REPEATS = 20


def rss() -> int:
    gc.collect()
    return int(psutil.Process().memory_info().rss)


async def announce_with_service(state: Path, ids: list[int]) -> tuple[float, int]:
    """Seconds to announce, and the RSS it added."""
    async with serve(state) as agent:
        stored(agent, [0])  # what every first assignment pays once
        before = rss()
        t0 = time.perf_counter()
        stored(agent, ids)
        return time.perf_counter() - t0, rss() - before


def announce_core_alone(state: Path, ids: list[int]) -> tuple[float, int]:
    agent = Agent(Config(), Store(state), ScopeManager.__new__(ScopeManager))
    stored(agent, [0])
    before = rss()
    t0 = time.perf_counter()
    stored(agent, ids)
    return time.perf_counter() - t0, rss() - before


def changes(agent: Agent, assignment_id: str) -> float:
    """Median of one task's state change: store, listeners, and the object if served."""
    times = []
    for k in range(1, REPEATS + 1):
        t0 = time.perf_counter()
        agent._report_states(assignment_id,
                             [StateChange(k, TaskState.RUNNING, None, None, None)])
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def change_core_alone(state: Path, n: int) -> float:
    agent = Agent(Config(), Store(state), ScopeManager.__new__(ScopeManager))
    return changes(agent, stored(agent, list(range(1, n + 1))).id)


async def change_with_service(state: Path, n: int, address: str) -> tuple[float, float]:
    """One change's median, and GetManagedObjects through busctl."""
    async with serve(state) as agent:
        change = changes(agent, stored(agent, list(range(1, n + 1))).id)
        t0 = time.perf_counter()
        await busctl(address, "call", "org.farmnode.Agent1", "/org/farmnode/Agent1",
                     "org.freedesktop.DBus.ObjectManager", "GetManagedObjects")
        return change, time.perf_counter() - t0


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        with private_bus(d) as address:
            ids = list(range(1, N + 1))
            # the objects first: the RSS the core alone adds is then not hidden in what the
            # allocator kept from the objects' run
            served, served_rss = asyncio.run(announce_with_service(d / "served.db", ids))
            core, core_rss = announce_core_alone(d / "core.db", ids)
            alone = change_core_alone(d / "alone.db", N)
            _small, small_list = asyncio.run(change_with_service(d / "small.db", SMALL,
                                                                 address))
            big, big_list = asyncio.run(change_with_service(d / "big.db", N, address))
    print(f"announce {N} tasks: core alone {core * 1000:.0f} ms, with objects "
          f"{served * 1000:.0f} ms (x{served / core:.2f}); RSS added: core alone "
          f"{core_rss / 2**20:.1f} MiB, with objects {served_rss / 2**20:.1f} MiB "
          f"({(served_rss - core_rss) / len(ids) / 1024:.1f} KiB an object)")
    print(f"one task's change in it: core alone {alone * 1e6:.0f} us, with {N} objects "
          f"{big * 1e6:.0f} us (x{big / alone:.2f})")
    print(f"GetManagedObjects via busctl: {SMALL} objects {small_list * 1000:.0f} ms, {N} "
          f"{big_list * 1000:.0f} ms (x{big_list / small_list:.2f})")


if __name__ == "__main__":
    main()
