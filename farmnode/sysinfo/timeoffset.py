"""How far the local clock is off true time, in seconds (PyFarm's `time_offset`).

Sources, best first (the caller tries them in order and never waits long on any):
systemd-timesyncd's last NTP exchange (read over D-Bus by farmnode.master, parsed here), a
single SNTP query as PyFarm did (`agent_ntp_server`), else 0.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Sequence
from typing import Any

NTP_EPOCH_OFFSET = 2208988800  # seconds from 1900-01-01 to 1970-01-01


def offset_from_timesyncd(message: Sequence[Any]) -> float | None:
    """Offset from timesyncd's NTPMessage property, signature (uuuuittayttttbtt).

    Fields 8..11 are the four NTP timestamps in µs of CLOCK_REALTIME: originate (T1),
    receive (T2), transmit (T3), destination (T4); offset = ((T2-T1) + (T3-T4)) / 2, the
    formula `timedatectl timesync-status` prints. None before the first exchange.
    """
    if len(message) < 12:
        return None
    t1, t2, t3, t4 = (int(message[i]) for i in (8, 9, 10, 11))
    if not (t1 and t2 and t3 and t4):
        return None
    return ((t2 - t1) + (t3 - t4)) / 2 / 1e6


def _ntp_time(data: bytes, offset: int) -> float:
    seconds, fraction = struct.unpack("!II", data[offset:offset + 8])
    return float(seconds - NTP_EPOCH_OFFSET + fraction / 2**32)


class _SNTP(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.answer: asyncio.Future[tuple[bytes, float]] = (
            asyncio.get_running_loop().create_future())

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if not self.answer.done():
            self.answer.set_result((data, time.time()))

    def error_received(self, exc: Exception) -> None:
        if not self.answer.done():
            self.answer.set_exception(exc)


async def sntp_offset(server: str, timeout: float = 2.0, port: int = 123) -> float:
    """One SNTPv4 client exchange (RFC 4330). Raises OSError or TimeoutError."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        infos = await loop.getaddrinfo(server, port, type=socket.SOCK_DGRAM)
        remote = (str(infos[0][4][0]), port)
        transport, proto = await loop.create_datagram_endpoint(_SNTP, remote_addr=remote)
        try:
            t1 = time.time()
            secs = int(t1) + NTP_EPOCH_OFFSET
            frac = int((t1 % 1) * 2**32)
            # LI=0, VN=4, Mode=3 (client); our transmit time goes out as originate.
            packet = bytearray(48)
            packet[0] = (4 << 3) | 3
            packet[40:48] = struct.pack("!II", secs, frac)
            transport.sendto(bytes(packet))
            data, t4 = await proto.answer
        finally:
            transport.close()
    if len(data) < 48 or data[0] & 0x7 not in (4, 5):
        raise OSError(f"{server}: not an NTP server reply")
    t2, t3 = _ntp_time(data, 32), _ntp_time(data, 40)
    return ((t2 - t1) + (t3 - t4)) / 2
