"""What a task cannot do to the node, judged by the real journald, systemd and accounts."""

from __future__ import annotations

import json

from container import Container

from tests.system.conftest import agent_ready, assign_wait, assignment, journal

BUSCTL = ["busctl", "call", "org.farmnode.Agent1", "/org/farmnode/Agent1", "org.farmnode.Agent1"]

# A job's output that tries to pick its own journal priority: a NUL ends journald's line and
# a "<0>" after it would be read as PRIORITY 0; so would one after journald's LineMax (48K).
HOSTILE = ("import sys; sys.stdout.buffer.write(b'ok\\n' b'a\\0<0>after a NUL\\n' "
           "b'<0>own prefix\\n' + b'x' * (48 * 1024 - 3) + b'<0>after LineMax\\n' + b'<0>')")
EXPECTED = ("ok" "a\ufffd<0>after a NUL" "<0>own prefix" + "x" * (48 * 1024 - 3)
            + "<0>after LineMax" "<0>")

# The shim as the agent starts it, but with the agent's end of the link closed at once:
# the agent is gone for good, so the shim journals the job's raw output itself.
SHIM_ALONE = """
import json, os, socket, subprocess, sys
ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
gate_r, gate_w = os.pipe()
shim = subprocess.Popen(["/opt/farmnode/bin/python3", "-I", "-m", "farmnode.systemd.shim"],
                        stdin=gate_r, stdout=theirs.fileno())
os.close(gate_r); theirs.close(); ours.close()
spec = {"argv": ["/usr/bin/python3", "-c", sys.argv[1]], "env": {"PATH": "/usr/bin:/bin"},
        "cwd": "/", "uid": 65534, "gid": 65534, "groups": [65534],
        "status_path": "/run/hostile-status.json",
        "journal": [["farmnode-stdout", 6], ["farmnode-stderr", 4]]}
with os.fdopen(gate_w, "wb") as gate:
    gate.write(json.dumps(spec).encode())
sys.exit(shim.wait())
"""


def messages(entries: list[dict[str, object]]) -> str:
    return "".join(str(e["MESSAGE"]) for e in entries)


def test_task_output_never_chooses_its_journal_priority(ct: Container) -> None:
    a = assignment("command", {"command": ["/usr/bin/python3", "-c", HOSTILE]}, [1])
    assert assign_wait(ct, a)["tasks"][0]["state"] == "done"
    entries = journal(ct, f"FARMNODE_TASK={a['tasks'][0]['id']}")
    assert {e["PRIORITY"] for e in entries} == {"6"}
    assert messages(entries) == EXPECTED


def test_without_the_agent_raw_output_never_chooses_its_priority(ct: Container) -> None:
    unit = "farmnode-hostile-raw.scope"
    ct.run(["systemd-run", "--quiet", "--scope", f"--unit={unit}",
            "/opt/farmnode/bin/python3", "-c", SHIM_ALONE, HOSTILE], timeout=60)
    assert json.loads(ct.run(["cat", "/run/hostile-status.json"]).stdout)["exit_code"] == 0
    entries = journal(ct, f"_SYSTEMD_UNIT={unit}", "SYSLOG_IDENTIFIER=farmnode-stdout")
    assert {e["PRIORITY"] for e in entries} == {"6"}
    assert messages(entries) == EXPECTED


# --- who a task may run as ------------------------------------------------------------------

WRANGLERS_POLICY = """<busconfig><policy group="wranglers">
<allow send_destination="org.farmnode.Agent1"/></policy></busconfig>"""


def refused(ct: Container, user: str) -> str:
    """The agent's answer to an assignment for this user: refused up front, nothing stored."""
    a = assignment("command", {"command": ["id", "-un"]}, [1], user=user)
    r = ct.run(["farmnode", "--json", "assign", "-"], input=json.dumps(a), check=False)
    assert r.returncode != 0, r.stdout
    tasks = json.loads(ct.run(["farmnode", "--json", "tasks"]).stdout)
    assert a["tasks"][0]["id"] not in {t["id"] for t in tasks}
    return r.stderr


def runs_as(ct: Container, user: str) -> list[str]:
    a = assignment("command", {"command": ["id", "-un"]}, [1], user=user)
    rec = assign_wait(ct, a)["tasks"][0]
    assert rec["state"] == "done", rec
    return [e["MESSAGE"] for e in journal(ct, f"FARMNODE_TASK={a['tasks'][0]['id']}")]


def test_each_kind_of_account(ct: Container) -> None:
    ct.sh("""
getent passwd wheelie >/dev/null || useradd -m -G root wheelie
getent passwd svc >/dev/null || useradd --system -s /usr/sbin/nologin svc
getent group wranglers >/dev/null || groupadd wranglers
getent passwd wrangler >/dev/null || useradd -m -G wranglers wrangler
""")
    ct.run(["tee", "/etc/dbus-1/system.d/wranglers.conf"], input=WRANGLERS_POLICY)
    svc_uid = ct.run(["id", "-u", "svc"]).stdout.strip()
    assert int(svc_uid) < 1000  # a system account by Debian's login.defs
    cases = {
        "root": "uid 0 (tasks never run as root)",
        "wheelie": "a member of group 'root' (gid 0",  # supplementary only
        "farmnode-api": "it controls farmnode (the HTTP API's account",
        "artist": "a member of group 'farmnode', which controls farmnode",  # supplementary
        "wrangler": "a member of group 'wranglers', which controls farmnode (D-Bus policy "
                    "/etc/dbus-1/system.d/wranglers.conf)",
        "svc": f"a system account (uid {svc_uid}; below task_min_uid 1000",
        "daemon": "a system account (uid 1;",
    }
    for user, rule in cases.items():
        err = refused(ct, user)
        assert f"job.user: refusing to run as '{user}': {rule}" in err, (user, err)
    assert runs_as(ct, "jobuser") == ["jobuser"]
    assert runs_as(ct, "nobody") == ["nobody"]  # listed by default (task_system_users)

    # Listing a system account lets it run; listing a controlling one changes nothing.
    ct.run(["tee", "/etc/farmnode/conf.d/60-system-users.yaml"],
           input="task_system_users: [nobody, svc, farmnode-api]\n")
    try:
        ct.run(["systemctl", "restart", "farmnode.service"], timeout=60)
        assert runs_as(ct, "svc") == ["svc"]
        assert "it controls farmnode" in refused(ct, "farmnode-api")
        assert "system account" in refused(ct, "daemon")
    finally:
        ct.run(["rm", "-f", "/etc/farmnode/conf.d/60-system-users.yaml",
                "/etc/dbus-1/system.d/wranglers.conf"])
        ct.run(["systemctl", "restart", "farmnode.service"], timeout=60)


# --- secrets ----------------------------------------------------------------------------------

SECRET_DROPIN = "/etc/farmnode/conf.d/70-secret.yaml"


def agent_log(ct: Container, since: str) -> str:
    return ct.run(["journalctl", "-u", "farmnode.service", "--since", since, "--no-pager",
                   "-o", "cat"]).stdout


def test_the_agent_refuses_a_secret_others_can_read(ct: Container) -> None:
    since = ct.run(["date", "+%Y-%m-%d %H:%M:%S"]).stdout.strip()
    ct.sh(f"umask 022; echo 'agent_api_password: hunter2' > {SECRET_DROPIN}")
    try:
        r = ct.run(["systemctl", "restart", "farmnode.service"], check=False, timeout=60)
        assert r.returncode != 0
        assert (f"{SECRET_DROPIN}:1: agent_api_password: this file holds a secret but everyone "
                "can read it (mode 0644, root:root)") in agent_log(ct, since)
        # any task could have printed it; made private, the agent starts
        assert ct.run(["cat", SECRET_DROPIN], user="jobuser", check=False).returncode == 0
        ct.run(["chmod", "0640", SECRET_DROPIN])
        ct.run(["chgrp", "farmnode", SECRET_DROPIN])
        assert ct.run(["cat", SECRET_DROPIN], user="jobuser", check=False).returncode != 0
        agent_ready(ct)
        out = ct.run([*BUSCTL, "GetConfig"]).stdout
        assert "hunter2" not in out and "********" in out  # and still redacted
    finally:
        ct.run(["rm", "-f", SECRET_DROPIN])
        agent_ready(ct)
