"""Who a task may run as.

A task never runs as uid 0, never with group 0 among its groups (primary or supplementary,
as `os.getgrouplist` gives them), and never as an account that controls farmnode: the HTTP
API's account (it reads the API's credentials), group `farmnode`, and every user and group
the installed D-Bus policy lets call the agent (`<policy user=|group=>` allowing
org.farmnode.Agent1: a task in such a group could disable the node or patch its config).
System accounts (uid below `task_min_uid`, and the kernel's overflow account `nobody`) run
tasks only when `task_system_users` names them: a daemon's account owns that daemon's files.

`lookup` is the one place accounts are read (NSS through pwd/grp, so LDAP and sssd users
count); `refusal` applies the rule to what it found.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import pwd
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

BUS_NAME = "org.farmnode.Agent1"
# Where dbus-daemon reads the system bus's policy (dbus-daemon(1), system.conf).
BUS_POLICY_DIRS = (Path("/usr/share/dbus-1/system.d"), Path("/etc/dbus-1/system.d"))
BUS_POLICY_FILES = (Path("/etc/dbus-1/system-local.conf"),)
# The package's own accounts (packaging/farmnode.sysusers, farmnode-api.service's User=).
API_USER = "farmnode-api"
CONTROL_GROUP = "farmnode"
LOGIN_DEFS = Path("/etc/login.defs")
OVERFLOW_UID = Path("/proc/sys/kernel/overflowuid")
DEFAULT_MIN_UID = 1000


class Nss(Protocol):
    """What `lookup` reads: the pwd/grp/os functions (tests hand in their own tables)."""

    def getpwnam(self, name: str) -> pwd.struct_passwd: ...

    def getpwuid(self, uid: int) -> pwd.struct_passwd: ...

    def getgrnam(self, name: str) -> grp.struct_group: ...

    def getgrgid(self, gid: int) -> grp.struct_group: ...

    def getgrouplist(self, user: str, group: int) -> list[int]: ...


class SystemNss:
    getpwnam = staticmethod(pwd.getpwnam)
    getpwuid = staticmethod(pwd.getpwuid)
    getgrnam = staticmethod(grp.getgrnam)
    getgrgid = staticmethod(grp.getgrgid)
    getgrouplist = staticmethod(os.getgrouplist)


SYSTEM_NSS = SystemNss()


class UnknownAccount(Exception):
    """The user or group does not exist on this node."""


@dataclass(frozen=True)
class Account:
    user: str
    uid: int
    gid: int  # the group the task runs in (the account's primary group unless one is named)
    groups: tuple[int, ...]  # every group the task will hold, gid included
    home: str


@dataclass(frozen=True)
class Controller:
    name: str  # user or group name
    why: str  # what makes it control farmnode


@dataclass(frozen=True)
class Controllers:
    users: tuple[Controller, ...]
    groups: tuple[Controller, ...]


@dataclass(frozen=True)
class TaskUserRules:
    min_uid: int
    system_users: frozenset[str]
    controllers: Controllers
    overflow_uid: int = 65534


def lookup(user: str, group: str | None = None, nss: Nss = SYSTEM_NSS) -> Account:
    """The account a task would run as; names or numeric ids, as CommandData has them."""
    try:
        pw = nss.getpwuid(int(user)) if user.isdigit() else nss.getpwnam(user)
    except KeyError:
        raise UnknownAccount(f"user {user!r} does not exist on this node") from None
    gid = pw.pw_gid
    if group:
        try:
            gid = (nss.getgrgid(int(group)) if group.isdigit() else nss.getgrnam(group)).gr_gid
        except KeyError:
            raise UnknownAccount(f"group {group!r} does not exist on this node") from None
    groups = tuple(dict.fromkeys([gid, *nss.getgrouplist(pw.pw_name, gid)]))
    return Account(pw.pw_name, pw.pw_uid, gid, groups, pw.pw_dir)


def _group_name(gid: int, nss: Nss) -> str:
    try:
        return nss.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _gids(names: Iterable[Controller], nss: Nss) -> dict[int, Controller]:
    out: dict[int, Controller] = {}
    for c in names:
        with contextlib.suppress(KeyError):
            out.setdefault(nss.getgrnam(c.name).gr_gid, c)
    return out


def refusal(account: Account, rules: TaskUserRules, nss: Nss = SYSTEM_NSS) -> str | None:
    """Why a task may not run as this account (the rule, naming user and group), or None."""
    who = repr(account.user)
    if account.uid == 0:
        return f"refusing to run as {who}: uid 0 (tasks never run as root)"
    if 0 in account.groups:
        return (f"refusing to run as {who}: a member of group {_group_name(0, nss)!r} (gid 0; "
                "tasks never run in group 0)")
    for c in rules.controllers.users:
        if c.name == account.user:
            return f"refusing to run as {who}: it controls farmnode ({c.why})"
        with contextlib.suppress(KeyError):
            if nss.getpwnam(c.name).pw_uid == account.uid:
                return f"refusing to run as {who}: its uid is {c.name!r}'s ({c.why})"
    controlling = _gids(rules.controllers.groups, nss)
    for gid in account.groups:
        if gid in controlling:
            c = controlling[gid]
            return (f"refusing to run as {who}: a member of group {c.name!r}, which controls "
                    f"farmnode ({c.why})")
    system = account.uid < rules.min_uid or account.uid == rules.overflow_uid
    if system and account.user not in rules.system_users:
        return (f"refusing to run as {who}: a system account (uid {account.uid}; below "
                f"task_min_uid {rules.min_uid} or the overflow uid); list it in "
                "task_system_users to allow it")
    return None


# --- who controls farmnode --------------------------------------------------------------------


def bus_policy_controllers(files: Iterable[Path]) -> Controllers:
    """Users and groups the D-Bus policy lets call or own org.farmnode.Agent1 beyond what
    everyone may (the default context: read-only calls); unreadable files are skipped."""
    users: list[Controller] = []
    groups: list[Controller] = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if BUS_NAME not in text:
            continue
        try:
            root = ET.fromstring(text)
        except ET.ParseError as exc:
            log.warning("%s: not a readable D-Bus policy: %s", path, exc)
            continue
        for policy in root.iter("policy"):
            grants = any(
                a.get("send_destination") in (BUS_NAME, "*") or a.get("own") == BUS_NAME
                for a in policy.iter("allow"))
            if not grants:
                continue
            why = f"D-Bus policy {path}"
            if policy.get("user") and policy.get("user") != "*":
                users.append(Controller(str(policy.get("user")), why))
            if policy.get("group") and policy.get("group") != "*":
                groups.append(Controller(str(policy.get("group")), why))
    return Controllers(tuple(users), tuple(groups))


def bus_policy_files() -> list[Path]:
    files: list[Path] = []
    for d in BUS_POLICY_DIRS:
        with contextlib.suppress(OSError):
            files += sorted(p for p in d.iterdir() if p.suffix == ".conf")
    return files + [p for p in BUS_POLICY_FILES if p.exists()]


def controllers(policy_files: Iterable[Path] | None = None, nss: Nss = SYSTEM_NSS) -> Controllers:
    """The package's accounts, the bus policy's, and each controlling user's primary group."""
    bus = bus_policy_controllers(bus_policy_files() if policy_files is None else policy_files)
    users = (Controller(API_USER, "the HTTP API's account: it reads the API's credentials"),
             *bus.users)
    groups = [Controller(CONTROL_GROUP, "members may call every method of the agent"),
              *bus.groups]
    for u in users:
        with contextlib.suppress(KeyError):
            pw = nss.getpwnam(u.name)
            groups.append(Controller(_group_name(pw.pw_gid, nss),
                                     f"the primary group of {u.name!r}, {u.why}"))
    return Controllers(users, tuple(groups))


# --- the uid floor ------------------------------------------------------------------------------


def login_defs_min_uid(text: str) -> int:
    """The first uid of a regular account: SYS_UID_MAX + 1, else UID_MIN (login.defs(5))."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        m = re.fullmatch(r"\s*(SYS_UID_MAX|UID_MIN)\s+(\d+)\s*(#.*)?", line)
        if m:
            values[m.group(1)] = int(m.group(2))
    if "SYS_UID_MAX" in values:
        return values["SYS_UID_MAX"] + 1
    return values.get("UID_MIN", DEFAULT_MIN_UID)


def default_min_uid() -> int:
    try:
        return login_defs_min_uid(LOGIN_DEFS.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return DEFAULT_MIN_UID


def overflow_uid() -> int:
    try:
        return int(OVERFLOW_UID.read_text().strip())
    except (OSError, ValueError):
        return 65534


def rules_for(min_uid: int | str, system_users: str, nss: Nss = SYSTEM_NSS,
              policy_files: Iterable[Path] | None = None) -> TaskUserRules:
    """The rules from the config's task_min_uid ("auto": login.defs) and task_system_users."""
    floor = default_min_uid() if min_uid == "auto" else int(min_uid)
    names = frozenset(n for n in system_users.replace(",", " ").split() if n)
    return TaskUserRules(floor, names, controllers(policy_files, nss), overflow_uid())
