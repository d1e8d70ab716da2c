"""Reading the config: main file, conf.d drop-ins, command-line overrides, then expansion.

Every value keeps the place it came from (file and line, or the command line), so that any
error, even one found only after merging, points at the line to fix.
"""

from __future__ import annotations

import difflib
import grp
import os
import pwd
import re
import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, ScalarNode, SequenceNode

from farmnode.config.model import SETTINGS, Config

DEFAULT_PATH = Path("/etc/farmnode/farmnode.yaml")
COMMAND_LINE = "<command line>"
DEFAULTS = "<defaults>"

_STR_TAG = "tag:yaml.org,2002:str"
_NULL_TAG = "tag:yaml.org,2002:null"


class ConfigError(Exception):
    """A config problem, located: `path:line: message` (line absent for the command line)."""

    def __init__(
        self,
        path: str,
        line: int | None,
        key: str | None,
        message: str,
        column: int | None = None,
    ) -> None:
        super().__init__(path, line, key, message)
        self.path = path
        self.line = line
        self.column = column
        self.key = key
        self.message = message

    def __str__(self) -> str:
        where = self.path
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        return f"{where}: {self.message}"


@dataclass(frozen=True)
class _Origin:
    path: str
    line: int | None = None


@dataclass(frozen=True)
class _Entry:
    key: str
    value: object
    raw: str | None  # source text of a plain scalar, for string keys
    origin: _Origin


def parse_override(argument: str) -> tuple[str, str]:
    """Split a `--set key=value` argument; the value is parsed later, as a YAML scalar."""
    key, sep, value = argument.partition("=")
    if not sep or not key.strip():
        raise ConfigError(COMMAND_LINE, None, None, f"--set expects key=value, got {argument!r}")
    return key.strip(), value


def load_config(
    path: str | Path = DEFAULT_PATH,
    dropin_dir: str | Path | None = None,
    overrides: Mapping[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
    private_secrets: bool = False,
) -> Config:
    """Load the effective config; raises ConfigError.

    Order, later wins: defaults, `path` (may be missing), `dropin_dir/*.yaml` in lexical
    order (default: `conf.d` beside `path`), `overrides` (strings, parsed as YAML scalars).
    Then `$var`/`${var}` in string values expand from `environ` (default: os.environ), then
    from other settings; `$$` is a literal `$`; a leading `~` is the home directory.
    Secrets are never expanded nor substituted into other values: passwords contain `$`.
    `private_secrets` (the agent): a file holding a secret that others can read is an error,
    and so are the credential files (agent_api_tokens_file, agent_api_password_file).
    """
    path = Path(path)
    dropins = Path(dropin_dir) if dropin_dir is not None else path.parent / "conf.d"
    env = os.environ if environ is None else environ

    values: dict[str, Any] = {name: s.default for name, s in SETTINGS.items()}
    origins: dict[str, _Origin] = {name: _Origin(DEFAULTS) for name in SETTINGS}

    for file in _config_files(path, dropins):
        for entry in _parse_file(file):
            _apply(entry, values, origins)
            if private_secrets and SETTINGS[entry.key].secret and entry.value is not None:
                problem = exposure(file)
                if problem:
                    raise ConfigError(str(file), entry.origin.line, entry.key,
                                      f"{entry.key}: this file holds a secret but {problem}; "
                                      "or move it to agent_api_password_file")
    for key, text in (overrides or {}).items():
        _apply(_parse_override_value(key, text), values, origins)

    _expand_all(values, origins, env)

    # The default master_api is a template over $master: with no master it names nothing.
    master_api = values["master_api"]
    if values["master"] is None and isinstance(master_api, str) and _MASTER_REF.search(master_api):
        values["master_api"] = None

    for name, value in values.items():
        if isinstance(value, str):
            values[name] = _checked(name, origins[name], SETTINGS[name].validate, value)

    _cross_check(values, origins)
    if private_secrets:
        for key in ("agent_api_tokens_file", "agent_api_password_file"):
            problem = exposure(Path(values[key]))
            if problem:
                raise ConfigError(values[key], None, key,
                                  f"{key}: {values[key]} holds secrets but {problem}")
        _check_webhook_secrets(values, origins)
    return Config(**values)


def _check_webhook_secrets(values: Mapping[str, Any], origins: Mapping[str, _Origin]) -> None:
    # Only the agent reads them (as root): a missing, empty or readable secret is found at
    # start, not at the first event.
    origin = origins["webhooks"]
    for i, hook in enumerate(values["webhooks"], 1):
        if hook.secret_file is None:
            continue
        where = f"webhooks: entry {i} ({hook.name}): secret_file {hook.secret_file}"
        try:
            secret = Path(hook.secret_file).read_bytes().strip()
        except OSError as e:
            raise ConfigError(origin.path, origin.line, "webhooks",
                              f"{where}: cannot read: {e.strerror}") from None
        if not secret:
            raise ConfigError(origin.path, origin.line, "webhooks", f"{where}: is empty")
        problem = exposure(Path(hook.secret_file))
        if problem:
            raise ConfigError(origin.path, origin.line, "webhooks",
                              f"{where}: holds a secret but {problem}")


# Who besides root may read a file holding a secret: group farmnode (the API's group, that
# no task can be in: farmnode.agent.accounts).
SECRET_GROUP = "farmnode"


def exposure(path: Path) -> str | None:
    """Why others than root (and group farmnode) can read this file, or None (or missing)."""
    try:
        st = path.stat()
    except OSError:
        return None
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    mode = stat.S_IMODE(st.st_mode)
    fix = "chmod 0600, or 0640 with chown root:farmnode"
    where = f"(mode {mode:04o}, {owner}:{group}): {fix}"
    if mode & 0o004:
        return f"everyone can read it {where}"
    if mode & 0o040 and st.st_gid != 0 and group != SECRET_GROUP:
        return f"group {group!r} can read it {where}"
    if st.st_uid != 0 and st.st_uid != os.geteuid():
        return f"user {owner!r} owns it {where}"
    return None


# --- sources --------------------------------------------------------------------------------


def _config_files(path: Path, dropins: Path) -> Iterator[Path]:
    if path.exists() or path.is_symlink():
        yield path
    try:
        candidates = sorted(dropins.iterdir(), key=lambda p: p.name)
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError as e:
        raise ConfigError(str(dropins), None, None, f"cannot read directory: {e.strerror}") from e
    for candidate in candidates:
        # Hidden names are editor and package-manager leftovers; a non-file (e.g. a symlink
        # to /dev/null) masks the drop-in, as in systemd.
        name = candidate.name
        if name.endswith(".yaml") and not name.startswith(".") and candidate.is_file():
            yield candidate


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise ConfigError(str(path), None, None, "is a directory, expected a YAML file") from None
    except OSError as e:
        raise ConfigError(str(path), None, None, f"cannot read: {e.strerror}") from e
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(str(path), line, None, "invalid YAML: not UTF-8 text") from None


def _yaml_error(path: str, error: yaml.YAMLError) -> ConfigError:
    if isinstance(error, yaml.MarkedYAMLError):
        mark = error.problem_mark or error.context_mark
        problem = error.problem or error.context or "syntax error"
        if error.context and error.problem:
            problem = f"{error.problem} ({error.context})"
        if mark is not None:
            return ConfigError(
                path, mark.line + 1, None, f"invalid YAML: {problem}", column=mark.column + 1
            )
        return ConfigError(path, None, None, f"invalid YAML: {problem}")
    return ConfigError(path, None, None, f"invalid YAML: {error}")


def _unknown_key(key: str) -> str:
    close = difflib.get_close_matches(key.lower(), list(SETTINGS), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown key {key!r}{hint}"


def _parse_file(path: Path) -> list[_Entry]:
    name = str(path)
    text = _read_text(path)
    loader = yaml.SafeLoader(text)
    entries: list[_Entry] = []
    try:
        root = loader.get_single_node()
        if root is None or (isinstance(root, ScalarNode) and root.tag == _NULL_TAG):
            return entries  # empty, or only comments
        if not isinstance(root, MappingNode):
            kind = "a list" if isinstance(root, SequenceNode) else "a single value"
            raise ConfigError(
                name,
                root.start_mark.line + 1,
                None,
                f"top level must be a mapping of key: value, got {kind}",
            )
        first_line: dict[str, int] = {}
        for key_node, value_node in root.value:
            line = key_node.start_mark.line + 1
            if not isinstance(key_node, ScalarNode) or key_node.tag != _STR_TAG:
                raise ConfigError(name, line, None, "keys must be setting names")
            key = key_node.value
            if key not in SETTINGS:
                raise ConfigError(name, line, key, _unknown_key(key))
            if key in first_line:
                # YAML would silently keep the last one; in one file that is always a typo.
                raise ConfigError(
                    name, line, key, f"duplicate key {key!r} (first set on line {first_line[key]})"
                )
            first_line[key] = line
            value = loader.construct_object(value_node, deep=True)
            raw = (
                value_node.value
                if isinstance(value_node, ScalarNode) and value_node.style is None
                else None
            )
            entries.append(_Entry(key, value, raw, _Origin(name, line)))
    except yaml.YAMLError as e:
        raise _yaml_error(name, e) from None
    finally:
        loader.dispose()
    return entries


def _parse_override_value(key: str, text: str) -> _Entry:
    if key not in SETTINGS:
        raise ConfigError(COMMAND_LINE, None, key, _unknown_key(key))
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        if SETTINGS[key].base is str:
            # Not YAML but fine as text, e.g. `--set master=[::1]:5000`.
            return _Entry(key, text, None, _Origin(COMMAND_LINE))
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(
            COMMAND_LINE, None, key, f"{key}: cannot parse {text!r}: {problem}"
        ) from None
    if isinstance(value, dict | list):
        if SETTINGS[key].base is str:
            return _Entry(key, text, None, _Origin(COMMAND_LINE))
        raise ConfigError(COMMAND_LINE, None, key, f"{key}: expected a single value, got {text!r}")
    return _Entry(key, value, text.strip(), _Origin(COMMAND_LINE))


def _checked(key: str, origin: _Origin, check: Callable[..., Any], *args: Any) -> Any:
    try:
        return check(*args)
    except ValueError as e:
        raise ConfigError(origin.path, origin.line, key, f"{key}: {e}") from None


def _apply(entry: _Entry, values: dict[str, Any], origins: dict[str, _Origin]) -> None:
    setting = SETTINGS[entry.key]
    value = _checked(entry.key, entry.origin, setting.coerce, entry.value, entry.raw)
    if not isinstance(value, str):
        # Check numbers now, not after merging: a bad value hidden by a later drop-in is still
        # a bug in that file. Strings wait until expansion has produced their final text.
        value = _checked(entry.key, entry.origin, setting.validate, value)
    values[entry.key] = value
    origins[entry.key] = entry.origin


# --- expansion ------------------------------------------------------------------------------

_VAR = re.compile(r"\$(?:(\$)|([A-Za-z_][A-Za-z0-9_]*)|\{([A-Za-z_][A-Za-z0-9_]*)\})")
_MASTER_REF = re.compile(r"\$(?:master(?![A-Za-z0-9_])|\{master\})")


def _as_text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _home(user: str, environ: Mapping[str, str]) -> str | None:
    try:
        if not user:
            return environ.get("HOME") or pwd.getpwuid(os.getuid()).pw_dir
        return pwd.getpwnam(user).pw_dir
    except KeyError:
        return None


def _expand_tilde(text: str, environ: Mapping[str, str]) -> str:
    if not text.startswith("~"):
        return text
    user, sep, rest = text[1:].partition("/")
    home = _home(user, environ)
    if home is None:
        return text  # unknown user: leave it, like the shell
    return home.rstrip("/") + sep + rest if (sep or rest) else home


def _expand_all(
    values: dict[str, Any], origins: Mapping[str, _Origin], environ: Mapping[str, str]
) -> None:
    secret = {name for name, s in SETTINGS.items() if s.secret}
    resolved: dict[str, str] = {}
    stack: list[str] = []

    def lookup(name: str) -> str | None:
        if name in environ:
            return environ[name]
        if name in values and values[name] is not None and name not in secret:
            return resolve(name)
        return None

    def resolve(name: str) -> str:
        if name in resolved:
            return resolved[name]
        if name in stack:
            cycle = " -> ".join(f"${n}" for n in [*stack[stack.index(name) :], name])
            first = stack[stack.index(name)]
            raise ConfigError(
                origins[first].path,
                origins[first].line,
                first,
                f"{first}: variable reference cycle: {cycle}",
            )
        value = values[name]
        if not isinstance(value, str):
            return _as_text(value)
        stack.append(name)
        try:
            text = _VAR.sub(lambda m: _substitute(m, lookup), value)
        finally:
            stack.pop()
        resolved[name] = _expand_tilde(text, environ)
        return resolved[name]

    for name, value in values.items():
        if isinstance(value, str) and name not in secret:
            values[name] = resolve(name)


def _substitute(match: re.Match[str], lookup: Callable[[str], str | None]) -> str:
    if match.group(1):
        return "$"
    found = lookup(match.group(2) or match.group(3))
    return match.group(0) if found is None else found


# --- rules that involve more than one key --------------------------------------------------


def _cross_check(values: Mapping[str, Any], origins: Mapping[str, _Origin]) -> None:
    def fail(key: str, message: str) -> None:
        raise ConfigError(origins[key].path, origins[key].line, key, f"{key}: {message}")

    if values["agent_http_retry_max"] < values["agent_http_retry_delay"]:
        fail(
            "agent_http_retry_max",
            f"must be at least agent_http_retry_delay ({values['agent_http_retry_delay']:g}), "
            f"got {values['agent_http_retry_max']:g}",
        )
    if values["webhook_retry_max"] < values["webhook_retry_delay"]:
        fail("webhook_retry_max",
             f"must be at least webhook_retry_delay ({values['webhook_retry_delay']:g}), "
             f"got {values['webhook_retry_max']:g}")
    if values["task_default_user"] in ("root", "0"):
        fail("task_default_user", "tasks never run as root")
