"""How task output reaches journald, and how it is found there again.

The shim inside each task's scope writes the job's lines to journald over two stdout-stream
connections (journald's protocol for services' stdout/stderr: one `write()` carries many
lines), so journald attributes them to the scope itself (`_SYSTEMD_UNIT`, `journalctl -u`)
and ingests them at its stream speed, about twice that of one native entry per line
(bench/REPORT.md). The agent runs the job type's line hooks and tells the shim what to write,
priority prefix included (`<6>line`); see link.py.

A scope has no `LogRateLimitIntervalSec=`/`LogExtraFields=` of its own (those belong to
services), and journald's default rate limit would drop lines of a chatty task. So the agent
gives each task scope what systemd gives a service with those settings: the files journald
reads for a unit under /run/systemd/units/ (rate limit as two symlinks, extra fields as
le64-length-prefixed `FIELD=value` records). They are written before the gate opens (journald
reads them when it first sees the shim) and removed when the scope is gone. The layout is
systemd's own (src/core/unit.c writes it for services, journald-context.c reads it); the
system tests check that journald honours it on the systemd we run on: if it stopped, a chatty
task's lines would be rate-limited and those tests would fail.

Every entry carries FARMNODE_JOB, FARMNODE_ASSIGNMENT, FARMNODE_JOBTYPE and one FARMNODE_TASK
per task of the batch, so `journalctl FARMNODE_TASK=<id>` finds the lines of any of them;
SYSLOG_IDENTIFIER says the stream (farmnode-stdout / farmnode-stderr).
"""

from __future__ import annotations

import contextlib
import os
import struct
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from farmnode.systemd import framing

UNITS_DIR = Path("/run/systemd/units")
STREAM_NAMES = ("stdout", "stderr")
IDENTIFIERS = ("farmnode-stdout", "farmnode-stderr")
DEFAULT_PRIORITIES = (6, 4)  # info for stdout, warning for stderr (JobType.line_priority)
# journald's rate limit for a task's scope, as farmnode.service sets it for itself:
# LogRateLimitIntervalSec=0 does not lift it on systemd 252, a huge burst per second does.
RATELIMIT_INTERVAL_USEC = 1_000_000
RATELIMIT_BURST = 1_000_000_000
_FILES = ("log-extra-fields", "log-rate-limit-interval", "log-rate-limit-burst")


@dataclass(frozen=True)
class TaskLogFields:
    unit: str
    job_id: int
    assignment_id: str
    task_ids: tuple[int, ...]
    jobtype: str = ""

    def fields(self) -> list[str]:
        out = [f"FARMNODE_JOB={self.job_id}", f"FARMNODE_ASSIGNMENT={self.assignment_id}"]
        if self.jobtype:
            out.append(f"FARMNODE_JOBTYPE={self.jobtype}")
        out += [f"FARMNODE_TASK={t}" for t in self.task_ids]
        return out


def export_unit_settings(fields: TaskLogFields, units_dir: Path = UNITS_DIR) -> None:
    """Give the task's scope its journald settings (see the module docstring)."""
    units_dir.mkdir(parents=True, exist_ok=True)
    records = b"".join(struct.pack("<Q", len(f.encode())) + f.encode() for f in fields.fields())
    _atomic_write(units_dir / f"log-extra-fields:{fields.unit}", records)
    _atomic_symlink(str(RATELIMIT_INTERVAL_USEC),
                    units_dir / f"log-rate-limit-interval:{fields.unit}")
    _atomic_symlink(str(RATELIMIT_BURST), units_dir / f"log-rate-limit-burst:{fields.unit}")


def remove_unit_settings(unit: str, units_dir: Path = UNITS_DIR) -> None:
    for name in _FILES:
        with contextlib.suppress(FileNotFoundError):
            (units_dir / f"{name}:{unit}").unlink()


def exported_units(units_dir: Path = UNITS_DIR, prefix: str = "farmnode-task-") -> set[str]:
    """Task scopes that have settings exported (to clean up those whose scope is gone)."""
    out = set()
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(units_dir):
            name, sep, unit = entry.name.partition(":")
            if sep and name in _FILES and unit.startswith(prefix):
                out.add(unit)
    return out


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.rename(tmp, path)


def _atomic_symlink(target: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    os.rename(tmp, path)


# ---- link protocol 1 ------------------------------------------------------------------------
# A shim started by an agent older than the stream path does not write to journald: after
# an upgrade the agent journals that task's lines itself, as that agent did, until it ends.

def legacy_write_line(fields: TaskLogFields, stream: int, line_no: int, offset: int,
                      next_offset: int, priority: int, message: str) -> None:
    """One line as a native entry; the last entry's FARMNODE_NEXT is where to resume."""
    from systemd import journal

    journal.sendv(
        f"MESSAGE={message}", f"PRIORITY={priority}", f"FARMNODE_STREAM={STREAM_NAMES[stream]}",
        f"FARMNODE_LINE={line_no}", f"FARMNODE_OFFSET={offset}", f"FARMNODE_NEXT={next_offset}",
        f"OBJECT_SYSTEMD_UNIT={fields.unit}", "SYSLOG_IDENTIFIER=farmnode-task",
        *fields.fields(),
    )


def legacy_resume_point(assignment_id: str, stream: int) -> tuple[int, int]:
    """(offset, line number) after the last native line of the stream, (0, 0) if none; the
    caller must have made journald process what was sent to it (journalctl --sync)."""
    from systemd import journal

    reader = journal.Reader()
    try:
        reader.add_match(FARMNODE_ASSIGNMENT=assignment_id, FARMNODE_STREAM=STREAM_NAMES[stream])
        reader.seek_tail()
        entry = reader.get_previous()
        if not entry:
            return 0, 0
        return int(entry["FARMNODE_NEXT"]), int(entry["FARMNODE_LINE"])
    finally:
        reader.close()


def stream_of(entry: Mapping[str, object]) -> str | None:
    """'stdout'/'stderr' for a task's output entry, None for any other entry."""
    legacy = entry.get("FARMNODE_STREAM")  # written through link protocol 1
    if legacy in STREAM_NAMES:
        return str(legacy)
    ident = entry.get("SYSLOG_IDENTIFIER")
    if ident in IDENTIFIERS:
        return STREAM_NAMES[IDENTIFIERS.index(str(ident))]
    return None


def output_lines(assignment_id: str, sync: bool = True) -> Iterator[tuple[float, int, str]]:
    """(epoch time, stream 0|1, message) of every output line of an assignment, oldest first,
    read as a stream (blocking: run it in a thread). `sync` first makes journald write what
    it was handed: a task's last lines may still sit in its stream socket when it ends."""
    import datetime

    from systemd import journal

    if sync:
        subprocess.run(["journalctl", "--sync"], check=False, timeout=30,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    reader = journal.Reader(flags=journal.SYSTEM)
    try:
        reader.add_match(FARMNODE_ASSIGNMENT=assignment_id)
        for entry in reader:
            stream = stream_of(entry)
            if stream is None:
                continue
            ts = entry["__REALTIME_TIMESTAMP"]
            t = ts.timestamp() if isinstance(ts, datetime.datetime) else float(ts) / 1e6
            yield t, STREAM_NAMES.index(stream), _text(entry.get("MESSAGE", ""))
    finally:
        reader.close()


def _text(value: object) -> str:
    # journald hands back bytes for a MESSAGE that is not valid UTF-8.
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def format_line(priority: int, text: str) -> bytes:
    """One line as the shim writes it to journald's stream (level prefix on).

    journald ends a stream line at NUL as at a newline, and cuts one at LineMax: a NUL is
    written as U+FFFD, a formatter's embedded newline starts another entry with the same
    priority, and a line longer than framing.LINE_BYTES is cut into several, each with its
    own prefix (unprefixed, a job's own "<0>" at a line's start would be taken for a
    priority; framing.py)."""
    raw = text.encode("utf-8", "surrogateescape")
    if b"\n" in raw or b"\0" in raw or len(raw) > framing.LINE_BYTES:
        return framing.frame_text(priority, raw)
    return framing.prefix_of(priority) + raw + b"\n"
