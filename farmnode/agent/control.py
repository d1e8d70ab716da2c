"""The agent's side of the HTTP API's control calls ([3]): own-unit stop/restart, signals,
config patches, task logs. Kept out of core.py so the Agent class only delegates here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import re
import signal
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from sdbus import SdBus

from farmnode.bus.interface import PATCHABLE_CONFIG_KEYS
from farmnode.config import ConfigError, load_config
from farmnode.config.model import SETTINGS, Config
from farmnode.systemd.journal import stream_of
from farmnode.tasks.store import Store

log = logging.getLogger(__name__)

AGENT_UNIT = "farmnode.service"

EDITABLE_KEYS = PATCHABLE_CONFIG_KEYS
# Lexically late, so an admin's earlier drop-ins are overridden only for the keys set here.
API_DROPIN = "90-http-api.yaml"


class ControlError(ValueError):
    """A refused control request; the message is for the caller."""


async def own_unit_job(bus: SdBus, action: str) -> None:
    """Ask systemd to stop or restart farmnode.service. Run it as a task started by the D-Bus
    method that asked: systemd may send SIGTERM before its own reply reaches us, so the
    caller's reply must already be out by then."""
    # A raw call: farmnode.systemd.manager already declares the Manager interface, and sdbus
    # allows one class per interface name.
    message = bus.new_method_call_message("org.freedesktop.systemd1", "/org/freedesktop/systemd1",
                                          "org.freedesktop.systemd1.Manager",
                                          "RestartUnit" if action == "restart" else "StopUnit")
    message.append_data("ss", AGENT_UNIT, "replace")
    try:
        await bus.call_async(message)
    except Exception:
        log.exception("systemd refused to %s %s", action, AGENT_UNIT)


def check_signal(signum: int) -> int:
    valid = {int(s) for s in signal.valid_signals()}
    if signum not in valid or signum == 0:
        raise ControlError(f"signal {signum} is not a valid signal number")
    return signum


_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+~:_-]{0,63}")


def check_version(version: str) -> str:
    # It ends up in the journal and, with packaging ([5]), maybe in a package manager's argv.
    if not _VERSION.fullmatch(version):
        raise ControlError(f"version must look like a package version (e.g. 1.2.3), got "
                           f"{version[:70]!r}")
    return version


# ---- config ------------------------------------------------------------------------------


def config_dir() -> Path:
    # farmnode.service has ConfigurationDirectory=farmnode, so systemd tells us where it is.
    return Path(os.environ.get("CONFIGURATION_DIRECTORY", "/etc/farmnode").split(":")[0])


def patch_config(config: Config, patch: object, directory: Path | None = None) -> Config:
    """Apply a JSON merge patch (RFC 7396; null resets a key to the files' value) of editable
    keys: written to conf.d/90-http-api.yaml, then the whole config is re-read to check it.
    Returns `config` with the editable keys replaced by their new effective values."""
    if not isinstance(patch, Mapping):
        raise ControlError("the patch must be a JSON object of key: value")
    directory = directory or config_dir()
    for key in patch:
        if key not in SETTINGS:
            raise ControlError(f"{key}: unknown key")
        if key not in EDITABLE_KEYS:
            raise ControlError(f"{key}: not editable over the API (editable: "
                               f"{', '.join(EDITABLE_KEYS)})")
    dropin = directory / "conf.d" / API_DROPIN
    current: dict[str, Any] = {}
    with contextlib.suppress(FileNotFoundError):
        loaded = yaml.safe_load(dropin.read_text(encoding="utf-8"))
        if isinstance(loaded, dict):
            current = loaded
    for key, value in patch.items():
        if value is None:
            current.pop(key, None)
            continue
        setting = SETTINGS[key]
        try:
            current[key] = setting.validate(setting.coerce(value))
        except ValueError as exc:
            raise ControlError(f"{key}: {exc}") from None
    old_text = dropin.read_text(encoding="utf-8") if dropin.exists() else None
    _write_atomically(dropin, "# Written by farmnode (PATCH /api/v1/config); keys set over the"
                              " API.\n" + yaml.safe_dump(current, sort_keys=True))
    try:
        fresh = load_config(directory / "farmnode.yaml")
    except ConfigError as exc:
        if old_text is None:
            dropin.unlink(missing_ok=True)
        else:
            _write_atomically(dropin, old_text)
        raise ControlError(f"the patched configuration is invalid: {exc}") from None
    return dataclasses.replace(config, **{k: getattr(fresh, k) for k in EDITABLE_KEYS})


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        # 0644: farmnode-api.service (unprivileged) reads the config too.
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# ---- task logs ---------------------------------------------------------------------------

_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_ASSIGNMENT_LOG = re.compile(rf"^({_UUID})(?:\.csv)?$")


class NoSuchLog(LookupError):
    pass


def log_matches(store: Store, identifier: str) -> dict[str, str]:
    """journald matches for a log identifier: a task id (its latest attempt) or an assignment
    id, bare or as `<assignment id>.csv` (PyFarm keeps one log per assignment). Nothing else
    is accepted, so no identifier ever names a file."""
    if identifier.isascii() and identifier.isdigit() and len(identifier) <= 18:
        rec = store.task(int(identifier))
        if rec is None:
            raise NoSuchLog(f"no task {identifier} on this node")
        return {"FARMNODE_TASK": str(rec.id), "FARMNODE_ASSIGNMENT": rec.assignment_id}
    m = _ASSIGNMENT_LOG.match(identifier)
    if m and store.unit_of(m.group(1)) is not None:
        return {"FARMNODE_ASSIGNMENT": m.group(1)}
    raise NoSuchLog(f"no task log {identifier[:80]!r} on this node")


def write_log(fd: int, matches: Mapping[str, str]) -> None:
    """One JSON object per output line: time, stream (0 stdout, 1 stderr), line, pid, message.
    Formatting (CSV, text) is the API's business. Runs in a thread: journal reads block."""
    from systemd import journal

    reader = journal.Reader(flags=journal.SYSTEM)
    lines = {"stdout": 0, "stderr": 0}
    try:
        for key, value in matches.items():
            reader.add_match(**{key: value})
        with os.fdopen(os.dup(fd), "w", encoding="utf-8") as out:
            for entry in reader:
                stream = stream_of(entry)
                if stream is None:
                    continue
                lines[stream] += 1
                ts = entry["__REALTIME_TIMESTAMP"]
                if isinstance(ts, datetime.datetime) and ts.tzinfo is None:
                    ts = ts.astimezone()
                out.write(json.dumps({
                    "time": ts.isoformat() if isinstance(ts, datetime.datetime) else str(ts),
                    "stream": 0 if stream == "stdout" else 1,
                    "line": lines[stream],
                    "pid": None,
                    "message": _text(entry.get("MESSAGE", "")),
                }, separators=(",", ":")) + "\n")
    finally:
        reader.close()
    os.lseek(fd, 0, os.SEEK_SET)


def _text(value: object) -> str:
    # journald hands back bytes for a MESSAGE that is not valid UTF-8.
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)
