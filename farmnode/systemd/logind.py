"""systemd-logind over D-Bus: the node's sessions as typed snapshots, and its change signals.

org.freedesktop.login1 is the only source: which sessions exist, whether each is in front on
its seat (Active), remote, and idle (IdleHint/IdleSinceHint, which logind computes from the
tty's last input for text sessions). The signals say when to look again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sdbus import DbusInterfaceCommonAsync, SdBus, dbus_method_async
from sdbus.dbus_exceptions import DbusFailedError
from sdbus.exceptions import SdBusUnmappedMessageError

log = logging.getLogger(__name__)

LOGIND = "org.freedesktop.login1"
LOGIND_PATH = "/org/freedesktop/login1"
MANAGER_IFACE = "org.freedesktop.login1.Manager"
SESSION_IFACE = "org.freedesktop.login1.Session"
SESSION_PATHS = "/org/freedesktop/login1/session/"
GRAPHICAL = frozenset({"x11", "wayland", "mir"})


class LoginManagerProxy(DbusInterfaceCommonAsync, interface_name=MANAGER_IFACE):
    @dbus_method_async(result_signature="a(susso)")
    async def list_sessions(self) -> list[tuple[str, int, str, str, str]]:
        raise NotImplementedError


class SessionProxy(DbusInterfaceCommonAsync, interface_name=SESSION_IFACE):
    pass


@dataclass(frozen=True)
class Session:
    """One logind session as read at one moment."""

    id: str
    user: str
    uid: int
    seat: str  # "" for a session on no seat (ssh, a PAM service)
    tty: str
    type: str  # tty, x11, wayland, mir, unspecified
    session_class: str  # user, greeter, lock-screen, background, manager
    remote: bool
    remote_host: str
    active: bool  # in front on its seat (always true on no seat)
    state: str  # online, active, closing
    idle_hint: bool
    idle_since: float  # s since the epoch: when the hint last changed, or the tty's input

    @property
    def graphical(self) -> bool:
        return self.type in GRAPHICAL

    def describe(self) -> str:
        where = ", ".join(x for x in (self.type, self.seat or self.tty,
                                      f"from {self.remote_host}" if self.remote else "") if x)
        return f"{self.user}'s session {self.id} ({where})"

    @classmethod
    def of(cls, sid: str, props: dict[str, Any]) -> Session:
        def text(name: str) -> str:
            value = props.get(name, "")
            return value if isinstance(value, str) else ""

        seat = props.get("Seat", ("", ""))
        user = props.get("User", (0, ""))
        return cls(
            id=sid, user=text("Name"), uid=int(user[0]) if isinstance(user, tuple) else 0,
            seat=seat[0] if isinstance(seat, tuple) else "", tty=text("TTY"),
            type=text("Type"), session_class=text("Class"),
            remote=bool(props.get("Remote", False)), remote_host=text("RemoteHost"),
            active=bool(props.get("Active", False)), state=text("State"),
            idle_hint=bool(props.get("IdleHint", False)),
            idle_since=int(props.get("IdleSinceHint", 0) or 0) / 1e6)


async def sessions(bus: SdBus) -> list[Session]:
    """Every session logind has now; one that closes while it is read is left out."""
    manager = LoginManagerProxy.new_proxy(LOGIND, LOGIND_PATH, bus)
    out = []
    for sid, _uid, _user, _seat, path in await manager.list_sessions():
        proxy = SessionProxy.new_proxy(LOGIND, path, bus)
        try:
            # One GetAll of the Session interface (the public helper asks every interface).
            raw = await proxy._properties_get_all(SESSION_IFACE)
        except (DbusFailedError, SdBusUnmappedMessageError) as exc:
            log.debug("session %s went while being read: %s", sid, exc)
            continue
        out.append(Session.of(sid, {name: value for name, (_sig, value) in raw.items()}))
    return out


async def watch(bus: SdBus, changed: Callable[[], None]) -> list[Any]:
    """Call `changed` on every logind signal that can change a verdict: a session new or
    removed, a session's properties (Active, IdleHint, State) changed. Returns the match
    slots; dropping them ends the watch."""

    def on_properties(message: Any) -> None:
        if str(message.path).startswith(SESSION_PATHS):
            changed()

    def on_any(_message: Any) -> None:
        changed()

    return [
        await bus.match_signal_async(LOGIND, None, "org.freedesktop.DBus.Properties",
                                     "PropertiesChanged", on_properties),
        await bus.match_signal_async(LOGIND, LOGIND_PATH, MANAGER_IFACE, "SessionNew", on_any),
        await bus.match_signal_async(LOGIND, LOGIND_PATH, MANAGER_IFACE, "SessionRemoved",
                                     on_any),
    ]
