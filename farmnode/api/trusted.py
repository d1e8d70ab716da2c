"""The API's copy of the agent's TrustedMasters (farmnode.master.trust explains the rule).

The API runs with PrivateNetwork=yes and AF_UNIX only: it cannot resolve `master` itself, so
it asks the agent, and keeps the answer for a few seconds (the master polls every few seconds;
one D-Bus round trip per request would double the cost of each).
"""

from __future__ import annotations

import logging
import threading
import time

from farmnode.api import client
from farmnode.master.trust import Network, parse_networks, peer_trusted

log = logging.getLogger("farmnode.api")

TTL = 5.0


class _Cache:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._networks: list[Network] = []
        self._at = -TTL

    def networks(self) -> list[Network]:
        with self._lock:
            if time.monotonic() - self._at < TTL:
                return self._networks
        try:
            found = client.call(lambda agent: agent.trusted_masters.get_async())
            networks = parse_networks(" ".join(found))
        except Exception as exc:
            # No answer: trust no one for now (credentials still work), ask again next time.
            log.warning("could not read the agent's trusted masters: %s", exc)
            return []
        with self._lock:
            self._networks, self._at = networks, time.monotonic()
        return networks

    def clear(self) -> None:
        with self._lock:
            self._networks, self._at = [], -TTL


_cache = _Cache()


def trusted(peer: str | None) -> bool:
    """Whether a request from this peer address comes from a trusted master."""
    if not peer:
        return False
    return peer_trusted(peer, _cache.networks())


def clear() -> None:
    _cache.clear()
