"""Output the shim could not hand to journald, journaled later by the agent.

While journald is away the shim keeps what journald has not taken in a spool next to its
status record (shim.spool_paths): the formatted lines ("<N>text\\n") and a record of where
journald stopped taking them. A scope stopped meanwhile (SIGKILL after the stop timeout) or
a shim that gave up waiting leaves the spool behind; once journald answers, the agent
journals the lines journald did not take, as native entries with the task's fields and
OBJECT_SYSTEMD_UNIT (journalctl -u matches that field on entries from root, systemd's
add_matches_for_unit), and says in the task's outcome how many lines came late.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

from farmnode.systemd.journal import TaskLogFields

_PREFIX = re.compile(rb"<([0-7])>")
Send = Callable[..., None]


@dataclass(frozen=True)
class Replayed:
    lines: int = 0  # journaled from the spool now
    bytes: int = 0
    errors: tuple[str, ...] = ()  # spools that could not be read or journaled

    def describe(self) -> str | None:
        parts = []
        if self.lines:
            parts.append(f"{self.lines} output lines ({self.bytes} bytes) were held while "
                         "journald was away and journaled late from the shim's spool")
        parts += self.errors
        return "; ".join(parts) or None


def pending_note(status_path: str) -> str:
    """An outcome's note while its output waits in the spools (replaced once journaled)."""
    return (f"output held while journald was away waits in {status_path}.*.spool and is "
            "journaled once journald is back")


def spools(status_path: str) -> list[str]:
    """The spool data files a task's shim left (one per stream)."""
    return sorted(p for p in glob.glob(f"{glob.escape(status_path)}.*.spool")
                  if os.path.exists(f"{p}.json"))


def waiting(tasks_dir: str) -> dict[str, str]:
    """Every spool waiting in the runtime directory: {status record path: assignment id}.

    Spools are named <assignment>.json.<identifier>.spool (shim.spool_paths); one whose
    record was never written (the shim died before its first rewrite) holds nothing that can
    be placed, so it is not listed."""
    found: dict[str, str] = {}
    for path in glob.glob(os.path.join(glob.escape(tasks_dir), "*.json.*.spool")):
        if not os.path.exists(f"{path}.json"):
            continue
        name = os.path.basename(path)
        status_name = name[:name.index(".json.") + len(".json")]
        found[os.path.join(tasks_dir, status_name)] = status_name[:-len(".json")]
    return dict(sorted(found.items()))


def _count_entries(journalctl: str, pid: int, identifier: str, since: float) -> int:
    argv = [journalctl, f"_PID={pid}", f"SYSLOG_IDENTIFIER={identifier}",
            f"--since=@{since:.6f}", "--output=cat", "--output-fields=_PID", "--quiet",
            "--no-pager"]
    out = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, timeout=300, check=True).stdout
    return out.count(b"\n")


def _default_send(*fields: str) -> None:
    from systemd import journal

    journal.sendv(*fields)


def replay(status_path: str, fields: TaskLogFields, journalctl: str = "journalctl",
           send: Send = _default_send) -> Replayed:
    """Journal what the shim's spools hold and journald has not got, then remove them.

    Raises OSError while journald cannot be reached (nothing is removed then)."""
    lines = nbytes = 0
    errors: list[str] = []
    paths = spools(status_path)
    if paths:
        # What the old connections handed journald must be in the journal before counting.
        # Fails while journald is away: then nothing is sent, the spools stay.
        try:
            subprocess.run([journalctl, "--sync"], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60,
                           check=True)
        except (OSError, subprocess.SubprocessError) as exc:
            raise OSError(f"journalctl --sync: {exc}") from exc
    for path in paths:
        try:
            with open(f"{path}.json") as f:
                meta = json.load(f)
            with open(path, "rb") as f:
                f.seek(max(0, int(meta["base"]) - int(meta["start"])))
                data = f.read()
            ident = str(meta["identifier"])
            try:
                taken = _count_entries(journalctl, int(meta["pid"]), ident,
                                       float(meta["opened_at"])) - int(meta["lines_taken"])
            except (OSError, subprocess.SubprocessError) as exc:
                raise OSError(f"journalctl: {exc}") from exc
        except (OSError, ValueError, KeyError, TypeError) as exc:
            if isinstance(exc, OSError) and "journalctl" in str(exc):
                raise
            errors.append(f"the spool {path} could not be read ({exc}): the output "
                          "it held is lost")
            _remove(path)
            continue
        todo = data.split(b"\n")
        if todo and todo[-1] == b"":
            todo.pop()
        todo = todo[max(taken, 0):]
        for raw in todo:
            priority = int(meta.get("priority", 6))
            if (m := _PREFIX.match(raw)) is not None:
                priority = int(m.group(1))
                raw = raw[m.end():]
            send(f"MESSAGE={raw.decode('utf-8', 'replace')}", f"PRIORITY={priority}",
                 f"SYSLOG_IDENTIFIER={ident}", f"OBJECT_SYSTEMD_UNIT={fields.unit}",
                 "FARMNODE_SPOOLED=1", *fields.fields())
            lines += 1
            nbytes += len(raw) + 1
        _remove(path)
    result = Replayed(lines, nbytes, tuple(errors))
    note = result.describe()
    if note:
        send(f"MESSAGE={note}", "PRIORITY=4", "SYSLOG_IDENTIFIER=farmnode-shim",
             f"OBJECT_SYSTEMD_UNIT={fields.unit}", *fields.fields())
    return result


def _remove(path: str) -> None:
    for p in (path, f"{path}.json"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)
