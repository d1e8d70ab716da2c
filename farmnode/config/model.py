"""What the settings are: the `Config` dataclass, each key's type, default and accepted range.

The dataclass is the single source of truth: `SETTINGS` is derived from its annotations and
field metadata, so adding a key means adding one field here (and a line in etc/farmnode.yaml).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
import shlex
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from farmnode.config.schedule import canonical as canonical_schedule
from farmnode.config.webhooks import Webhook, masked_url, parse_webhooks
from farmnode.describe import describe
from farmnode.pathmap import parse_rules

# A check takes an already type-correct value and returns it (possibly normalised) or raises
# ValueError with a message that does not repeat the key (the loader adds key and location).
Check = Callable[[Any], Any]

REDACTED = "********"


def _setting(default: Any, check: Check | None = None, *, secret: bool = False,
             listed: bool = False) -> Any:
    # repr=False for secrets: a Config ends up in log lines and tracebacks. listed: a string of
    # names that YAML may also write as a list of strings (kept as "a, b").
    return field(default=default, repr=not secret,
                 metadata={"check": check, "secret": secret, "listed": listed})


# --- checks ---------------------------------------------------------------------------------


def _between(lo: float | None = None, hi: float | None = None, *, above: bool = False) -> Check:
    def check(value: Any) -> Any:
        if lo is not None and hi is not None and not lo <= value <= hi:
            raise ValueError(f"must be between {lo} and {hi}, got {value!r}")
        if lo is not None and hi is None:
            if above and not value > lo:
                raise ValueError(f"must be greater than {lo}, got {value!r}")
            if not above and not value >= lo:
                raise ValueError(f"must be at least {lo}, got {value!r}")
        return value

    return check


_positive = _between(0, above=True)
_non_negative = _between(0)


def _ratio(value: float) -> float:
    if not 0 < value <= 1:
        raise ValueError(f"must be greater than 0 and at most 1, got {value!r}")
    return value


def _word(value: str) -> str:
    # Values that end up in URLs, unit properties or argv: whitespace is always a mistake.
    if not value:
        raise ValueError("must not be empty")
    if any(c.isspace() or not c.isprintable() for c in value):
        raise ValueError(f"must not contain whitespace or control characters, got {value!r}")
    return value


def _non_empty(value: str) -> str:
    if not value:
        raise ValueError("must not be empty")
    return value


def _absolute_path(value: str) -> str:
    # The agent runs from / under systemd; a relative path would silently depend on the cwd.
    if not value.startswith("/"):
        raise ValueError(f"must be an absolute path, got {value!r}")
    return value


def _word_that(wrong: Callable[[str], bool], must: str) -> Check:
    """A `_word` check that also refuses what `wrong` is true of: it "must" be something else."""
    def check(value: str) -> str:
        _word(value)
        if wrong(value):
            raise ValueError(f"must {must}, got {value!r}")
        return value

    return check


# `master` is host[:port], spliced into master_api; a scheme or path here breaks the URL.
_host = _word_that(lambda v: "/" in v, "be a host name or host:port (no scheme or path)")


_HOSTNAME = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?$")


def _hostname(value: str) -> str:
    if value != "auto" and (len(value) > 253 or not _HOSTNAME.match(value)):
        raise ValueError(f"must be 'auto' or a valid host name, got {value!r}")
    return value


def _ip_address(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError(f"must be an IP address, got {value!r}") from None


def _networks(value: str) -> str:
    # Addresses or networks, separated by commas or spaces; "auto" is handled by the loader.
    if value == "auto":
        return value
    items = value.replace(",", " ").split()
    out = []
    for item in items:
        try:
            out.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or network") from None
    return ", ".join(out)


def _addresses(value: str) -> str:
    items = value.replace(",", " ").split()
    if not items:
        raise ValueError("must list at least one address (null: every address)")
    out = []
    for item in items:
        try:
            out.append(str(ipaddress.ip_address(item.strip("[]"))))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address") from None
    return ", ".join(out)


_http_url = _word_that(lambda v: not v.startswith(("http://", "https://")),
                       "be an http:// or https:// URL")
# RFC 7617: a user-id containing ':' cannot be sent with HTTP Basic auth.
_api_username = _word_that(lambda v: ":" in v, "not contain ':'")
_user_name = _word_that(lambda v: "/" in v or ":" in v or v.startswith("-"), "be a user name")


def _user_names(value: str) -> str:
    names = value.replace(",", " ").split()
    for name in names:
        _user_name(name)
    return ", ".join(names)


def jobtype_counts(value: str) -> dict[str, int]:
    """`task_gpus`: "blender=1, cycles=2" → {"blender": 1, "cycles": 2}."""
    out: dict[str, int] = {}
    for part in (p.strip() for p in value.split(",")):
        if not part:
            continue
        name, sep, count = (x.strip() for x in part.partition("="))
        if not sep or not name or not count.isdigit():
            raise ValueError(f"each entry must be JOBTYPE=COUNT, got {part!r}")
        out[name] = int(count)
    return out


def _jobtype_counts(value: str) -> str:
    return ", ".join(f"{k}={v}" for k, v in jobtype_counts(value).items())


_DEVICE_MODE = re.compile(r"^[rwm]{1,3}$")


def _device_allow(value: str) -> str:
    # systemd's DeviceAllow=: a /dev path or char-NAME/block-NAME, then optional r/w/m
    entries = [e.strip() for e in value.split(",") if e.strip()]
    for entry in entries:
        spec, _, mode = entry.partition(" ")
        if not (spec.startswith("/dev/") or spec.startswith(("char-", "block-"))):
            raise ValueError(f"each entry must be a /dev path or char-NAME/block-NAME, got "
                             f"{entry!r}")
        if mode.strip() and not _DEVICE_MODE.match(mode.strip()):
            raise ValueError(f"the access of {spec!r} must be of r, w, m; got {mode.strip()!r}")
    return ", ".join(entries)


def _no_root(value: bool) -> bool:
    # Kept so that configs written for earlier releases still load; "false" is all it can be.
    if value:
        raise ValueError("tasks never run as root or in group 0 any more: remove this "
                         "setting (see task_system_users in farmnode.yaml(5))")
    return value


_SLICE = re.compile(r"^[A-Za-z0-9:_.\\-]+\.slice$")


def _slice_name(value: str) -> str:
    if len(value) > 255 or not _SLICE.match(value):
        raise ValueError(f"must be a systemd slice name ending in '.slice', got {value!r}")
    return value


_CPU_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _cpuset(value: str) -> str:
    # Same syntax as systemd's AllowedCPUs= and cgroup cpuset.cpus: "0-3,6".
    parts = [p.strip() for p in value.split(",")]
    for part in parts:
        m = _CPU_RANGE.match(part)
        if m is None or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise ValueError(f"must be a CPU list like '0-3,6', got {value!r}")
    return ",".join(parts)


def _command_line(value: str) -> str:
    # Split as a shell would, but never run by one: what it names is exec'd as it is.
    if value.strip():
        try:
            words = shlex.split(value)
        except ValueError as exc:
            raise ValueError(f"does not parse as a command line ({exc}): {value!r}") from None
        if not words:
            raise ValueError(f"names no program: {value!r}")
    return value.strip()


def _path_map(value: str) -> str:
    # Rules keep their order of the file in the value; parse_rules refuses a bad one by name.
    entries = [e.strip() for e in value.split(",") if e.strip()]
    parse_rules(entries)
    return ", ".join(entries)


# --- the settings ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """The agent's effective settings, after files, drop-ins, overrides and expansion.

    Build it with `farmnode.config.load_config`; `Config()` holds the raw, unexpanded defaults.
    RAM values are in MB, durations in seconds.
    """

    # HTTP API (farmnode-api.service)
    agent_api_port: int = _setting(50000, _between(1, 65535))
    agent_api_username: str | None = _setting(None, _api_username)
    agent_api_password: str | None = _setting(None, _non_empty, secret=True)
    agent_api_tokens_file: str = _setting("/etc/farmnode/tokens", _absolute_path)
    # Read by systemd for the API (LoadCredential=), like the tokens: a task can never read it.
    agent_api_password_file: str = _setting("/etc/farmnode/api-password", _absolute_path)
    agent_api_read_requires_auth: bool = _setting(False)
    agent_api_output_requires_auth: bool = _setting(True)
    agent_api_trusted_masters: str | Literal["auto"] | None = _setting("auto", _networks)
    agent_api_listen: str | None = _setting(None, _addresses)
    agent_pretty_json: bool = _setting(True)

    # Master
    master: str | None = _setting(None, _host)
    master_api_version: int = _setting(1, _between(1))
    master_api: str | None = _setting("http://$master/api/v$master_api_version", _http_url)
    agent_master_reannounce: float = _setting(120.0, _positive)
    agent_shutdown_timeout: float = _setting(15.0, _positive)
    agent_http_retry_delay: float = _setting(5.0, _positive)
    agent_http_retry_max: float = _setting(300.0, _positive)

    # RAM reporting
    agent_ram_check_interval: float = _setting(30.0, _positive)
    agent_ram_report_delta: int = _setting(100, _non_negative)
    agent_ram_max_report_frequency: float = _setting(10.0, _positive)

    # Host facts ("auto": detect)
    agent_ram: int | Literal["auto"] = _setting("auto", _between(1))
    agent_cpus: float | Literal["auto"] = _setting("auto", _positive)
    agent_hostname: str = _setting("auto", _hostname)
    agent_ip_remote: str | None = _setting(None, _ip_address)
    agent_time_offset: int | Literal["auto"] = _setting("auto")
    agent_ntp_server: str = _setting("pool.ntp.org", _word)
    farm_name: str | None = _setting(None, _non_empty)

    # Agent process
    agent_state_dir: str = _setting("/var/lib/farmnode", _absolute_path)
    agent_runtime_dir: str = _setting("/run/farmnode", _absolute_path)
    agent_log_level: Literal["debug", "info", "warning", "error"] = _setting("info")

    # Tasks (one transient scope per assignment)
    task_slice: str = _setting("farmnode.slice", _slice_name)
    task_default_user: str = _setting("nobody", _user_name)
    task_allow_root: bool = _setting(False, _no_root)
    # Accounts below it are system accounts: tasks run as one only if task_system_users
    # names it ("auto": SYS_UID_MAX + 1 or UID_MIN from /etc/login.defs, else 1000).
    task_min_uid: int | Literal["auto"] = _setting("auto", _between(0))
    task_system_users: str = _setting("nobody", _user_names, listed=True)
    task_ram_headroom: int = _setting(512, _non_negative)
    task_default_ram_max: int | None = _setting(None, _between(1))
    task_memory_high_ratio: float = _setting(0.9, _ratio)
    task_swap_max: int = _setting(0, _non_negative)
    task_tasks_max: int = _setting(4096, _between(1))
    task_io_weight: int = _setting(100, _between(1, 10000))
    task_allowed_cpus: str | None = _setting(None, _cpuset)
    # GPUs a job of a type gets when its job data has no `gpus` ("blender=1, cycles=2")
    task_gpus: str = _setting("", _jobtype_counts, listed=True)
    # Devices every task may open besides its GPUs, on nodes whose tasks are confined to
    # theirs ("/dev/fuse rw")
    task_device_allow: str = _setting("", _device_allow, listed=True)
    task_stop_grace: float = _setting(30.0, _positive)
    # After a task's end, how long its shim waits for a journald that is away before it
    # leaves the output in its spool (journaled by the agent once journald is back)
    task_journal_grace: float = _setting(60.0, _positive)
    # Run before and after each assignment, inside its scope as the job's user (shell words;
    # "" for none); a failing pre-hook fails the assignment with its output as the reason
    task_pre_hook: str = _setting("", _command_line)
    task_post_hook: str = _setting("", _command_line)
    task_max_runtime: float | None = _setting(None, _positive)
    task_accounting_interval: float = _setting(5.0, _positive)
    # How long a finished task's D-Bus object (org.farmnode.Task1) stays, in seconds.
    agent_task_object_retention: float = _setting(600.0, _non_negative)
    # MB of output a task log sent to the master may hold (the rest stays in journald)
    task_log_max_size: int = _setting(64, _between(1))
    node_reserve_ram: int = _setting(1024, _non_negative)

    # Job types
    jobtype_expandvars: bool = _setting(True)
    # PyFarm's agent always ran the master's job types; the code runs only in the task's scope
    # as the job's user, so this is on (it only acts with a master configured).
    jobtype_enable_download: bool = _setting(True)
    jobtype_cache_directory: str = _setting("/var/cache/farmnode/jobtypes", _absolute_path)
    # Path mapping, SOURCE => TARGET, applied to job data and by job types' map_path
    jobtype_path_map: str = _setting("", _path_map, listed=True)

    # Webhooks: task and agent events posted to receivers, queued on disk until they answer
    webhooks: tuple[Webhook, ...] = _setting((), parse_webhooks)
    webhook_queue_max: int = _setting(10000, _between(1))
    webhook_timeout: float = _setting(10.0, _positive)
    webhook_retry_delay: float = _setting(2.0, _positive)
    webhook_retry_max: float = _setting(300.0, _positive)

    # Workstation mode: while a user is at the node (logind), no new work and the running
    # tasks paused ("freeze": systemd's freezer; "cpu-idle": CPUWeight=idle, they run on
    # only when the CPU is otherwise idle), resumed after workstation_idle_time idle.
    workstation_mode: bool = _setting(False)
    workstation_idle_time: float = _setting(600.0, _positive)
    workstation_pause: Literal["freeze", "cpu-idle"] = _setting("freeze")
    # Remote sessions (ssh) are admins and scripts far more often than someone using the
    # machine, and sshd never sets an idle hint: they count only where this says so.
    workstation_remote_sessions: bool = _setting(False)
    # How often sessions that never set an idle hint (text consoles, ssh) are looked at:
    # their activity is their tty's last input, of which logind sends no signal.
    workstation_tty_check_interval: float = _setting(5.0, _positive)
    # Hours of the day the node renders at all ("19:00-07:00, 12:00-13:00"; local time);
    # outside them it takes no work and pauses its tasks as for a user. null: always.
    render_schedule: str | None = _setting(None, canonical_schedule)

    # Health checks (farmnode-health@.service units; farmnode(8), HEALTH CHECKS): a round
    # every health_interval s; the scratch check wants this many MB free where tasks write.
    health_interval: float = _setting(60.0, _positive)
    health_scratch_path: str = _setting("/var/tmp", _absolute_path)
    health_scratch_min_free: int = _setting(1024, _non_negative)


SECRET_KEYS: frozenset[str] = frozenset(
    f.name for f in dataclasses.fields(Config) if f.metadata.get("secret")
)


def redacted(config: Config) -> dict[str, Any]:
    """The config as a plain dict, safe to log or serve (`GET /api/v1/config`)."""
    out = dataclasses.asdict(config)
    for key in SECRET_KEYS:
        if out[key] is not None:
            out[key] = REDACTED
    out["webhooks"] = [w.shown(REDACTED) for w in config.webhooks]
    return out


# --- per-key type descriptions, derived from the annotations ---------------------------------

_TYPE_NAMES: dict[type, str] = {
    bool: "a boolean (true or false)",
    int: "an integer",
    float: "a number",
    str: "a string",
    tuple: "a list",
}


@dataclass(frozen=True)
class Setting:
    """How one key is read: its base type, whether null/"auto" are allowed, its check."""

    name: str
    base: type
    default: Any
    optional: bool = False
    auto: bool = False
    choices: tuple[str, ...] = ()
    check: Check | None = None
    secret: bool = False
    listed: bool = False

    @property
    def expected(self) -> str:
        if self.choices:
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        else:
            text = _TYPE_NAMES[self.base]
        if self.auto:
            text += " or 'auto'"
        if self.optional:
            text += " or null"
        return text

    def coerce(self, value: object, raw: str | None = None) -> Any:
        """Type-check a value parsed from YAML. Raises ValueError.

        `raw` is the source text of a plain scalar: for string keys it is taken as written, so
        `farm_name: 2024` or `agent_api_password: 123456` mean the strings, not numbers.
        """
        if value is None:
            if self.optional:
                return None
            hint = " (YAML reads a bare ~ as null: quote it)" if raw == "~" else ""
            raise ValueError(f"expected {self.expected}, got null{hint}")
        if self.auto and value == "auto":
            return "auto"
        base = self.base
        if base is bool and isinstance(value, bool):
            return value
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if base is float and isinstance(value, int | float) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:
                number = math.inf
            if not math.isfinite(number):
                raise ValueError(f"must be a finite number, got {describe(value)}")
            return number
        if base is tuple and isinstance(value, list):
            return value  # its check makes the typed entries
        if base is str:
            if isinstance(value, str):
                return value
            if self.listed and isinstance(value, list) and all(isinstance(v, str) for v in value):
                return ", ".join(value)
            if raw is not None and not isinstance(value, Mapping | list):
                return raw
        # A URL written where the webhooks' list belongs: its query or userinfo may be a
        # credential, and the error is logged.
        got = describe(masked_url(value) if base is tuple and isinstance(value, str) else value)
        if isinstance(value, bool) and raw is not None and raw.lower() not in ("true", "false"):
            # YAML 1.1 reads yes/no/on/off as booleans; say so rather than echo "true".
            got = f"{raw!r} (YAML reads it as {got})"
        raise ValueError(f"expected {self.expected}, got {got}")

    def validate(self, value: Any) -> Any:
        """Check the value's content (range, syntax). Raises ValueError.

        Run on strings only after `$var` expansion, so that it sees the final text.
        """
        if value is None or (self.auto and value == "auto"):
            return value
        if self.choices:
            for choice in self.choices:
                # Case-insensitive: PyFarm configs spell log levels in capitals.
                if value.lower() == choice:
                    return choice
            raise ValueError(f"expected {self.expected}, got {describe(value)}")
        if self.check is not None:
            return self.check(value)
        return value


def _setting_from_field(f: dataclasses.Field[Any], hint: Any) -> Setting:
    is_union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    args = typing.get_args(hint) if is_union else (hint,)
    base: type | None = None
    optional = auto = False
    choices: tuple[str, ...] = ()
    for arg in args:
        if arg is type(None):
            optional = True
        elif typing.get_origin(arg) is Literal:
            literals = typing.get_args(arg)
            if literals == ("auto",) and len(args) > 1:
                auto = True
            else:
                base, choices = str, tuple(literals)
        elif typing.get_origin(arg) is tuple:
            base = tuple
        else:
            base = arg
    if base not in _TYPE_NAMES:  # pragma: no cover - a programming error in Config
        raise TypeError(f"Config.{f.name}: unsupported annotation {hint!r}")
    assert base is not None
    return Setting(
        name=f.name,
        base=base,
        default=f.default,
        optional=optional,
        auto=auto,
        choices=choices,
        check=f.metadata.get("check"),
        secret=bool(f.metadata.get("secret")),
        listed=bool(f.metadata.get("listed")),
    )


def _build_settings() -> dict[str, Setting]:
    hints = typing.get_type_hints(Config)
    return {f.name: _setting_from_field(f, hints[f.name]) for f in dataclasses.fields(Config)}


SETTINGS: Mapping[str, Setting] = types.MappingProxyType(_build_settings())


# Config keys PatchConfig (org.farmnode.Agent1) may change: those that make sense to change at
# runtime. Everything else changes units, users, paths or credentials and belongs to the
# admin's files. Here, not in the bus interface: the core checks patches against it too.
PATCHABLE_CONFIG_KEYS: tuple[str, ...] = (
    "agent_pretty_json",
    "agent_api_read_requires_auth",
    "agent_api_output_requires_auth",
    "farm_name",
    "agent_log_level",
    "agent_master_reannounce",
    "agent_ram_check_interval",
    "agent_ram_report_delta",
    "agent_ram_max_report_frequency",
    "task_stop_grace",
    "task_journal_grace",
    "jobtype_path_map",
)
