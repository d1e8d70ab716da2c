"""The state directory's disk fills up while tasks end: no outcome is lost, nothing is stuck
running, the node says so, and it recovers by itself when space returns."""

from __future__ import annotations

import json
import re

from container import Container

from tests.system.conftest import agent_ready, assignment, farmnode, journal

STATE = "/var/lib/farmnode"


def _status(ct: Container) -> dict[str, object]:
    out: dict[str, object] = json.loads(farmnode(ct, "--json", "status").stdout)
    return out


def test_full_state_disk_holds_outcomes_until_space_returns(ct: Container) -> None:
    cursor = ct.run(["journalctl", "-n", "0", "--show-cursor"]).stdout.split("cursor: ")[-1]
    # The state directory on a small filesystem of its own (a copy of the real one).
    ct.sh(f"systemctl stop farmnode.service\nmkdir -p /tmp/state-copy\n"
          f"cp -a {STATE}/. /tmp/state-copy/\n"
          f"mount -t tmpfs -o size=16m,mode=0750 tmpfs {STATE}\n"
          f"cp -a /tmp/state-copy/. {STATE}/")
    go = "/tmp/storage-go"
    try:
        agent_ready(ct)
        script = (f"echo started; while [ ! -e {go} ]; do sleep 0.05; done; "
                  "echo finished; exit 4")
        a = assignment("command", {"command": ["/bin/sh", "-c", script]}, [1, 2])
        aid = farmnode(ct, "assign", "-", input=json.dumps(a)).stdout.strip()
        farmnode(ct, "wait", aid, "--until", "running")
        # fill it to the last block, then let the job end
        ct.run(["sh", "-c", f"dd if=/dev/zero of={STATE}/fill bs=64k 2>/dev/null; sync"],
               check=False)
        ct.run(["touch", go])
        unit = f"farmnode-task-{a['tasks'][0]['id']}.scope"
        for _ in range(600):
            if ct.run(["systemctl", "is-active", unit], check=False).stdout.strip() != "active":
                break
        for _ in range(600):
            status = _status(ct)
            if status["storage_error"]:
                break
        assert status["storage_error"], status
        # no new work while outcomes cannot be stored, with the reason
        b = assignment("command", {"command": ["/bin/true"]}, [1])
        r = farmnode(ct, "assign", "-", input=json.dumps(b), check=False)
        assert r.returncode != 0 and "state directory" in r.stderr, r.stderr
        ct.run(["rm", "-f", f"{STATE}/fill"])
        assert farmnode(ct, "wait", aid, check=False).returncode != 0  # exit 4: failed
        assert _status(ct)["storage_error"] is None
    finally:
        ct.run(["touch", go])
        ct.sh(f"systemctl stop farmnode.service\nrm -f {STATE}/fill\n"
              f"cp -a {STATE}/. /tmp/state-copy/\numount {STATE}\n"
              f"cp -a /tmp/state-copy/. {STATE}/\nrm -rf /tmp/state-copy {go}")
        agent_ready(ct)
    tasks = {t["id"]: t for t in json.loads(farmnode(ct, "--json", "tasks").stdout)}
    for t in a["tasks"]:
        rec = tasks[t["id"]]
        assert (rec["state"], rec["exit_code"]) == ("failed", 4), rec
    agent_log = ct.run(["journalctl", "-u", "farmnode.service", "-o", "cat", "--no-pager",
                        f"--after-cursor={cursor.strip()}"]).stdout
    assert "the state directory refuses writes" in agent_log
    assert "the state directory takes writes again" in agent_log
    for t in a["tasks"]:
        changes = re.findall(rf"task {t['id']} \([0-9a-f-]+\): (\w+)", agent_log)
        assert changes == ["running", "failed"], changes
    assert "Traceback" not in agent_log
    out = [e["MESSAGE"] for e in journal(ct, f"FARMNODE_TASK={a['tasks'][0]['id']}")
           if e.get("SYSLOG_IDENTIFIER") == "farmnode-stdout"]
    assert out == ["started", "finished"]
