"""The agent under a real systemd talking to a test master on the host.

The container shares the host's network namespace, so the agent reaches the test master at
127.0.0.1 (the test master allows loopback agents; PyFarm's does when configured to). The
master is configured through a conf.d drop-in and `systemctl restart farmnode`; time is
compressed through the config (reannounce every 2 s instead of 120 s, retries from 0.1 s).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
from container import Container

from tests.master_stub import MasterStub, Request
from tests.system.conftest import assign_wait, assignment, farmnode, journal
from tests.system.pyfarm_sources import PYFARM_PY2, PYFARM_RAISES, PYFARM_RENDER

DROPIN = "/etc/farmnode/conf.d/50-test-master.yaml"
REANNOUNCE = 2.0
OUTAGE = 10.0  # ten minutes at 60x


def _configure(ct: Container, master: MasterStub | None) -> None:
    if master is None:
        ct.run(["rm", "-f", DROPIN])
    else:
        ct.run(["tee", DROPIN], input=(
            f"master: {master.address}\n"
            f"agent_master_reannounce: {REANNOUNCE}\n"
            "agent_http_retry_delay: 0.1\n"
            "agent_http_retry_max: 1\n"
            "agent_shutdown_timeout: 3\n"
            "agent_ram_check_interval: 0.5\n"
            "agent_time_offset: auto\n"
        ))
    ct.run(["systemctl", "restart", "farmnode.service"])


@pytest.fixture(scope="module")
def master(ct: Container) -> Iterator[MasterStub]:
    with MasterStub() as m:
        _configure(ct, m)
        yield m
        _configure(ct, None)


def status(ct: Container) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(farmnode(ct, "--json", "status").stdout)
    return out


def per_task(master: MasterStub, task_ids: list[int]) -> dict[int, list[dict[str, Any]]]:
    return {t: [r.body for r in master.requests if r.task_id == t and r.status == 200]
            for t in task_ids}


def states(bodies: list[dict[str, Any]]) -> list[str]:
    return [b["state"] for b in bodies if "state" in b]


def test_announce_and_periodic_reannounce(ct: Container, master: MasterStub) -> None:
    (announce,) = master.wait_count("announce", 1)
    st = status(ct)
    body = announce.body
    assert body["id"] == st["agent_id"]
    assert body["hostname"].startswith("farmnode-test")
    assert body["os_class"] == "linux" and "Debian GNU/Linux 12" in body["os_fullname"]
    assert body["cpus"] >= 1 and body["ram"] >= 16 and 0 <= body["free_ram"] <= body["ram"]
    assert body["port"] == 50000 and isinstance(body["time_offset"], int)
    # the 0.8.6 master has no column for disks: only our own status shows them
    assert "disks" not in body
    assert st["disks"] and all(d["size"] >= d["free"] for d in st["disks"])
    assert announce.user_agent == "PyFarm/1.0 (agent)"
    assert master.agents[body["id"]]["remote_ip"] == "127.0.0.1"
    # the id is the machine-id derived one (systemd's app-specific derivation)
    derived = ct.run(["systemd-id128", "machine-id", "-u",
                      "--app-specific=585c1b918cfc4fe2829a54f1b81f1728"]).stdout.strip()
    assert body["id"] == derived
    # then a reannounce each time the master has not heard from us for REANNOUNCE seconds
    first, second = master.wait_count("reannounce", 2, timeout=20)
    assert second.at - first.at >= REANNOUNCE * 0.9
    assert set(first.body) == {"state", "free_ram", "current_assignments"}
    link = status(ct)["master_link"]
    assert link["announced"] and link["last_contact"] and link["queued_reports"] == 0
    assert link["master"] == f"http://{master.address}/api/v1"


def test_job_reports_reach_the_master_once_in_order(ct: Container, master: MasterStub) -> None:
    a = assignment("fakerender", {"duration": 0.3, "lines": 4}, [1, 2, 3])
    ids = [t["id"] for t in a["tasks"]]
    result = assign_wait(ct, a)
    assert [t["state"] for t in result["tasks"]] == ["done"] * 3
    master.wait_for(lambda rs: all(any(r.task_id == t and r.body.get("state") == "done"
                                       for r in rs) for t in ids), 20, "every done")
    for tid, bodies in per_task(master, ids).items():
        assert states(bodies) == ["running", "done"], (tid, bodies)
        assert bodies[0] == {"state": "running", "time_started": "now"}
        progress = [b["progress"] for b in bodies if "progress" in b]
        assert progress == sorted(progress) and all(0 <= p <= 1 for p in progress)
        assert master.tasks[tid].state == "done"
    # the assignment was announced while it ran (forced reannounce on start)
    assert any(r.kind == "reannounce" and result["id"] in r.body["current_assignments"]
               for r in master.requests)
    # the log's own state follows each task's done: the outbox empties after it
    master.wait_for(lambda rs: status(ct)["master_link"]["queued_reports"] == 0, 10,
                    "an empty outbox")


def test_4xx_is_not_retried(ct: Container, master: MasterStub) -> None:
    a = assignment("fakerender", {"duration": 0.1, "lines": 1}, [1])
    (tid,) = [t["id"] for t in a["tasks"]]

    def refuse(req: Request) -> tuple[int, Any] | None:
        return (404, {"error": "Task not found"}) if req.task_id == tid else None

    master.override = refuse
    try:
        assign_wait(ct, a)
        master.wait_for(lambda rs: any(r.task_id == tid and r.body.get("state") == "done"
                                       for r in rs), 20, "the done report")
        # a reannounce after it shows the agent has moved on without retrying
        n = len(master.requests)
        master.wait_for(lambda rs: any(r.kind == "reannounce" for r in rs[n:]), 20,
                        "a later reannounce")
    finally:
        master.override = None
    sent = [r for r in master.requests if r.task_id == tid]
    assert [r.body.get("state") for r in sent if "state" in r.body] == ["running", "done"]
    assert all(r.status == 404 for r in sent)
    link = status(ct)["master_link"]
    assert link["queued_reports"] == 0 and "Task not found" in link["last_error"]


def test_outage_with_agent_restart_loses_nothing(ct: Container, master: MasterStub) -> None:
    """The master vanishes for ten minutes, compressed 60x like every interval here (the
    reannounce period is 2 s for PyFarm's 120 s): 10 s. A job runs and the agent restarts
    inside the outage; when the master is back every report arrives once, in order.
    """
    master.vanish()
    gone = time.monotonic()
    a = assignment("fakerender", {"duration": 0.3, "lines": 3}, [1, 2, 3, 4])
    ids = [t["id"] for t in a["tasks"]]
    result = assign_wait(ct, a)
    assert [t["state"] for t in result["tasks"]] == ["done"] * 4
    link = status(ct)["master_link"]
    queued = link["queued_reports"]
    assert queued >= 8 and "Connection refused" in (link["last_error"] or ""), link
    ct.run(["systemctl", "restart", "farmnode.service"])
    after = status(ct)["master_link"]
    assert after["queued_reports"] == queued and not after["announced"]
    # the rest of the ten (compressed) minutes: the agent keeps retrying meanwhile
    time.sleep(max(0.0, OUTAGE - (time.monotonic() - gone)))
    retries = status(ct)["master_link"]["requests"]
    n = len(master.requests)
    master.reappear()
    master.wait_for(lambda rs: all(any(r.task_id == t and r.body.get("state") == "done"
                                       for r in rs[n:]) for t in ids), 30, "every report")
    for tid, bodies in per_task(master, ids).items():
        assert states(bodies) == ["running", "done"], (tid, bodies)
        assert len([b for b in bodies if "progress" in b]) <= 1  # only the latest survives
    # the restarted agent announced before reporting
    kinds = [r.kind for r in master.requests[n:]]
    assert kinds[0] == "announce" and kinds.index("announce") < kinds.index("task")
    master.wait_for(lambda rs: status(ct)["master_link"]["queued_reports"] == 0, 10,
                    "an empty outbox")
    print(f"\noutage: {queued} reports queued across the restart; {retries} attempts by the "
          f"restarted agent in the rest of the outage; after it: "
          f"{len([r for r in master.requests[n:] if r.kind == 'task'])} task requests for "
          f"{queued} reports, {len(master.requests[n:])} requests in all")


def test_offline_at_stop(ct: Container, master: MasterStub) -> None:
    master.wait_count("announce", 1)
    n = len(master.requests)
    ct.run(["systemctl", "stop", "farmnode.service"])
    offline = [r for r in master.requests[n:] if r.kind == "offline"]
    assert len(offline) == 1 and offline[0].status == 200
    assert offline[0].body["state"] == "offline"
    assert master.agents[offline[0].agent_id or ""]["state"] == "offline"
    # a restart (tasks keep running) is not a stop: no offline
    ct.run(["systemctl", "start", "farmnode.service"])
    master.wait_for(lambda rs: any(r.kind == "announce" for r in rs[n:]), 20, "the announce")
    m = len(master.requests)
    ct.run(["systemctl", "restart", "farmnode.service"])
    master.wait_for(lambda rs: any(r.kind == "announce" for r in rs[m:]), 20, "the announce")
    assert not [r for r in master.requests[m:] if r.kind == "offline"]


def test_master_polling_our_api_counts_as_contact(ct: Container, master: MasterStub) -> None:
    # PyFarm counts "last master contact" from requests carrying the master's User-Agent.
    master.vanish()  # our own requests to the master can no longer count as contact
    try:
        ct.sh("systemctl daemon-reload; systemctl start farmnode-api.socket")
        listen = ct.run(["systemctl", "show", "-P", "Listen", "farmnode-api.socket"]).stdout
        port = int(listen.split()[0].rsplit(":", 1)[1])
        before = status(ct)["master_link"]["last_contact"]
        ct.run(["python3", "-c",
                "import urllib.request as u; u.urlopen(u.Request("
                f"'http://127.0.0.1:{port}/api/v1/status', "
                "headers={'User-Agent': 'PyFarm/1.0 (master)'}), timeout=30).read()"])
        after = status(ct)["master_link"]["last_contact"]
        assert after is not None and after != before
    finally:
        ct.run(["systemctl", "stop", "farmnode-api.socket", "farmnode-api.service"], check=False)
        master.reappear()


ECHOER = '''
import os
from farmnode.jobtypes.base import JobType

# Where this code runs is the point: never as root in the agent.
open(f"/tmp/echoer-imported-by-{os.getuid()}", "w").close()


class Echoer(JobType):
    name = "echoer"

    def get_command_data(self):
        return self.make_command_data("/bin/sh", ["-c", "echo hello; id -u; echo bye"])

    def process_stdout_line(self, line):
        if line == "hello":
            for task in self.tasks:
                self.set_task_progress(task.id, 0.5)

    def format_stdout_line(self, line):
        return f"[PREFIX] {line}"
'''


def test_jobtype_from_the_master_runs_in_the_scope_as_the_user(
        ct: Container, master: MasterStub) -> None:
    def serve(prefix: str) -> str:
        code = ECHOER.replace("PREFIX", prefix)
        master.jobtypes[("echoer", "1")] = {"name": "echoer", "version": 1, "classname": "Echoer",
                                            "code": code, "max_batch": 1}
        return code

    dropin = "/etc/farmnode/conf.d/60-test-jobtypes.yaml"
    ct.run(["tee", dropin], input="jobtype_enable_download: true\n")
    ct.run(["systemctl", "restart", "farmnode.service"])
    uid = ct.run(["id", "-u", "jobuser"]).stdout.strip()
    try:
        serve("echoer")
        a = assignment("echoer", {}, [1], user="jobuser")
        rec = assign_wait(ct, a)["tasks"][0]
        assert rec["state"] == "done", rec
        msgs = [e["MESSAGE"] for e in journal(ct, f"FARMNODE_TASK={a['tasks'][0]['id']}")]
        assert msgs == ["[echoer] hello", f"[echoer] {uid}", "[echoer] bye"], msgs
        imported = ct.sh("ls /tmp | grep echoer-imported-by- || true").stdout.split()
        assert imported == [f"echoer-imported-by-{uid}"]  # never by root (the agent)
        assert [r.status for r in master.of("jobtype")] == [200]
        # A changed source under the same version is a new cache entry, and is used.
        code2 = serve("echoer2")
        b = assignment("echoer", {}, [1], user="jobuser")
        assert assign_wait(ct, b)["tasks"][0]["state"] == "done"
        msgs = [e["MESSAGE"] for e in journal(ct, f"FARMNODE_TASK={b['tasks'][0]['id']}")]
        assert msgs[0] == "[echoer2] hello"
        digest = hashlib.sha256(code2.encode()).hexdigest()
        cached = ct.sh("ls /var/cache/farmnode/jobtypes/echoer/1/").stdout.split()
        assert f"{digest}.py" in cached and len([c for c in cached if c.endswith(".py")]) == 2
        # A job type that breaks fails its task with its own traceback; the agent is fine.
        master.jobtypes[("broken", "1")] = {"name": "broken", "version": 1, "classname": "X",
                                            "code": "raise RuntimeError('broken on purpose')"}
        d = assignment("broken", {}, [1], user="jobuser")
        rec = assign_wait(ct, d)["tasks"][0]
        assert rec["state"] == "failed", rec
        err = [e["MESSAGE"] for e in journal(ct, f"FARMNODE_TASK={d['tasks'][0]['id']}")
               if e.get("SYSLOG_IDENTIFIER") == "farmnode-stderr"]
        assert any("broken on purpose" in m for m in err), err
        # With the master away, the newest cached source still runs.
        master.vanish()
        try:
            c = assignment("echoer", {}, [1], user="jobuser")
            assert assign_wait(ct, c)["tasks"][0]["state"] == "done"
            msgs = [e["MESSAGE"] for e in journal(ct, f"FARMNODE_TASK={c['tasks'][0]['id']}")]
            assert msgs[0] == "[echoer2] hello"
        finally:
            master.reappear()
    finally:
        ct.run(["rm", "-f", dropin])
        ct.run(["systemctl", "restart", "farmnode.service"])


def _last_errors(master: MasterStub, task_id: int) -> list[str]:
    return [r.body["last_error"] for r in master.requests
            if r.task_id == task_id and r.status == 200 and r.body.get("state") == "failed"]


def test_pyfarm_jobtypes_from_the_master_run_unchanged(ct: Container, master: MasterStub,
                                                        ) -> None:
    """No drop-in: with a master configured, downloading job types is on by default."""
    uid = ct.run(["id", "-u", "jobuser"]).stdout.strip()
    for name, classname, code in (("shellrender", "ShellRender", PYFARM_RENDER),
                                  ("legacy", "Legacy", PYFARM_PY2),
                                  ("strict", "Strict", PYFARM_RAISES)):
        master.jobtypes[(name, "1")] = {"name": name, "version": 1, "classname": classname,
                                        "code": code, "max_batch": 2, "batch_contiguous": True,
                                        "software_requirements": []}
    a = assignment("shellrender", {}, [1, 2], user="jobuser")
    ids = [t["id"] for t in a["tasks"]]
    recs = assign_wait(ct, a)["tasks"]
    assert [r["state"] for r in recs] == ["done", "done"], recs
    master.wait_for(lambda rs: all(any(r.task_id == t and r.body.get("state") == "done"
                                       for r in rs) for t in ids), 20, "both tasks done")
    for t in ids:
        # the job type's set_task_progress (the agent coalesces it, so the last is certain)
        progress = [b["progress"] for b in per_task(master, [t])[t] if "progress" in b]
        assert progress and progress[-1] == 1.0, progress
    lines = journal(ct, f"FARMNODE_TASK={ids[0]}")
    msgs = [e["MESSAGE"] for e in lines]
    # the hooks ran in the scope, as the job's user, in the job's environment; the job's
    # stderr line stays stderr (PyFarm's stream 1), its stdout lines stdout. Each stream is
    # in order; between the two pipes there is no order to keep (stdout also passes the
    # job type's line hooks first, so its lines may reach journald after the stderr line).
    out = [e["MESSAGE"] for e in lines if e["SYSLOG_IDENTIFIER"] == "farmnode-stdout"]
    err = [e["MESSAGE"] for e in lines if e["SYSLOG_IDENTIFIER"] == "farmnode-stderr"]
    assert out == [f"[uid {uid}] frame {f} at {p}%" for f in (1, 2) for p in (10, 60, 100)], msgs
    assert err == ["hello from jobuser"] and len(msgs) == 7, msgs
    assert {e["_SYSTEMD_UNIT"] for e in lines} == {f"farmnode-task-{ids[0]}.scope"}

    b = assignment("legacy", {}, [1], user="jobuser")
    (rec,) = assign_wait(ct, b)["tasks"]
    tid = b["tasks"][0]["id"]
    digest = hashlib.sha256(PYFARM_PY2.encode()).hexdigest()
    want = (f"job type 'legacy' v1 is not valid Python 3: "
            f"/var/cache/farmnode/jobtypes/legacy/1/{digest}.py, line 6: Missing parentheses "
            "in call to 'print'")
    assert rec["state"] == "failed" and rec["reason"].startswith(want), rec
    master.wait_for(lambda rs: bool(_last_errors(master, tid)), 20, "the failed report")
    assert _last_errors(master, tid)[0].startswith(want)

    c = assignment("strict", {"file": "x"}, [1], user="jobuser")
    (rec,) = assign_wait(ct, c)["tasks"]
    tid = c["tasks"][0]["id"]
    digest = hashlib.sha256(PYFARM_RAISES.encode()).hexdigest()
    want = ("job type 'strict' v1: ValueError: job data needs 'scene', got ['file'] (in "
            f"get_command_data, /var/cache/farmnode/jobtypes/strict/1/{digest}.py, line 6)")
    assert (rec["state"], rec["reason"]) == ("failed", want), rec
    master.wait_for(lambda rs: bool(_last_errors(master, tid)), 20, "the failed report")
    assert _last_errors(master, tid) == [want]
    # the traceback is in the task's log, for whoever reads it on the master
    err = [e["MESSAGE"] for e in journal(ct, f"FARMNODE_TASK={tid}")]
    assert any("Traceback (most recent call last)" in m for m in err), err


def _log_of(master: MasterStub, task_id: int) -> tuple[str, Any]:
    """(identifier, record) of the log the master has for a task's attempt."""
    for ident, tlog in master.task_logs.items():
        if any(t == task_id for t, _ in tlog.associations):
            return ident, tlog
    raise AssertionError(f"no log registered for task {task_id}")


def _log_done(master: MasterStub, task_id: int) -> Any:
    return lambda rs: any(r.kind == "log_state" and r.log and r.log[1] == task_id
                          and r.body == {"state": "done"} and r.status == 200 for r in rs)


def _api_get(ct: Container, path: str) -> str:
    ct.sh("systemctl start farmnode-api.socket")
    listen = ct.run(["systemctl", "show", "-P", "Listen", "farmnode-api.socket"]).stdout
    port = int(listen.split()[0].rsplit(":", 1)[1])
    out = ct.run(["python3", "-c",
                       "import sys, urllib.request as u; sys.stdout.write(u.urlopen(u.Request("
                       f"'http://127.0.0.1:{port}{path}', "
                       "headers={'User-Agent': 'PyFarm/1.0 (master)'}), timeout=30)"
                       ".read().hex())"]).stdout
    # hex: the text mode of the command's output would turn the CSV's CRLFs into LFs
    return bytes.fromhex(out.strip()).decode()


def test_task_log_reaches_the_master_as_pyfarm_csv(ct: Container, master: MasterStub) -> None:
    a = assignment("fakerender", {"duration": 0.3, "lines": 5}, [1])
    a["tasks"][0]["attempt"] = 2
    (tid,) = [t["id"] for t in a["tasks"]]
    assert assign_wait(ct, a)["tasks"][0]["state"] == "done"
    master.wait_for(_log_done(master, tid), 20, "the log marked done")
    ident, tlog = _log_of(master, tid)
    assert tlog.associations == {(tid, 2): "done"}
    assert tlog.content is not None
    rows = list(csv.reader(io.StringIO(tlog.content)))
    # PyFarm's rows: time, pid, stream, line, message; the agent's lines first
    assert [r[3] for r in rows] == [str(i) for i in range(1, len(rows) + 1)]
    internal = [r[4] for r in rows if r[2] == "internal"]
    assert internal[0].startswith("Starting work on job") and "assignment of 1 tasks" in \
        internal[0]
    assert internal[1].startswith("Spawning process. Command: ")
    assert internal[2].startswith("Arguments: (")
    assert internal[3].startswith("Work Dir: ") and internal[4].startswith("User/Group: ")
    assert internal[5] == "Environment:" and internal[6].startswith("{")
    assert internal[7].startswith("Started process ") and internal[-1] == \
        "Process has terminated successfully, code 0"
    # the output rows are the task's journal, line for line, under the job's pid
    output = [r for r in rows if r[2] in ("0", "1")]
    journaled = [(e["SYSLOG_IDENTIFIER"], e["MESSAGE"])
                 for e in journal(ct, f"FARMNODE_TASK={tid}")]
    assert [("farmnode-stdout" if r[2] == "0" else "farmnode-stderr", r[4])
            for r in output] == journaled and len(journaled) >= 5
    assert {r[1] for r in output} == {internal[7].split()[2]}
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}", r[0]) for r in rows)
    upload = master.of("log_upload")[-1]
    assert upload.content_type == "text/csv" and upload.path.endswith(f"/{ident}/logfile")
    # the agent serves the same CSV under the same identifier
    try:
        served = _api_get(ct, f"/api/v1/task_logs/{ident}")
    finally:
        ct.run(["systemctl", "stop", "farmnode-api.socket", "farmnode-api.service"],
               check=False)
    assert served == tlog.content


def test_master_outage_during_a_task_delays_its_log_never_loses_it(
        ct: Container, master: MasterStub) -> None:
    """The master vanishes while a task runs, and the agent restarts during the task; the
    log arrives when the master is back, registered before the task's states, uploaded
    whole before its done."""
    a = assignment("fakerender", {"duration": 3, "lines": 30}, [1])
    (tid,) = [t["id"] for t in a["tasks"]]
    master.vanish()
    try:
        aid = json.loads(farmnode(ct, "--json", "assign", "-", input=json.dumps(a)).stdout)["id"]
        farmnode(ct, "--json", "wait", aid, "--until", "running")
        ct.run(["systemctl", "restart", "farmnode.service"])  # the task runs on
        rec = json.loads(farmnode(ct, "--json", "wait", aid).stdout)["tasks"][0]
        assert rec["state"] == "done", rec
        assert status(ct)["master_link"]["queued_reports"] >= 5
    finally:
        n = len(master.requests)
        master.reappear()
    master.wait_for(_log_done(master, tid), 30, "the log marked done")
    mine = [r for r in master.requests[n:]
            if ((r.log and r.log[1] == tid) or r.task_id == tid)
            and not (isinstance(r.body, dict) and "progress" in r.body)]
    assert [(r.kind, r.body.get("state") if r.kind != "log_upload" else None) for r in mine] == [
        ("log_register", None), ("task", "running"), ("log_state", "running"),
        ("log_upload", None), ("task", "done"), ("log_state", "done")]
    assert all(r.status in (200, 201) for r in mine)
    _, tlog = _log_of(master, tid)
    rows = list(csv.reader(io.StringIO(tlog.content or "")))
    journaled = [e["MESSAGE"] for e in journal(ct, f"FARMNODE_TASK={tid}")]
    assert [r[4] for r in rows if r[2] in ("0", "1")] == journaled and len(journaled) >= 30
    assert rows[-1][4] == "Process has terminated successfully, code 0"
