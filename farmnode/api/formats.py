"""Pure formatting: task logs (PyFarm's CSV, plain text) and Prometheus metrics."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from farmnode.tasks import tasklog
from farmnode.tasks.tasklog import LogEntry

STREAM_NAMES = ("stdout", "stderr")


def log_entries(lines: Iterable[bytes]) -> Iterator[LogEntry]:
    """The agent's JSON-lines log (TaskLog over D-Bus), one row of the CSV per line."""
    for raw in lines:
        if raw.strip():
            yield LogEntry.from_json(json.loads(raw))


def csv_rows(entries: Iterable[LogEntry]) -> Iterator[str]:
    """PyFarm's CSV, written as for the master's upload (farmnode.tasks.tasklog)."""
    return tasklog.csv_rows(entries)


def text_lines(entries: Iterable[LogEntry]) -> Iterator[str]:
    """`<time> <stream> <message>` per line, for people."""
    for e in entries:
        name = STREAM_NAMES[e.stream] if e.stream in (0, 1) else "agent"
        yield f"{e.time} {name} {e.message}\n"


# ---- Prometheus text format 0.0.4 ----------------------------------------------------------

PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TASK_STATES = ("queued", "running", "done", "failed", "cancelled")


def _label(value: object) -> str:
    text = str(value)
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _value(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(int(v)) if float(v).is_integer() and abs(v) < 2**53 else repr(float(v))


class Metrics:
    def __init__(self) -> None:
        self._families: dict[str, tuple[str, str, list[str]]] = {}

    def add(self, name: str, kind: str, help_text: str, value: float,
            labels: Mapping[str, object] | None = None) -> None:
        family = self._families.setdefault(name, (kind, help_text, []))
        label_text = ""
        if labels:
            label_text = "{" + ",".join(f'{k}="{_label(v)}"' for k, v in labels.items()) + "}"
        family[2].append(f"{name}{label_text} {_value(value)}")

    def render(self) -> str:
        out = []
        for name, (kind, help_text, samples) in self._families.items():
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(samples)
        return "\n".join(out) + "\n"


def metrics(status: Mapping[str, Any] | None, tasks: list[Mapping[str, Any]],
            active: list[Mapping[str, Any]]) -> str:
    """Node and task metrics; `status` None means the agent did not answer."""
    m = Metrics()
    m.add("farmnode_up", "gauge", "1 if the agent answered over D-Bus.",
          0 if status is None else 1)
    if status is None:
        return m.render()
    m.add("farmnode_agent_info", "gauge", "The agent's version, state and id.", 1,
          {"version": status.get("version", ""), "state": status.get("state", ""),
           "agent_id": status.get("agent_id", "")})
    counts = dict.fromkeys(TASK_STATES, 0)
    for t in tasks:
        counts[str(t.get("state"))] = counts.get(str(t.get("state")), 0) + 1
    for state, n in counts.items():
        m.add("farmnode_tasks", "gauge", "Task records the agent keeps, by state.", n,
              {"state": state})
    for key, name, help_text in (
        ("ram", "farmnode_ram_total_megabytes", "RAM the agent offers (MB)."),
        ("free_ram", "farmnode_ram_free_megabytes", "Free RAM on the node (MB)."),
        ("agent_process_ram", "farmnode_agent_process_ram_megabytes",
         "Resident memory of the agent process (MB)."),
        ("cpus", "farmnode_cpus", "CPUs the agent offers."),
        ("running_tasks", "farmnode_running_tasks", "Tasks of running assignments."),
        ("uptime", "farmnode_agent_uptime_seconds", "Seconds since the agent started."),
    ):
        if isinstance(status.get(key), int | float) and not isinstance(status.get(key), bool):
            m.add(name, "gauge", help_text, float(status[key]))
    # Per-task figures come from the agent's cgroup accounting when it reports them.
    for t in active:
        accounting = t.get("accounting")
        figures: Mapping[str, Any] = accounting if isinstance(accounting, Mapping) else {}
        labels = {"task_id": t.get("id"), "job_id": t.get("job_id"),
                  "assignment_id": t.get("assignment_id")}
        for key, name, kind, help_text, scale in (
            ("memory_current", "farmnode_task_memory_bytes", "gauge",
             "Memory of the task's scope (cgroup memory.current).", 1.0),
            ("memory_peak", "farmnode_task_memory_peak_bytes", "gauge",
             "Peak memory of the task's scope.", 1.0),
            ("cpu_usage_usec", "farmnode_task_cpu_seconds_total", "counter",
             "CPU time used by the task's scope.", 1e-6),
            ("tasks_current", "farmnode_task_processes", "gauge",
             "Processes and threads in the task's scope.", 1.0),
        ):
            value = figures.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                m.add(name, kind, help_text, value * scale, labels)
    return m.render()
