"""The `webhooks` setting: what one entry is (`Webhook`) and how a YAML list becomes them.

An entry names the events it wants (glob patterns over `task.<state>` and `agent.<state>`),
the URL they are posted to, and optionally a file holding the secret that signs each body.
The secret itself is never in the config: the API reads the same files unprivileged, and
only the agent (root) needs the secret, so it reads the file (which must be private).
"""

from __future__ import annotations

import fnmatch
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from farmnode.describe import describe

# The first part of every event name; a pattern must be able to match one of them, so a
# typo ("tsak.*") is refused instead of silently matching nothing.
EVENT_KINDS = ("task", "agent")
_KEYS = ("url", "events", "secret_file")


MASK = "***"


def masked_url(url: str) -> str:
    """The URL with its userinfo, query and fragment each replaced by `***`
    (`https://***@hooks.example/path?***`): for repr, log lines and error messages, which
    must not carry a receiver's credentials. Plain string work, so a URL too broken to
    parse is masked as well."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    cut = [i for i in (rest.find(c) for c in "/?#") if i >= 0]
    end = min(cut, default=len(rest))
    authority, tail = rest[:end], rest[end:]
    if "@" in authority:
        authority = f"{MASK}@{authority.rsplit('@', 1)[1]}"
    tail, hashed, _ = tail.partition("#")
    path, queried, _ = tail.partition("?")
    return (f"{scheme}{sep}{authority}{path}" + (f"?{MASK}" if queried else "")
            + (f"#{MASK}" if hashed else ""))


@dataclass(frozen=True, repr=False)
class Webhook:
    url: str
    events: tuple[str, ...] = ("*",)
    secret_file: str | None = None

    def __repr__(self) -> str:
        # A Config's repr ends up in log lines and tracebacks.
        return (f"Webhook(url={masked_url(self.url)!r}, events={self.events!r}, "
                f"secret_file={self.secret_file!r})")

    def wants(self, event: str) -> bool:
        return any(fnmatch.fnmatchcase(event, p) for p in self.events)

    @property
    def origin(self) -> str:
        u = urllib.parse.urlsplit(self.url)
        host = u.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{u.port}" if u.port is not None else ""
        return f"{u.scheme}://{host}{port}"

    @property
    def name(self) -> str:
        """The URL without its query (tokens often live there): for the agent's log lines,
        which only root and the journal's readers see."""
        return self.origin + urllib.parse.urlsplit(self.url).path

    def shown(self, mask: str) -> dict[str, Any]:
        """The entry as GetConfig and GET /api/v1/config show it: many services put the
        receiver's token in the URL's path or query, so only scheme, host and port show."""
        u = urllib.parse.urlsplit(self.url)
        hidden = u.path not in ("", "/") or bool(u.query)
        return {"url": self.origin + (f"/{mask}" if hidden else u.path),
                "events": list(self.events), "secret_file": self.secret_file}


def _url(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"url must be a non-empty string, got {describe(value)}")
    if any(c.isspace() or not c.isprintable() for c in value):
        raise ValueError(f"url must not contain whitespace or control characters, got "
                         f"{masked_url(value)!r}")
    if not value.isascii():
        # It goes into the request line and Host header as it is.
        raise ValueError(f"url must be ASCII (a host as punycode, xn--…; a path "
                         f"percent-encoded), got {masked_url(value)!r}")
    try:
        u = urllib.parse.urlsplit(value)
        u.port  # noqa: B018 - raises ValueError for a port out of range or not a number
    except ValueError as exc:
        raise ValueError(f"url {masked_url(value)!r} is not a valid URL: {exc}") from None
    if u.scheme not in ("http", "https"):
        raise ValueError(f"url must be an http:// or https:// URL, got "
                         f"{masked_url(value)!r}")
    if not u.hostname:
        raise ValueError(f"url {masked_url(value)!r} names no host")
    if u.username is not None or u.password is not None:
        raise ValueError(f"url {u.scheme}://…@{u.hostname} must not carry credentials: "
                         "use secret_file to sign the body instead")
    return value


def _pattern(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"each event pattern must be a non-empty string, got {describe(value)}")
    kind = value.split(".", 1)[0]
    if not any(fnmatch.fnmatchcase(k, kind) for k in EVENT_KINDS):
        raise ValueError(f"event pattern {value!r} matches no event: events are task.<state> "
                         "and agent.<state> (e.g. 'task.*', 'task.failed', 'agent.*', '*')")
    return value


def _events(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return (_pattern(value),)
    if isinstance(value, list) and value:
        return tuple(_pattern(v) for v in value)
    raise ValueError(f"events must be a pattern or a non-empty list of patterns, got "
                     f"{describe(value)}")


def _secret_file(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.startswith("/"):
        raise ValueError(f"secret_file must be an absolute path, got {describe(value)}")
    return value


def _what(value: object) -> str:
    # a URL written where an entry or the list belongs is named without its secrets
    return describe(masked_url(value) if isinstance(value, str) else value)


def parse_webhooks(value: Any) -> tuple[Webhook, ...]:
    """The `webhooks` list (as YAML gave it) → Webhooks; ValueError names the entry."""
    if isinstance(value, tuple) and all(isinstance(w, Webhook) for w in value):
        return value  # already parsed (a Config built from another's values)
    if not isinstance(value, list):
        raise ValueError(f"expected a list of webhooks, got {_what(value)}")
    out: list[Webhook] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(value, 1):
        where = f"entry {i}"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where}: expected a mapping with url and events, got "
                             f"{_what(entry)}")
        unknown = [str(k) for k in entry if k not in _KEYS]
        if unknown:
            raise ValueError(f"{where}: unknown key {unknown[0]!r} (a webhook has "
                             f"{', '.join(_KEYS)})")
        if "url" not in entry:
            raise ValueError(f"{where}: url is missing")
        try:
            url = _url(entry["url"])
            hook = Webhook(url=url, events=_events(entry.get("events", "*")),
                           secret_file=_secret_file(entry.get("secret_file")))
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        if url in seen:
            # The URL is the queue's name for the webhook: two entries would share one queue.
            raise ValueError(f"{where}: url {hook.name} is already entry {seen[url]}; "
                             "list every pattern in one entry's events")
        seen[url] = i
        out.append(hook)
    return tuple(out)
