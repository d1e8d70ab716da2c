"""What a webhook receives: the event, its JSON body and the body's signature.

This is the one place that knows the shape of the agent's events (a task's change, the
agent's state); everything after it handles opaque, already encoded bodies. The body's
`data` is the same object the SSE stream (`/api/v1/events`) sends for the event.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from farmnode import __version__
from farmnode.webhooks.queue import TaskMark

if TYPE_CHECKING:
    from farmnode.agent.core import Agent

SIGNATURE_HEADER = "X-Farmnode-Signature-256"
EVENT_HEADER = "X-Farmnode-Event"
ID_HEADER = "X-Farmnode-Event-Id"
USER_AGENT = f"farmnode/{__version__} (webhook)"


@dataclass(frozen=True)
class Event:
    name: str  # task.<state> or agent.<state>: what webhook patterns match
    data: dict[str, Any]
    # While queued, an event is superseded by a later one with the same key: a running
    # task's progress counts only in its latest value.
    supersedes: str | None = None
    mark: TaskMark | None = None  # a task's change: marked in the queue with its event


def task_event(assignment_id: str, task_id: int, state: str, reason: str,
               progress: float) -> Event:
    return Event(f"task.{state}",
                 {"assignment_id": assignment_id, "task_id": task_id, "state": state,
                  "reason": reason or None, "progress": progress},
                 supersedes=f"task:{assignment_id}:{task_id}:{state}",
                 mark=TaskMark(assignment_id, task_id, state, progress))


def agent_event(state: str) -> Event:
    return Event(f"agent.{state}", {"state": state})


def new_id() -> str:
    return str(uuid.uuid4())


def body(event: Event, event_id: str, agent_id: str, hostname: str,
         now: float | None = None) -> bytes:
    """The bytes posted for an event, fixed when it is queued: a retry sends the same bytes,
    and `id` lets a receiver recognise a delivery it already has."""
    return json.dumps({
        "id": event_id,
        "event": event.name,
        "time": time.time() if now is None else now,
        "agent_id": agent_id,
        "hostname": hostname,
        "data": event.data,
    }, separators=(",", ":")).encode()


def signature(secret: bytes, payload: bytes) -> str:
    """The signature header's value: `sha256=` and the hex HMAC-SHA256 of the body."""
    return "sha256=" + hmac.new(secret, payload, hashlib.sha256).hexdigest()


def headers(name: str, event_id: str, payload: bytes, secret: bytes | None) -> dict[str, str]:
    """The headers of a post (besides Host, Content-Length, Connection)."""
    out = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        EVENT_HEADER: name,
        ID_HEADER: event_id,
    }
    if secret is not None:
        out[SIGNATURE_HEADER] = signature(secret, payload)
    return out


def attach(agent: Agent, publish: Callable[[Event], None]) -> None:
    """Feed the core's changes (the same ones the D-Bus signals carry) to `publish`."""
    agent.task_listeners.append(lambda c: publish(task_event(
        c.assignment_id, c.task_id, str(c.state), c.reason, c.progress)))
    agent.state_listeners.append(lambda state: publish(agent_event(str(state))))
