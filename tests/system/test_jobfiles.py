"""Job files on a node without a master, under a real systemd: `farmnode submit` queues a
3-job file whose jobs depend on each other; they run in order, each through the path a
master's assignment takes (its scope with the job's limits, journald fields, TaskChanged
signals), and an agent restart in the middle loses and repeats nothing."""

from __future__ import annotations

import json
import time
from typing import Any

from container import Container

from tests.system.conftest import agent_pid, agent_ready, farmnode, journal

FILE = """\
{% macro step(name, seconds, deps=[]) %}
  - id: {{ name }}
    title: "{{ name }} step"
    jobtype: command
    data:
      command: [/bin/sh, -c, "echo {{ name }} {start}-{end} begins; sleep {{ seconds }};
                echo {{ name }} {start}-{end} ends"]
    start: 1
    end: 2
    batch: 2
    ram_max: 256
    environment: {STEP: "{{ name }}"}
    dependencies: {{ deps }}
{% endmacro %}
jobs:
{{ step('sim', 0) }}
{{ step('render', 3, ['sim']) }}
{{ step('comp', 0, ['render']) }}
"""


def _jobs(ct: Container) -> dict[str, dict[str, Any]]:
    return {j["name"]: j for j in json.loads(farmnode(ct, "--json", "jobs").stdout)}


def _until(what: str, check: Any, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_three_jobs_run_in_order_and_survive_an_agent_restart(ct: Container) -> None:
    t0 = time.monotonic()
    ct.run(["tee", "/tmp/shots.yaml"], input=FILE)
    # Refused with names: the client's Jinja error, the agent's validation over D-Bus.
    ct.run(["tee", "/tmp/bad.yaml"], input="jobs:\n  - id: a\n    jobtype: comand\n"
           "    start: 1\n    end: 1\n")
    r = farmnode(ct, "submit", "/tmp/bad.yaml", check=False)
    assert r.returncode == 1
    assert "/tmp/bad.yaml:3: jobs[0].jobtype: unknown job type 'comand'" in r.stderr, r.stderr
    ct.run(["tee", "/tmp/undefined.yaml"], input="jobs:\n\n  - id: {{ nope }}\n")
    r = farmnode(ct, "submit", "/tmp/undefined.yaml", check=False)
    assert (r.returncode, r.stderr.strip()) == (
        2, "farmnode: /tmp/undefined.yaml:3: Jinja: 'nope' is undefined")

    submitted = json.loads(farmnode(ct, "--json", "submit", "/tmp/shots.yaml").stdout)
    assert [j["name"] for j in submitted] == ["sim", "render", "comp"]

    # render runs: its scope is the one an assignment gets, with the job's limit.
    render = _until("render running", lambda: (j := _jobs(ct)["render"])["assignments"]
                    and j["state"] == "running" and j)
    assert _jobs(ct)["comp"]["state"] == "queued"
    unit = f"farmnode-task-{render['tasks'][0]}.scope"
    props = ct.run(["systemctl", "show", unit, "-p", "MemoryMax", "-p", "Slice"]).stdout
    assert sorted(props.split()) == [f"MemoryMax={256 * 1024 * 1024}",
                                     "Slice=farmnode.slice"], props
    _until("render's output", lambda: journal(ct, f"FARMNODE_TASK={render['tasks'][0]}"))
    before = ct.run(["systemctl", "show", "-P", "MainPID", "farmnode.service"]).stdout
    ct.run(["systemctl", "restart", "farmnode.service"], timeout=60)
    assert ct.run(["systemctl", "show", "-P", "MainPID", "farmnode.service"]).stdout != before

    # Followed in a pipe (plain lines), from TaskChanged signals, until every job is done.
    follow = farmnode(ct, "tasks", "--follow")
    assert "comp (comp step): done 2/2 tasks 100%" in follow.stdout, follow.stdout
    jobs = _jobs(ct)
    assert {n: j["state"] for n, j in jobs.items()} == {"sim": "done", "render": "done",
                                                         "comp": "done"}
    tasks = {t["id"]: t for t in json.loads(farmnode(ct, "--json", "tasks").stdout)}
    spans = {}
    for name, j in jobs.items():
        # One assignment per job (batch 2): nothing ran twice across the restart.
        assert len(j["assignments"]) == 1, j
        mine = [tasks[i] for i in j["tasks"]]
        assert [(t["state"], t["exit_code"], t["frame"]) for t in mine] == [
            ("done", 0, 1.0), ("done", 0, 2.0)], mine
        spans[name] = (min(t["started"] for t in mine), max(t["finished"] for t in mine))
    assert spans["sim"][1] <= spans["render"][0] and spans["render"][1] <= spans["comp"][0]

    # The output is the scope's, with the fields a master's assignment gets.
    (render_aid,) = jobs["render"]["assignments"]
    entries = [e for e in journal(ct, f"FARMNODE_ASSIGNMENT={render_aid}")
               if e.get("SYSLOG_IDENTIFIER") == "farmnode-stdout"]
    assert [e["MESSAGE"] for e in entries] == ["render 1-2 begins", "render 1-2 ends"]
    assert {e["_SYSTEMD_UNIT"] for e in entries} == {unit}
    assert {e["FARMNODE_JOBTYPE"] for e in entries} == {"command"}
    assert {e["FARMNODE_JOB"] for e in entries} == {str(jobs["render"]["id"])}
    print(f"\n3-job file with an agent restart: {time.monotonic() - t0:.1f} s")


ONE = "jobs:\n  - {id: once, jobtype: command, start: 1, end: 1, data: {command: [/bin/true]}}\n"
BUS, AGENT = "org.farmnode.Agent1", "/org/farmnode/Agent1"


def test_a_submission_is_stored_once_whatever_becomes_of_the_reply(ct: Container) -> None:
    from tests.system.test_dbus_api import Monitor

    ct.run(["tee", "/tmp/once.yaml"], input=ONE)
    before = len(_jobs_list(ct))
    # A caller's retry after a lost reply: the same token twice, one file stored.
    call = ["busctl", "--json=short", "call", BUS, AGENT, BUS, "SubmitJobs", "ssais",
            "once.yaml", ONE, "0", "token-of-a-retry"]
    first, again = (json.loads(json.loads(ct.run(call).stdout)["data"][0]) for _ in "12")
    assert [j["id"] for j in first] == [j["id"] for j in again] and len(first) == 1
    assert len(_jobs_list(ct)) == before + 1
    # The CLI's own retry: the agent holds the call unread (stopped), then dies; the CLI
    # asks the agent systemd starts next, with the same token.
    monitor = Monitor(ct)
    pid = agent_pid(ct)
    ct.run(["kill", "-STOP", str(pid)])
    try:
        submit = ct.popen(["farmnode", "--json", "submit", "/tmp/once.yaml"])
        deadline = time.monotonic() + 60
        while json.loads(monitor.lines.get(timeout=max(0.0, deadline - time.monotonic()))
                         ).get("member") != "SubmitJobs":
            pass
    finally:
        ct.run(["kill", "-KILL", str(pid)])
    out, err = submit.communicate(timeout=180)
    monitor.proc.kill()
    assert submit.returncode == 0, err
    assert "went before it answered" in err and "asking its successor" in err, err
    assert [j["name"] for j in json.loads(out)] == ["once"]
    assert len(_jobs_list(ct)) == before + 2
    agent_ready(ct, not_pid=pid)


def _jobs_list(ct: Container) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = json.loads(farmnode(ct, "--json", "jobs").stdout)
    return out
