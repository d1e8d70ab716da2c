"""Tree-shaped progress for `farmnode tasks` and `farmnode submit --wait`: job -> its tasks.

Owns the drawing only (records in, lines out). In a terminal the tree is drawn with bars
and redrawn in place as TaskChanged signals arrive; in a pipe each change is one plain line,
so a log file reads top to bottom.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

BAR = 20
FINISHED = ("done", "failed", "cancelled")


@dataclass(frozen=True)
class JobNode:
    """One job of the tree: a job-file job (named) or a master's job (by id)."""

    key: int
    label: str
    state: str
    reason: str | None
    tasks: tuple[Mapping[str, Any], ...]

    @property
    def progress(self) -> float:
        if not self.tasks:
            return 1.0 if self.state == "done" else 0.0
        return sum(float(t["progress"]) for t in self.tasks) / len(self.tasks)

    @property
    def done(self) -> int:
        return sum(1 for t in self.tasks if t["state"] == "done")


def bar(fraction: float, width: int = BAR) -> str:
    filled = round(max(0.0, min(1.0, fraction)) * width)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _frame(t: Mapping[str, Any]) -> str:
    f = float(t["frame"])
    return str(int(f)) if f.is_integer() else f"{f:g}"


def build(tasks: Iterable[Mapping[str, Any]], jobs: Sequence[Mapping[str, Any]] = ()
          ) -> list[JobNode]:
    """Group task records under their jobs: job-file jobs (from ListJobs) first, in their
    order, each with the tasks of its batches; then every other job by id."""
    by_task: dict[int, Mapping[str, Any]] = {}
    for t in tasks:
        by_task.setdefault(int(t["id"]), t)  # the listing is newest first: keep the latest
    nodes: list[JobNode] = []
    claimed: set[int] = set()
    for j in jobs:
        own = tuple(by_task[i] for i in j.get("tasks", ()) if i in by_task)
        claimed.update(int(t["id"]) for t in own)
        label = str(j["name"]) + (f" ({j['title']})" if j.get("title") else "")
        if j.get("master_job_id") is not None:
            label += f" -> master job {j['master_job_id']}"
        nodes.append(JobNode(int(j["id"]), label, str(j["state"]), j.get("reason"), own))
    rest: dict[int, list[Mapping[str, Any]]] = {}
    for t in by_task.values():
        if int(t["id"]) not in claimed:
            rest.setdefault(int(t["job_id"]), []).append(t)
    for job_id, own_list in sorted(rest.items()):
        own = tuple(sorted(own_list, key=lambda t: (float(t["frame"]), int(t["id"]))))
        states = {t["state"] for t in own}
        state = ("running" if "running" in states else "queued" if "queued" in states
                 else "failed" if states & {"failed", "cancelled"} else "done")
        nodes.append(JobNode(job_id, f"job {job_id}", state, None, own))
    return nodes


def draw(nodes: Sequence[JobNode], width: int = BAR) -> list[str]:
    """The tree as lines with bars (for a terminal)."""
    lines: list[str] = []
    for n in nodes:
        count = f"{n.done}/{len(n.tasks)}" if n.tasks else "-"
        why = f"  {n.reason}" if n.reason else ""
        lines.append(f"{bar(n.progress, width)} {n.progress * 100:5.1f}% {count:>7}  "
                     f"{n.label}: {n.state}{why}")
        for i, t in enumerate(n.tasks):
            branch = "`--" if i == len(n.tasks) - 1 else "|--"
            reason = f"  {t['reason']}" if t.get("reason") else ""
            lines.append(f"  {branch} {bar(float(t['progress']), width // 2)} "
                         f"{float(t['progress']) * 100:5.1f}%  task {t['id']} frame "
                         f"{_frame(t)}: {t['state']}{reason}")
    return lines


def plain(nodes: Sequence[JobNode]) -> dict[tuple[int, int | None], str]:
    """One line per job and per task (for a pipe), keyed so a caller prints only changes."""
    out: dict[tuple[int, int | None], str] = {}
    for n in nodes:
        why = f" ({n.reason})" if n.reason else ""
        out[(n.key, None)] = (f"{n.label}: {n.state} {n.done}/{len(n.tasks)} tasks "
                              f"{n.progress * 100:.0f}%{why}")
        for t in n.tasks:
            reason = f" ({t['reason']})" if t.get("reason") else ""
            out[(n.key, int(t["id"]))] = (
                f"{n.label}: task {t['id']} frame {_frame(t)}: {t['state']} "
                f"{float(t['progress']) * 100:.0f}%{reason}")
    return out


def finished(nodes: Sequence[JobNode]) -> bool:
    return all(n.state in FINISHED and all(t["state"] in FINISHED for t in n.tasks)
               for n in nodes)
