"""Posting queued events: one sender task per webhook on the agent's event loop.

Why in the agent and not a unit of its own that listens to the D-Bus signals: a signal is
gone for a listener that is not there to receive it (restarting, upgraded, or dropped by the
bus for reading too slowly), so a separate sender would lose the events of its own
restarts unless the agent queued them durably anyway; once the agent queues them, posting
them is a few coroutines with nothing to share. The agent pays one SQLite insert per event
and webhook (no fsync) and, only while a post is in flight, one socket per webhook.

Why it never blocks the agent: a post is asyncio I/O under one deadline for the whole
exchange (name lookup, connect, TLS, request, status line), so a receiver that accepts and
never answers, or answers a byte a minute, costs its own webhook a timeout and a retry and
nothing else. Each webhook has its own queue and sender: one receiver that is away does not
hold up another. Events reach a receiver in the order they happened, one at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import socket
import sqlite3
import ssl
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from farmnode.config import Config
from farmnode.config.webhooks import Webhook
from farmnode.master.protocol import backoff
from farmnode.webhooks import events
from farmnode.webhooks.queue import Delivery, DeliveryQueue, TaskMark

if TYPE_CHECKING:
    from farmnode.agent.core import Agent
    from farmnode.tasks.store import TaskRecord

log = logging.getLogger(__name__)

QUEUE_FILE = "webhooks.db"
MAX_STATUS_LINE = 8192  # a longer first line is not HTTP: the exchange fails
# Answers a retry can change: the receiver is overloaded, restarting or timed out. Every
# other non-2xx answer refuses this body for good (sending the same bytes again cannot
# change it): the event is dropped, with a warning, so it does not hold up the ones after.
RETRY_STATUSES = frozenset({408, 425, 429})
STORAGE_RETRY = 5.0  # s: how long a sender waits when the queue's file refuses a read
_STATUS = re.compile(rb"^HTTP/1\.[01] ([1-5][0-9][0-9])(?: |\r?\n|$)")


class DeliveryError(Exception):
    """No HTTP answer: the name does not resolve, refused, reset, TLS, timed out."""


async def post(url: str, payload: bytes, headers: Mapping[str, str], timeout: float) -> int:
    """POST the payload; returns the HTTP status. The whole exchange has `timeout`."""
    u = urllib.parse.urlsplit(url)
    host = u.hostname or ""
    tls = u.scheme == "https"
    port = u.port or (443 if tls else 80)
    authority = f"[{host}]" if ":" in host else host
    if u.port is not None:
        authority += f":{u.port}"
    target = (u.path or "/") + (f"?{u.query}" if u.query else "")
    lines = [f"POST {target} HTTP/1.1", f"Host: {authority}",
             f"Content-Length: {len(payload)}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                host, port, ssl=ssl.create_default_context() if tls else None,
                server_hostname=host if tls else None, limit=MAX_STATUS_LINE)
            writer.write(request)
            await writer.drain()
            line = await reader.readline()
    except TimeoutError:
        raise DeliveryError(f"no answer within {timeout:g} s") from None
    except socket.gaierror as exc:
        raise DeliveryError(f"cannot resolve {host}: {exc.strerror}") from None
    except (OSError, ValueError) as exc:  # ValueError: a first line longer than the limit
        raise DeliveryError(f"{type(exc).__name__}: {exc}".rstrip(": ")) from None
    finally:
        if writer is not None:
            writer.close()
    m = _STATUS.match(line)
    if m is None:
        raise DeliveryError("closed without an HTTP answer" if not line
                            else f"not an HTTP answer: {line[:60]!r}")
    return int(m.group(1))


@dataclass(frozen=True)
class Schedule:
    """When a sender tries again: jittered exponential backoff from `delay` to `cap`."""

    delay: float
    cap: float

    def after(self, failures: int, rand: random.Random | None = None) -> float:
        return backoff(failures, self.delay, self.cap, rand)


class Sender:
    """Posts one webhook's queue, oldest first, until the queue is empty; then waits."""

    def __init__(self, hook: Webhook, queue: DeliveryQueue, secret: bytes | None,
                 timeout: float, schedule: Schedule) -> None:
        self.hook = hook
        self.queue = queue
        self.secret = secret
        self.timeout = timeout
        self.schedule = schedule
        self.failures = 0  # failed attempts in a row
        self.dropped = 0  # events the full queue dropped since the last delivery
        self._wake = asyncio.Event()
        self.idle = asyncio.Event()  # set while its queue is empty

    def wake(self) -> None:
        self.idle.clear()
        self._wake.set()

    def note_dropped(self, count: int) -> None:
        if count and not self.dropped:
            log.warning("webhook %s: its queue is full (%d events): the oldest are dropped "
                        "to make room until it answers again", self.hook.name,
                        self.queue.limit)
        self.dropped += count

    async def run(self) -> None:
        while True:
            self._wake.clear()
            try:
                delivery = self.queue.head(self.hook.url)
            except sqlite3.Error as exc:
                log.error("webhook %s: cannot read its queue (%s); trying again in %g s",
                          self.hook.name, exc, STORAGE_RETRY)
                await asyncio.sleep(STORAGE_RETRY)
                continue
            if delivery is None:
                self.idle.set()
                await self._wake.wait()
                continue
            delay = await self._attempt(delivery)
            if delay:
                await asyncio.sleep(delay)

    async def _attempt(self, d: Delivery) -> float:
        """One post of the delivery; returns how long to wait before the next."""
        payload_headers = events.headers(d.event, d.event_id, d.body, self.secret)
        try:
            status = await post(self.hook.url, d.body, payload_headers, self.timeout)
        except DeliveryError as exc:
            return self._failed(d, str(exc))
        except Exception as exc:  # a bug here must not end this webhook's deliveries
            log.exception("webhook %s: posting failed", self.hook.name)
            return self._failed(d, f"{type(exc).__name__}: {exc}")
        if 200 <= status < 300:
            self._settle(d)
            if self.failures or self.dropped:
                log.info("webhook %s answers again after %d failed attempt(s)%s",
                         self.hook.name, self.failures,
                         f"; {self.dropped} event(s) were dropped while its queue was full"
                         if self.dropped else "")
            self.failures = self.dropped = 0
            return 0.0
        if status >= 500 or status in RETRY_STATUSES:
            return self._failed(d, f"HTTP {status}")
        log.warning("webhook %s refused event %s (%s, id %s) with HTTP %d: dropped, not "
                    "retried", self.hook.name, d.event, d.seq, d.event_id, status)
        self._settle(d)
        self.failures = 0
        return 0.0

    def _settle(self, d: Delivery) -> None:
        with contextlib.suppress(sqlite3.Error):  # still queued: posted again (at least once)
            self.queue.done(d.seq)

    def _failed(self, d: Delivery, why: str) -> float:
        self.failures += 1
        delay = self.schedule.after(self.failures)
        with contextlib.suppress(sqlite3.Error):
            self.queue.failed(d.seq)
        try:
            queued = self.queue.pending(self.hook.url)
        except sqlite3.Error:
            queued = -1
        log.warning("webhook %s: %s (event %s, attempt %d); retrying in %.1f s, %d event(s) "
                    "queued", self.hook.name, why, d.event, d.attempts + 1, delay, queued)
        return delay


class Webhooks:
    """Every configured webhook: queues the agent's events for those that want them."""

    def __init__(self, config: Config, state_dir: Path, agent_id: Callable[[], str],
                 hostname: Callable[[], str]) -> None:
        self.queue = DeliveryQueue(state_dir / QUEUE_FILE, config.webhook_queue_max)
        self._agent_id = agent_id
        self._hostname = hostname
        schedule = Schedule(config.webhook_retry_delay, config.webhook_retry_max)
        self.senders = [Sender(h, self.queue, _secret(h), config.webhook_timeout, schedule)
                        for h in config.webhooks]
        for url, count in self.queue.forget_others(h.url for h in config.webhooks).items():
            log.warning("webhook %s is no longer configured: dropped its %d queued event(s)",
                        Webhook(url).name, count)
        self._tasks: list[asyncio.Task[None]] = []
        self._store_error: str | None = None

    def start(self) -> None:
        for s in self.senders:
            self._tasks.append(asyncio.create_task(s.run(), name=f"webhook {s.hook.name}"))

    async def stop(self, drain: float = 0.0) -> None:
        """Stop posting, after up to `drain` seconds for the queues to empty; what is still
        queued stays queued for the next agent."""
        if drain > 0 and self._tasks:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*(s.idle.wait() for s in self.senders)), drain)
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()
        self.queue.close()

    def attach(self, agent: Agent) -> None:
        """Take the agent's events from now on, after queuing the changes its store holds
        that no event was queued for. Before the agent's recovery, which reports what ended
        while no agent ran."""
        try:
            self.catch_up(agent.store.tasks(active_only=True))
        except (sqlite3.Error, OSError) as exc:
            # Not a reason to keep the node from rendering: a later start compares again.
            log.error("webhooks: cannot compare the queue with the task store (%s): task "
                      "changes an earlier agent did not queue are not queued now", exc)
        events.attach(agent, self.publish)

    def catch_up(self, tasks: Iterable[TaskRecord]) -> int:
        """Queue an event for each task whose stored state or progress is not the last one
        queued: the change an agent committed to the store and then ended (`kill -9`, a
        crash) before queuing its event. `tasks`: those of the active assignments, the only
        ones that change (an assignment ends after its tasks' events are queued). Returns
        how many events were queued."""
        tasks = list(tasks)
        marks = self.queue.marks()
        current = [TaskMark(t.assignment_id, t.id, str(t.state), t.progress) for t in tasks]
        keep = [(m.assignment_id, m.task_id) for m in current]
        if marks is None:
            # This file never knew the tasks: what they did before is not news to send now.
            self.queue.settle_marks(current, keep)
            return 0
        unwanted: list[TaskMark] = []
        queued = 0
        for t, mark in zip(tasks, current, strict=True):
            if marks.get((mark.assignment_id, mark.task_id)) == mark:
                continue
            event = events.task_event(t.assignment_id, t.id, mark.state, t.reason or "",
                                      t.progress)
            if self._queue(event):
                queued += 1
            else:
                unwanted.append(mark)
        self.queue.settle_marks(unwanted, keep)
        if queued:
            log.info("webhooks: queued %d task change(s) the store holds and no event "
                     "was queued for (the previous agent ended in between)", queued)
        return queued

    def publish(self, event: events.Event) -> None:
        self._queue(event)

    def _queue(self, event: events.Event) -> bool:
        """Queue the event for the webhooks that want it; False if none does."""
        wanting = [s for s in self.senders if s.hook.wants(event.name)]
        if not wanting:
            return False
        event_id = events.new_id()
        payload = events.body(event, event_id, self._agent_id(), self._hostname())
        try:
            dropped = self.queue.put_all([s.hook.url for s in wanting], event.name, event_id,
                                         payload, event.supersedes, event.mark)
        except (sqlite3.Error, OSError) as exc:
            # The state directory is full or failing: the event is lost for the webhooks
            # (unless its assignment is still active at the next agent start, which queues
            # each task's latest change), said once per spell; tasks are not touched.
            if self._store_error is None:
                log.error("webhooks: cannot queue events (%s): they are lost until the "
                          "state directory takes writes again", exc)
            self._store_error = str(exc)
            return True
        if self._store_error is not None:
            log.warning("webhooks: events are queued again")
            self._store_error = None
        for s, count in zip(wanting, dropped, strict=True):
            s.note_dropped(count)
            s.wake()
        return True


def _secret(hook: Webhook) -> bytes | None:
    # The loader checked the file (readable, private, not empty) when the config was loaded.
    return Path(hook.secret_file).read_bytes().strip() if hook.secret_file else None
