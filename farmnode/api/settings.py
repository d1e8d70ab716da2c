"""What the API needs from the configuration, read from the same files as the agent.

The API reads its settings itself rather than over D-Bus because the agent redacts the
password. It keeps no state: the settings are re-read whenever a file's mtime or size changes
(a cache, so a PATCH of agent_pretty_json or agent_api_*_requires_auth applies at once).
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from farmnode.api.auth import parse_tokens
from farmnode.config import ConfigError, load_config

CONFIG_PATH = Path(os.environ.get("FARMNODE_CONFIG", "/etc/farmnode/farmnode.yaml"))
# LoadCredential=tokens:<agent_api_tokens_file> in farmnode-api.service (the generator writes
# it): the file stays root-only and systemd hands this service a private copy.
TOKENS_CREDENTIAL = "tokens"
# LoadCredential=api-password:<agent_api_password_file>, the same way: no task can read it.
PASSWORD_CREDENTIAL = "api-password"


@dataclass(frozen=True)
class ApiSettings:
    username: str | None = None
    password: str | None = None
    tokens: frozenset[str] = frozenset()
    read_requires_auth: bool = False
    output_requires_auth: bool = True
    pretty: bool = True
    error: str | None = None  # the config could not be read: refuse what needs it

    @property
    def has_credentials(self) -> bool:
        return bool(self.tokens) or (self.username is not None and self.password is not None)


def _credential_path(name: str, configured: str) -> Path:
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds and (Path(creds) / name).exists():
        return Path(creds) / name
    return Path(configured)


def _watched(*configured: str) -> list[Path]:
    """Every file a credential may come from: a change to any one re-reads the settings."""
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    paths = [Path(p) for p in configured]
    if creds:
        paths += [Path(creds) / TOKENS_CREDENTIAL, Path(creds) / PASSWORD_CREDENTIAL]
    return paths


def _read_password(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None  # missing or unreadable: agent_api_password, if any, applies
    # One line; the newline `echo` or an editor adds is not part of the password.
    password = text.removesuffix("\n").removesuffix("\r")
    return password or None


def _stamp(paths: list[Path]) -> tuple[tuple[str, int, int], ...]:
    out = []
    for p in paths:
        try:
            st = p.stat()
            out.append((str(p), st.st_mtime_ns, st.st_size))
        except OSError:
            out.append((str(p), -1, -1))
    return tuple(out)


def _config_files(path: Path) -> list[Path]:
    files = [path]
    with contextlib.suppress(OSError):
        files += sorted(p for p in (path.parent / "conf.d").iterdir() if p.suffix == ".yaml")
    return files


def _load(path: Path) -> tuple[ApiSettings, list[Path]]:
    try:
        config = load_config(path)
    except ConfigError as exc:
        return ApiSettings(error=f"configuration error: {exc}"), []
    tokens_path = _credential_path(TOKENS_CREDENTIAL, config.agent_api_tokens_file)
    try:
        tokens = parse_tokens(tokens_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        # Missing or unreadable: no tokens (Basic auth may still be configured).
        tokens = frozenset()
    password_path = _credential_path(PASSWORD_CREDENTIAL, config.agent_api_password_file)
    password = _read_password(password_path) or config.agent_api_password
    return ApiSettings(
        username=config.agent_api_username,
        password=password,
        tokens=tokens,
        read_requires_auth=config.agent_api_read_requires_auth,
        output_requires_auth=config.agent_api_output_requires_auth,
        pretty=config.agent_pretty_json,
    ), _watched(config.agent_api_tokens_file, config.agent_api_password_file)


class _Cache:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: object = None
        self._value = ApiSettings()
        self._credentials: list[Path] = []

    def get(self, path: Path) -> ApiSettings:
        with self._lock:
            config_stamp = _stamp(_config_files(path))
            if (config_stamp, _stamp(self._credentials)) != self._key:
                # Stamps taken before reading: a file changed meanwhile is re-read next time.
                self._value, self._credentials = _load(path)
                self._key = (config_stamp, _stamp(self._credentials))
            return self._value


_cache = _Cache()


def current(path: Path | None = None) -> ApiSettings:
    return _cache.get(path or CONFIG_PATH)
