"""The agent's side of the HTTP API's control calls: own-unit stop/restart, signals,
config patches, task logs. Kept out of core.py so the Agent class only delegates here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import signal
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from sdbus import SdBus

from farmnode.config import ConfigError, load_config
from farmnode.config.model import PATCHABLE_CONFIG_KEYS, SETTINGS, Config
from farmnode.systemd.journal import output_lines
from farmnode.systemd.scope import ScopeManager
from farmnode.tasks import tasklog
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


# The HTTP API runs exactly while the agent does. farmnode.service Wants= the service, so
# systemd starts it alongside the agent (in parallel: no After=, the agent's own start
# overlaps gunicorn's); the agent says READY=1 only once it is up, so no master request
# waits for its cold start. On a real stop the agent closes the socket, and the port
# refuses connections; a restart, an upgrade or a crash leaves both alone, so the socket
# keeps the port open and queues connections meanwhile.
API_SERVICE = "farmnode-api.service"
API_SOCKET = "farmnode-api.socket"
# gunicorn starts in a few hundred milliseconds; this only bounds a start that hangs, which
# must not keep the agent (and D-Bus control of the node) from becoming ready.
API_START_TIMEOUT = 30.0
# gunicorn's graceful stop (graceful_timeout, 5 s) plus margin; under TimeoutStopSec=.
API_STOP_TIMEOUT = 30.0


async def api_up(scopes: ScopeManager) -> bool:
    """Wait until farmnode-api.service (and so its socket) is active. A failure is logged,
    not raised: the agent serves D-Bus without its HTTP side."""
    try:
        result = await scopes.unit_job(API_SERVICE, "start", API_START_TIMEOUT)
    except TimeoutError:
        log.error("%s did not start within %gs; going on without waiting for it",
                  API_SERVICE, API_START_TIMEOUT)
        return False
    except Exception as exc:  # masked, or not installed: the admin's choice
        log.warning("cannot start %s: %s", API_SERVICE, exc)
        return False
    if result != "done":
        log.error("%s did not start (job %s); see journalctl -u %s", API_SERVICE, result,
                  API_SERVICE)
        return False
    return True


async def release_bus_name(bus: SdBus, name: str) -> None:
    """Leave the bus name before exiting: a client waiting for the agent to go (POST
    /api/v1/stop with wait) gets its answer before the API itself is stopped."""
    message = bus.new_method_call_message("org.freedesktop.DBus", "/org/freedesktop/DBus",
                                          "org.freedesktop.DBus", "ReleaseName")
    message.append_data("s", name)
    try:
        await bus.call_async(message)
    except Exception:
        log.exception("could not release %s", name)


async def api_down(scopes: ScopeManager) -> None:
    """A real stop: stop the socket (which stops the service first: it Requires= the
    socket) and wait, so that once `systemctl stop farmnode` returns the port refuses
    connections and the master takes its "cannot contact the agent" path, rather than
    reading 503 from an API with no agent behind it. `systemctl start farmnode` starts
    both again (Wants=)."""
    try:
        result = await scopes.unit_job(API_SOCKET, "stop", API_STOP_TIMEOUT)
    except TimeoutError:
        log.error("%s did not stop within %gs", API_SOCKET, API_STOP_TIMEOUT)
        return
    except Exception as exc:
        log.warning("cannot stop %s: %s", API_SOCKET, exc)
        return
    if result != "done":
        log.error("stopping %s: job %s", API_SOCKET, result)


def check_signal(signum: int) -> int:
    valid = {int(s) for s in signal.valid_signals()}
    if signum not in valid or signum == 0:
        raise ControlError(f"signal {signum} is not a valid signal number")
    return signum


_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+~:_-]{0,63}")


def check_version(version: str) -> str:
    # It ends up in the journal and maybe in a package manager's argv: nothing that could be
    # read as an option or a path.
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


def log_assignment(store: Store, identifier: str) -> str:
    """The assignment a log identifier names: PyFarm's identifier (the one the master was
    given), a task id (its latest attempt) or an assignment id, bare or as
    `<assignment id>.csv`. Nothing else is accepted, so no identifier ever names a file."""
    if identifier.isascii() and identifier.isdigit() and len(identifier) <= 18:
        rec = store.task(int(identifier))
        if rec is None:
            raise NoSuchLog(f"no task {identifier} on this node")
        return rec.assignment_id
    found = store.task_log_assignment(identifier)
    if found is not None:
        return found
    m = _ASSIGNMENT_LOG.match(identifier)
    if m and store.unit_of(m.group(1)) is not None:
        return m.group(1)
    raise NoSuchLog(f"no task log {identifier[:80]!r} on this node")


def journal_output(assignment_id: str) -> Iterator[tasklog.OutputLine]:
    """The job's output of an assignment from journald, for tasklog.build."""
    for t, stream, message in output_lines(assignment_id):
        yield tasklog.OutputLine(t, 1 if stream == 1 else 0, message)


def log_record(store: Store, assignment_id: str) -> tasklog.TaskLogRecord:
    """The assignment's log record; one with no lines of the agent for an assignment
    accepted before the agent kept them."""
    record = store.task_log(assignment_id)
    if record is not None:
        return record
    a = store.assignment(assignment_id)
    if a is None:
        raise NoSuchLog(f"no task log for assignment {assignment_id}")
    return tasklog.TaskLogRecord(assignment_id, assignment_id + ".csv", a.job.id, 0.0, (),
                                 None, ())


def write_log(fd: int, record: tasklog.TaskLogRecord, max_bytes: int) -> None:
    """The log's rows as JSON lines (time, pid, stream, line, message): the rows of the CSV
    the master is sent; formatting (CSV, text) is the API's business. Runs in a thread:
    journal reads block."""
    with os.fdopen(os.dup(fd), "w", encoding="utf-8") as out:
        for entry in tasklog.build(record, journal_output, max_bytes):
            out.write(json.dumps(entry.to_json(), separators=(",", ":")) + "\n")
    os.lseek(fd, 0, os.SEEK_SET)
