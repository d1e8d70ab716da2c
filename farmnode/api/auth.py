"""Credentials for the HTTP API: HTTP Basic (PyFarm's agent_api_username/password) and bearer
tokens (one per line in a file only root can read, handed to the service by systemd's
LoadCredential=). Pure functions: the app decides which requests need them.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from dataclasses import dataclass

CHALLENGE = 'Basic realm="farmnode", charset="UTF-8", Bearer realm="farmnode"'
# A browser cannot send a bearer token by itself (an EventSource sends no header of its
# own): one of the tokens is also accepted as the Basic password of this user, so the
# browser's own credential prompt takes it.
TOKEN_USER = "token"


@dataclass(frozen=True)
class Basic:
    username: str
    password: str


@dataclass(frozen=True)
class Bearer:
    token: str


def parse_authorization(header: str | None) -> Basic | Bearer | None:
    """The credentials in an Authorization header; None when absent or malformed."""
    if not header:
        return None
    scheme, _, rest = header.strip().partition(" ")
    rest = rest.strip()
    if not rest:
        return None
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(rest, validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            return None
        username, sep, password = decoded.partition(":")
        return Basic(username, password) if sep else None
    if scheme.lower() == "bearer":
        return Bearer(rest)
    return None


def parse_tokens(text: str) -> frozenset[str]:
    """Token file: one token per line; blank lines and lines starting with # are ignored."""
    tokens = set()
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            tokens.add(line)
    return frozenset(tokens)


def _same(a: str, b: str) -> bool:
    # Constant time: the comparison must not tell an attacker how much of a guess matched.
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


def accepted(creds: Basic | Bearer | None, username: str | None, password: str | None,
             tokens: frozenset[str]) -> bool:
    """Whether the credentials match the configured user/password or one of the tokens
    (as a bearer token, or as the Basic password of TOKEN_USER)."""
    if isinstance(creds, Basic):
        ok = (username is not None and password is not None
              and _same(creds.username, username) & _same(creds.password, password))
        if creds.username == TOKEN_USER:
            ok |= _one_of(creds.password, tokens)
        return ok
    if isinstance(creds, Bearer):
        return _one_of(creds.token, tokens)
    return False


def _one_of(secret: str, tokens: frozenset[str]) -> bool:
    found = False
    for token in tokens:  # no early exit: the time taken does not depend on which matched
        found |= _same(secret, token)
    return found
