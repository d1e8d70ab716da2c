"""Which peers may call PyFarm's endpoints of the HTTP API without credentials.

PyFarm's master cannot authenticate: it calls `http://<node>:<port>/api/v1/...` with no
header of any kind. The node trusts it by the one thing a client cannot choose freely on a
TCP connection it completes, the peer address (never a header, never the User-Agent).
`agent_api_trusted_masters` lists addresses or networks; "auto" (the default) means the
addresses `master` resolves to, which the agent resolves (the API service has no network and
cannot) and publishes as the TrustedMasters property of org.farmnode.Agent1.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import urllib.parse
from collections.abc import Iterable

log = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# How often the agent resolves `master` again (a master moved to a new address is trusted
# within this long), and how soon after a failed lookup.
REFRESH = 60.0
RETRY = 5.0
RESOLVE_TIMEOUT = 2.0


def parse_networks(text: str) -> list[Network]:
    """'10.0.0.5, 192.168.1.0/24 fd00::/8' → networks (commas or spaces separate).
    Raises ValueError naming the first item that is neither an address nor a network."""
    out: list[Network] = []
    for item in text.replace(",", " ").split():
        try:
            out.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or network") from None
    return out


def normalise(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A peer address as the socket gave it; a dual-stack socket shows IPv4 peers as
    ::ffff:a.b.c.d, which is the IPv4 peer. None for anything that is not an address (a
    Unix socket's peer)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def peer_trusted(peer: str | None, networks: Iterable[Network]) -> bool:
    ip = normalise(peer or "")
    if ip is None:
        return False
    return any(ip.version == net.version and ip in net for net in networks)


def master_host(master_api: str | None) -> str | None:
    if not master_api:
        return None
    return urllib.parse.urlsplit(master_api).hostname


async def resolve(host: str, timeout: float = RESOLVE_TIMEOUT) -> list[Network]:
    """Every address `host` resolves to, as single-address networks."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    seen: dict[str, Network] = {}
    for info in infos:
        ip = normalise(str(info[4][0]))
        if ip is not None:
            seen.setdefault(str(ip), ipaddress.ip_network(ip))
    return list(seen.values())


class TrustedMasters:
    """The agent's view: configured networks, or those of `master`, kept fresh."""

    def __init__(self, setting: str | None, master_api: str | None) -> None:
        self._auto = setting == "auto"
        self._host = master_host(master_api) if self._auto else None
        self.networks: list[Network] = [] if self._auto or setting is None \
            else parse_networks(setting)
        self._task: asyncio.Task[None] | None = None

    @property
    def needs_resolving(self) -> bool:
        return self._host is not None

    def as_strings(self) -> list[str]:
        return [str(n) for n in self.networks]

    async def refresh(self) -> bool:
        if self._host is None:
            return True
        try:
            found = await resolve(self._host)
        except (OSError, TimeoutError) as exc:
            # Keep what was known: a DNS hiccup must not lock the master out.
            log.warning("could not resolve the master %s (%s); trusting %s", self._host,
                        exc, self.as_strings() or "no address")
            return False
        if [str(n) for n in found] != self.as_strings():
            log.info("trusting the master's addresses %s (%s)", [str(n) for n in found],
                     self._host)
        self.networks = found
        return True

    def start(self) -> None:
        if self._host is not None and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(),
                                                                name="trusted-masters")

    async def _run(self) -> None:
        while True:
            ok = await self.refresh()
            await asyncio.sleep(REFRESH if ok else RETRY)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
