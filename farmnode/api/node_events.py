"""The `node` event of GET /api/v1/events: the node as the status page shows it.

The agent signals its state (StateChanged) and each task's state and progress (TaskChanged),
but nothing when its free RAM moves or when an assignment that ended gives its GPUs back. So a
stream also sends a snapshot of the node's status: at its start, soon after a signal that can
change it (the agent's state, a task's state), and at least every RESAMPLE seconds, each time
only if the snapshot differs from the last one sent. Free RAM is therefore at most RESAMPLE
seconds old on the page.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# The status keys the page shows; the others (uptime, the agent's own RSS) change on every
# call and would make each sample an event.
NODE_KEYS = ("state", "agent_hostname", "version", "free_ram", "ram", "cpus", "consumed_ram",
             "running_tasks", "assignments", "jobs", "gpus", "farm_name", "storage_error")
# Of the master link, what an admin acts on; its contact times change on every poll.
LINK_KEYS = ("master", "announced", "queued_reports", "last_error")
RESAMPLE = 5.0
# A burst of task changes (an assignment of many frames starting or ending) is one sample.
SETTLE = 0.5
FINISHED = frozenset({"done", "failed", "cancelled"})


def node_view(status: dict[str, Any]) -> dict[str, Any]:
    link = status.get("master_link")
    return {**{k: status.get(k) for k in NODE_KEYS},
            "master_link": ({k: link.get(k) for k in LINK_KEYS} if isinstance(link, dict)
                            else None)}


@dataclass
class NodeWatch:
    """When a stream should sample the node again, and whether a sample is news."""

    next_sample: float
    last: dict[str, Any] | None = None
    # Last state of each unfinished task seen on this stream: only a change of state (not of
    # progress) can change the node's figures.
    _tasks: dict[int, str] = field(default_factory=dict)

    def saw(self, member: str, args: tuple[Any, ...], now: float) -> None:
        if member == "StateChanged":
            self._soon(now)
        elif member == "TaskChanged":
            task_id, state = int(args[1]), str(args[2])
            if self._tasks.get(task_id) != state:
                self._soon(now)
            if state in FINISHED:
                self._tasks.pop(task_id, None)
            else:
                self._tasks[task_id] = state

    def _soon(self, now: float) -> None:
        self.next_sample = min(self.next_sample, now + SETTLE)

    def due(self, now: float) -> bool:
        return now >= self.next_sample

    def sampled(self, status: dict[str, Any] | None, now: float) -> dict[str, Any] | None:
        """The view to send for this sample (None: nothing new, or no answer)."""
        self.next_sample = now + RESAMPLE
        if status is None:
            return None
        view = node_view(status)
        if view == self.last:
            return None
        self.last = view
        return view
