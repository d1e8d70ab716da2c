"""A task log as PyFarm's agent wrote it: one CSV per assignment, built from the record.

Nothing here keeps a log of its own. The lines come from what already holds them: the job's
output from journald (the shim writes every line there, FARMNODE_ASSIGNMENT on each), the
agent's own lines ("internal": command, working directory, environment, start) from the
store's task_logs row, and the exit lines from the task rows. The same entries serve the
master's upload and the agent's `GET /api/v1/task_logs/<identifier>`, so both say the same.

PyFarm's rows: `timestamp,pid,stream,lineno,message` — naive UTC ISO time with microseconds,
the process id or `None`, stream `internal`, `0` (stdout) or `1` (stderr), one line number
counted over the whole file, the message. Its identifier (the file name the master stores
the log under): `YYYY-MM-DD_HH-MM-SS_<job>_<uuid hex>.csv`, where PyFarm's uuid was its job
type instance's (one per assignment): ours is the assignment's.

Size: a log is read from journald as a stream and capped (`task_log_max_size`): the head up
to the cap, a marker line saying what was left out, then the last lines (a bounded tail, the
part that says why a render failed) and the exit lines; memory stays at the tail's bound.
"""

from __future__ import annotations

import csv
import re
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pprint import pformat
from typing import Any, Literal

Stream = Literal["internal", 0, 1]
INTERNAL: Stream = "internal"
# Of a capped log, this share (at most) is kept from its end.
TAIL_SHARE = 8
_IDENTIFIER = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)_(\d\d)-(\d\d)-(\d\d)_(\d{1,18})_([0-9a-f]{32})\.csv")


def identifier(job_id: int, assignment_id: str, created: float) -> str:
    """PyFarm's log file name for an assignment created at `created` (epoch seconds)."""
    t = datetime.fromtimestamp(created, UTC)
    try:
        name = uuid.UUID(assignment_id).hex
    except ValueError:  # the agent makes UUIDs; anything else is kept to a file-name alphabet
        name = re.sub(r"[^A-Za-z0-9-]", "-", assignment_id)[:64]
    return f"{t:%Y-%m-%d_%H-%M-%S}_{int(job_id)}_{name}.csv"


def assignment_of(identifier_text: str) -> str | None:
    """The assignment id an identifier names, or None if it is not one of ours."""
    m = _IDENTIFIER.fullmatch(identifier_text)
    return None if m is None else str(uuid.UUID(m.group(8)))


def utc_iso(ts: float) -> str:
    """PyFarm's timestamp column: datetime.utcnow().isoformat(), microseconds always."""
    return datetime.fromtimestamp(ts, UTC).replace(tzinfo=None).isoformat(
        timespec="microseconds")


@dataclass(frozen=True)
class OutputLine:
    """One line of the job's output as journald has it."""

    time: float  # epoch seconds
    stream: Literal[0, 1]
    message: str


@dataclass(frozen=True)
class InternalLine:
    """One of the agent's own lines about the run."""

    time: float
    message: str
    pid: int | None = None

    def to_json(self) -> list[Any]:
        return [self.time, self.pid, self.message]

    @classmethod
    def from_json(cls, value: Any) -> InternalLine:
        t, pid, message = value
        return cls(float(t), str(message), None if pid is None else int(pid))


@dataclass(frozen=True)
class LogEntry:
    """One row of the CSV."""

    time: str
    pid: int | None
    stream: Stream
    line: int
    message: str

    def to_json(self) -> dict[str, Any]:
        return {"time": self.time, "pid": self.pid, "stream": self.stream, "line": self.line,
                "message": self.message}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> LogEntry:
        stream = d.get("stream")
        return cls(str(d.get("time", "")), d.get("pid") if isinstance(d.get("pid"), int)
                   else None, stream if stream in (0, 1) else INTERNAL,
                   int(d.get("line", 0)), str(d.get("message", "")))


@dataclass(frozen=True)
class TaskEnd:
    """What the CSV's last lines say about one task (from its store row)."""

    task_id: int
    state: str
    reason: str | None
    exit_code: int | None
    signal: int | None
    finished: float | None


# ---- the agent's own lines, in PyFarm's words -----------------------------------------------

def start_lines(now: float, job_title: str | None, n_tasks: int, command: str,
                arguments: Iterable[str], cwd: str | None, user: str | None,
                group: str | None, env: Mapping[str, str]) -> list[InternalLine]:
    """What PyFarm's agent wrote before spawning the job's process."""
    return [
        InternalLine(now, f"Starting work on job {job_title}, assignment of {n_tasks} tasks."),
        InternalLine(now, f"Spawning process. Command: {command}"),
        InternalLine(now, f"Arguments: {tuple(arguments)!r}"),
        InternalLine(now, f"Work Dir: {cwd}"),
        InternalLine(now, f"User/Group: {user} {group}"),
        InternalLine(now, "Environment:"),
        InternalLine(now, pformat(dict(env), indent=4)),
    ]


def started_line(now: float, unit: str, pid: int) -> InternalLine:
    return InternalLine(now, f"Started process {pid} in {unit}", pid)


def end_lines(ends: list[TaskEnd], pid: int | None) -> list[InternalLine]:
    """The exit lines: PyFarm's "Process has (not) terminated successfully, code N", and why
    each task that did not end done ended as it did."""
    finished = [e for e in ends if e.finished is not None]
    if not finished:
        return []
    last = max(e.finished or 0.0 for e in finished)
    first = finished[0]
    out: list[InternalLine] = []
    if first.exit_code is not None or first.signal is not None:
        ok = all(e.state == "done" for e in ends)
        code = f"code {first.exit_code}" if first.signal is None else \
            f"code None (signal {first.signal})"
        out.append(InternalLine(last, f"Process has {'' if ok else 'not '}terminated "
                                      f"successfully, {code}", pid))
    for e in ends:
        if e.state != "done":
            out.append(InternalLine(e.finished or last, f"Task {e.task_id} {e.state}"
                                                        + (f": {e.reason}" if e.reason else "")))
    return out


# ---- the whole log --------------------------------------------------------------------------

def entries(internal: Iterable[InternalLine], output: Iterable[OutputLine],
            ending: Iterable[InternalLine], *, pid: int | None,
            max_bytes: int | None = None, where: str = "") -> Iterator[LogEntry]:
    """The rows of the log: the agent's lines, the job's output, the exit lines, numbered
    over the file; output beyond `max_bytes` of CSV is left out but for a tail, behind one
    marker line (`where` says where the full output is)."""
    line = 0
    size = 0
    head_budget = None if max_bytes is None else max_bytes - max_bytes // TAIL_SHARE
    tail_budget = 0 if max_bytes is None else max_bytes // TAIL_SHARE
    tail: deque[tuple[LogEntry, int]] = deque()
    tail_size = 0
    omitted = omitted_bytes = first_omitted = 0

    writer = _Row()

    def row(entry: LogEntry) -> int:
        return len(csv_row(entry, writer).encode("utf-8"))

    for il in internal:
        line += 1
        entry = LogEntry(utc_iso(il.time), il.pid, INTERNAL, line, il.message)
        size += row(entry)
        yield entry
    last_time = utc_iso(0)
    for ol in output:
        line += 1
        entry = LogEntry(utc_iso(ol.time), pid, ol.stream, line, ol.message)
        last_time = entry.time
        n = row(entry)
        if head_budget is None or (not tail and size + n <= head_budget):
            size += n
            yield entry
            continue
        tail.append((entry, n))
        tail_size += n
        while tail_size > tail_budget and tail:
            gone, dropped = tail.popleft()
            first_omitted = first_omitted or gone.line
            tail_size -= dropped
            omitted += 1
            omitted_bytes += dropped
    if omitted:
        marker = (f"Log truncated: lines {first_omitted} to {first_omitted + omitted - 1} "
                  f"({omitted_bytes} bytes) of output left out (task_log_max_size)")
        if where:
            marker += f"; the full output is in the node's journal: {where}"
        # It takes the number of the first row it stands for; the others' are skipped, so
        # every kept row keeps the number it has in the full log (journalctl shows it).
        yield LogEntry(tail[0][0].time if tail else last_time, None, INTERNAL, first_omitted,
                       marker)
    for entry, _ in tail:
        yield entry
    for il in ending:
        line += 1
        yield LogEntry(utc_iso(il.time), il.pid, INTERNAL, line, il.message)


class _Row:
    """csv.writer's quoting for one row at a time, without a writer per row."""

    def __init__(self) -> None:
        self.text = ""
        self.writer = csv.writer(self)

    def write(self, text: str) -> None:
        self.text = text


def csv_row(entry: LogEntry, _row: _Row | None = None) -> str:
    """One CSV line (RFC 4180 quoting, CRLF, as csv.writer and PyFarm's writer do)."""
    row = _row or _Row()
    row.writer.writerow((entry.time, str(entry.pid), entry.stream, entry.line, entry.message))
    return row.text


def csv_rows(rows: Iterable[LogEntry]) -> Iterator[str]:
    writer = _Row()
    for entry in rows:
        yield csv_row(entry, writer)


# Where the job's output comes from: journald in the agent (farmnode.systemd.journal
# .output_lines, adapted by the agent), anything that yields OutputLines in tests.
OutputSource = Callable[[str], Iterable[OutputLine]]


@dataclass(frozen=True)
class TaskLogRecord:
    """What the store keeps of an assignment's log (table task_logs, and its task rows)."""

    assignment_id: str
    identifier: str
    job_id: int
    created: float
    internal: tuple[InternalLine, ...]
    pid: int | None
    ends: tuple[TaskEnd, ...]


def build(record: TaskLogRecord, output: OutputSource,
          max_bytes: int | None = None) -> Iterator[LogEntry]:
    """The log's rows: one place builds them for the upload and for the agent's API."""
    return entries(record.internal, output(record.assignment_id),
                   end_lines(list(record.ends), record.pid), pid=record.pid,
                   max_bytes=max_bytes,
                   where=f"journalctl FARMNODE_ASSIGNMENT={record.assignment_id}")
