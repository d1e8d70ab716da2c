"""The clock offset to announce: config, else systemd-timesyncd over D-Bus, else SNTP, else 0.

Called in the background after start-up; every source has a short deadline so a node with
no time service and no route to an NTP server still announces (with 0) promptly.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from sdbus import DbusInterfaceCommonAsync, dbus_property_async

from farmnode.config import Config
from farmnode.sysinfo.timeoffset import offset_from_timesyncd, sntp_offset

log = logging.getLogger(__name__)


class _TimeSync1(DbusInterfaceCommonAsync,
                 interface_name="org.freedesktop.timesync1.Manager"):
    @dbus_property_async("(uuuuittayttttbtt)", property_name="NTPMessage")
    def ntp_message(self) -> tuple[Any, ...]:
        raise NotImplementedError


async def timesyncd_offset(timeout: float = 1.0) -> float | None:
    """The offset timesyncd measured at its last exchange; None if it is not running."""
    proxy = _TimeSync1.new_proxy("org.freedesktop.timesync1", "/org/freedesktop/timesync1")
    async with asyncio.timeout(timeout):
        message = await proxy.ntp_message.get_async()
    return offset_from_timesyncd(message)


async def time_offset(config: Config) -> tuple[int, str]:
    """(seconds, source)."""
    if isinstance(config.agent_time_offset, int):
        return config.agent_time_offset, "config"
    try:
        offset = await timesyncd_offset()
        if offset is not None:
            return round(offset), "systemd-timesyncd"
    except Exception as exc:  # not installed, not running, no bus
        log.debug("timesyncd offset unavailable: %s", exc)
    try:
        return round(await sntp_offset(config.agent_ntp_server)), f"ntp {config.agent_ntp_server}"
    except (OSError, TimeoutError) as exc:
        log.info("time offset unknown (%s: %s): announcing 0", config.agent_ntp_server, exc)
    return 0, "none"
