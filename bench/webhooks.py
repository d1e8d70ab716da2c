"""What webhooks cost the agent's event loop, against references measured in the same run.

1. Queuing: one event for one webhook (`Webhooks.publish`: the body, one SQLite insert with
   synchronous=NORMAL) against the state store's durable commit of a task's progress
   (`Store.set_task_progress`, synchronous=FULL), which the agent already makes for every
   change a webhook is told of.
2. Loop stalls: the lateness of a 5 ms timer on the loop while events are published at
   200/s to a receiver that accepts and never answers plus one that refuses connections,
   against the same loop publishing nothing.

Run on the host: `.venv/bin/python bench/webhooks.py [DIR]`; DIR (default /var/tmp) should be
on the disk that holds /var/lib/farmnode: on a tmpfs an fsync costs nothing.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from farmnode.config import Config
from farmnode.config.webhooks import Webhook
from farmnode.tasks.model import Assignment, Job, JobTypeRef, Task
from farmnode.tasks.store import Store
from farmnode.webhooks import events
from farmnode.webhooks.sender import Webhooks

N = 2000
TICK = 0.005
SECONDS = 5.0


def _median_us(samples: list[float]) -> str:
    return f"{statistics.median(samples) * 1e6:.0f} µs (p99 " \
           f"{sorted(samples)[int(len(samples) * 0.99)] * 1e6:.0f} µs)"


def queuing(tmp: Path) -> tuple[list[float], list[float]]:
    store = Store(tmp / "farmnode.db")
    a = Assignment(str(uuid.uuid4()), Job(id=1, by=1), JobTypeRef("fakerender", 1),
                   (Task(1, 1.0),))
    store.add_assignment(a, "farmnode-task-1.scope")
    hooks = Webhooks(Config(webhooks=(Webhook("http://127.0.0.1:9/"),)), tmp, str, str)
    publish, commit = [], []
    for k in range(N):  # interleaved, so a slow moment of the disk hits both
        t0 = time.perf_counter()
        hooks.publish(events.task_event(a.id, 1000 + k, "running", "", k / N))
        t1 = time.perf_counter()
        store.set_task_progress(a.id, 1, (k + 1) / N)
        t2 = time.perf_counter()
        publish.append(t1 - t0)
        commit.append(t2 - t1)
    hooks.queue.close()
    store.close()
    return publish, commit


async def _lateness(hooks: Webhooks | None) -> list[float]:
    late: list[float] = []
    end = time.monotonic() + SECONDS
    k = 0
    while time.monotonic() < end:
        t0 = time.monotonic()
        await asyncio.sleep(TICK)
        late.append(time.monotonic() - t0 - TICK)
        if hooks is not None:
            hooks.publish(events.task_event("a", k, "running", "", 0.5))
            k += 1
    return late


def stalls(tmp: Path) -> tuple[list[float], list[float]]:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1024)
    gone = socket.socket()
    gone.bind(("127.0.0.1", 0))
    refused = gone.getsockname()[1]
    gone.close()
    config = Config(webhooks=(Webhook(f"http://127.0.0.1:{silent.getsockname()[1]}/"),
                              Webhook(f"http://127.0.0.1:{refused}/")),
                    webhook_timeout=1.0, webhook_retry_delay=0.01, webhook_retry_max=0.05)

    async def run() -> tuple[list[float], list[float]]:
        baseline = await _lateness(None)
        hooks = Webhooks(config, tmp / "stalls", str, str)
        hooks.start()
        loaded = await _lateness(hooks)
        await hooks.stop()
        return baseline, loaded

    (tmp / "stalls").mkdir()
    try:
        return asyncio.run(run())
    finally:
        silent.close()


def main() -> None:
    logging.disable(logging.WARNING)  # every failed try is logged: thousands here
    where = sys.argv[1] if len(sys.argv) > 1 else "/var/tmp"
    with tempfile.TemporaryDirectory(dir=where) as d:
        tmp = Path(d)
        publish, commit = queuing(tmp)
        baseline, loaded = stalls(tmp)
    print(f"queue one event (publish, 1 webhook): {_median_us(publish)}")
    print(f"reference: store progress commit:     {_median_us(commit)}")
    print(f"ratio (median): {statistics.median(publish) / statistics.median(commit):.2f}x")
    print(f"timer lateness, no webhooks:          {_median_us(baseline)}, "
          f"max {max(baseline) * 1e3:.1f} ms, {len(baseline)} ticks")
    print(f"timer lateness, silent + refused:     {_median_us(loaded)}, "
          f"max {max(loaded) * 1e3:.1f} ms, {len(loaded)} ticks")


if __name__ == "__main__":
    main()
