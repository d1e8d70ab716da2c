"""Who a task may run as (farmnode.agent.accounts), account by account.

Accounts are read by the real `lookup` through pwd/grp: the host's own root, daemon and
nobody, and, for the accounts only a farmnode node has, a table of the same pwd/grp records
(struct_passwd, struct_group) with glibc's getgrouplist rule (primary group plus every group
listing the user). The system tier repeats this with real accounts created in the container.
"""

from __future__ import annotations

import grp
import pwd
from pathlib import Path

import pytest

from farmnode.agent import accounts
from farmnode.agent.accounts import Account, lookup, refusal, rules_for
from farmnode.agent.runsetup import TaskSetupError, resolve_identity
from farmnode.config import Config
from farmnode.jobtypes.base import CommandData

REPO = Path(__file__).resolve().parents[1]
POLICY = REPO / "dbus" / "org.farmnode.Agent1.conf"


class Tables:
    """pwd/grp records of a farmnode node, served like NSS."""

    def __init__(self, users: list[tuple[str, int, int]],
                 groups: list[tuple[str, int, list[str]]]) -> None:
        self.users = [pwd.struct_passwd((n, "x", uid, gid, "", f"/home/{n}", "/bin/sh"))
                      for n, uid, gid in users]
        self.groups = [grp.struct_group((n, "x", gid, members)) for n, gid, members in groups]

    def getpwnam(self, name: str) -> pwd.struct_passwd:
        for u in self.users:
            if u.pw_name == name:
                return u
        raise KeyError(name)

    def getpwuid(self, uid: int) -> pwd.struct_passwd:
        for u in self.users:
            if u.pw_uid == uid:
                return u
        raise KeyError(uid)

    def getgrnam(self, name: str) -> grp.struct_group:
        for g in self.groups:
            if g.gr_name == name:
                return g
        raise KeyError(name)

    def getgrgid(self, gid: int) -> grp.struct_group:
        for g in self.groups:
            if g.gr_gid == gid:
                return g
        raise KeyError(gid)

    def getgrouplist(self, user: str, group: int) -> list[int]:
        return [group, *(g.gr_gid for g in self.groups if user in g.gr_mem and g.gr_gid != group)]


NODE = Tables(
    users=[("root", 0, 0), ("daemon", 1, 1), ("render", 998, 998), ("farmnode-api", 997, 996),
           ("jdoe", 1000, 1000), ("artist", 1001, 1001), ("wheelie", 1002, 1002),
           ("wrangler", 1003, 1003), ("nobody", 65534, 65534), ("ldap", 200001, 1000)],
    groups=[("root", 0, ["wheelie"]), ("daemon", 1, []), ("render", 998, []),
            ("farmnode", 996, ["artist"]), ("jdoe", 1000, []), ("artist", 1001, []),
            ("wheelie", 1002, []), ("wrangler", 1003, []), ("wranglers", 1100, ["wrangler"]),
            ("nogroup", 65534, []), ("video", 44, ["jdoe"])])


def rules(tmp_path: Path, system_users: str = "nobody", min_uid: int | str = 1000,
          extra_policy: str = "") -> accounts.TaskUserRules:
    files = [POLICY]
    if extra_policy:
        (tmp_path / "wranglers.conf").write_text(extra_policy)
        files.append(tmp_path / "wranglers.conf")
    return rules_for(min_uid, system_users, NODE, files)


def why(name: str, r: accounts.TaskUserRules, group: str | None = None) -> str | None:
    return refusal(lookup(name, group, NODE), r, NODE)


WRANGLERS = """<busconfig><policy group="wranglers">
  <allow send_destination="org.farmnode.Agent1"/></policy></busconfig>"""


def test_regular_accounts_run(tmp_path: Path) -> None:
    r = rules(tmp_path)
    assert why("jdoe", r) is None  # supplementary group video is fine
    assert why("ldap", r) is None  # directory accounts far above the floor
    assert lookup("jdoe", None, NODE) == Account("jdoe", 1000, 1000, (1000, 44), "/home/jdoe")
    assert lookup("1000", "44", NODE).gid == 44  # numeric names, as CommandData allows


def test_root_and_group_zero_never_run(tmp_path: Path) -> None:
    r = rules(tmp_path, system_users="root nobody wheelie", min_uid=0)
    assert why("root", r) == "refusing to run as 'root': uid 0 (tasks never run as root)"
    assert why("wheelie", r) == ("refusing to run as 'wheelie': a member of group 'root' (gid "
                                 "0; tasks never run in group 0)")  # supplementary only
    assert why("jdoe", r, group="root") is not None  # nor by naming the group


def test_accounts_that_control_farmnode_never_run(tmp_path: Path) -> None:
    r = rules(tmp_path, system_users="nobody farmnode-api", extra_policy=WRANGLERS)
    api = why("farmnode-api", r)
    assert api is not None and api.startswith("refusing to run as 'farmnode-api': it controls "
                                              "farmnode (the HTTP API's account")
    artist = why("artist", r)  # group farmnode, supplementary
    assert artist is not None and "a member of group 'farmnode', which controls" in artist
    wrangler = why("wrangler", r)  # a group an admin's own bus policy lets call the agent
    assert wrangler is not None and "'wranglers'" in wrangler
    assert "wranglers.conf" in wrangler
    assert why("jdoe", r, group="farmnode") is not None


def test_system_accounts_run_only_when_listed(tmp_path: Path) -> None:
    r = rules(tmp_path, system_users="")
    assert why("daemon", r) == (
        "refusing to run as 'daemon': a system account (uid 1; below task_min_uid 1000 or "
        "the overflow uid); list it in task_system_users to allow it")
    assert why("render", r) is not None and why("nobody", r) is not None
    r = rules(tmp_path, system_users="nobody, render")
    assert why("render", r) is None and why("nobody", r) is None
    assert why("daemon", r) is not None
    assert why("render", rules(tmp_path, system_users="", min_uid=900)) is None


def test_bus_policy_names_who_controls_the_agent(tmp_path: Path) -> None:
    found = accounts.bus_policy_controllers([POLICY])
    assert [c.name for c in found.users] == ["root"]
    assert [c.name for c in found.groups] == ["farmnode"]
    # read-only for everyone (the default context) makes no one a controller
    (tmp_path / "other.conf").write_text("<busconfig><policy group='users'><allow "
                                         "send_destination='org.example'/></policy>"
                                         "</busconfig>")
    (tmp_path / "broken.conf").write_text("<busconfig org.farmnode.Agent1")
    assert accounts.bus_policy_controllers(
        [tmp_path / "other.conf", tmp_path / "broken.conf"]) == accounts.Controllers((), ())


@pytest.mark.parametrize(("text", "floor"), [
    ("UID_MIN\t\t\t 1000\n#SYS_UID_MAX\t\t  999\n", 1000),  # Debian 12's
    ("SYS_UID_MAX 499\nUID_MIN 500\n", 500),
    ("", 1000)])
def test_uid_floor_from_login_defs(text: str, floor: int) -> None:
    assert accounts.login_defs_min_uid(text) == floor


def test_the_run_checks_the_host_accounts_too() -> None:
    # The real lookup on this host's own accounts (every Debian has these three).
    config = Config(task_system_users="")
    for name, rule in [("root", "uid 0"), ("daemon", "system account"),
                       ("nobody", "system account")]:
        with pytest.raises(TaskSetupError, match=rule):
            resolve_identity(CommandData("true", user=name), config)
    with pytest.raises(TaskSetupError, match="'no-such-user' does not exist"):
        resolve_identity(CommandData("true", user="no-such-user"), config)
    assert resolve_identity(CommandData("true"), Config()).user == "nobody"


def test_a_refused_user_is_a_400_naming_user_and_rule() -> None:
    from farmnode.agent.core import InvalidAssignment
    from farmnode.api.errors import from_refusal
    from farmnode.bus.errors import detail, error_class
    from farmnode.tasks.schema import AssignmentError

    why = ("refusing to run as 'artist': a member of group 'farmnode', which controls "
           "farmnode (members may call every method of the agent)")
    refused = InvalidAssignment(AssignmentError("job.user", why))
    err = from_refusal(error_class(refused).dbus_error_name, str(refused),
                       {k: v for k, (_sig, v) in detail(refused).items()})
    assert err.status_code == 400
    assert err.to_dict() == {"error": f"job.user: {why}", "field": "job.user"}


def test_the_agent_refuses_the_assignment_before_storing_it(tmp_path: Path) -> None:
    from farmnode.agent.core import Agent, InvalidAssignment
    from farmnode.systemd.scope import ScopeManager
    from farmnode.tasks.store import Store

    store = Store(tmp_path / "state.db")
    agent = Agent(Config(task_system_users=""), store, ScopeManager.__new__(ScopeManager))
    payload = {"job": {"id": 1, "by": 1, "user": "root"},
               "jobtype": {"name": "command", "version": 1}, "tasks": [{"id": 7, "frame": 1}]}
    with pytest.raises(InvalidAssignment, match=r"^job\.user: refusing to run as 'root': uid 0"):
        agent.assign(payload)
    del payload["job"]["user"]  # task_default_user nobody, not listed here
    with pytest.raises(InvalidAssignment, match=r"'nobody': a system account .*"
                                                r"\(task_default_user\)$"):
        agent.assign(payload)
    assert store.task(7) is None and agent.runs == {}
