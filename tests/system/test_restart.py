"""The agent can die or restart at any moment and nothing is lost ([2])."""

from __future__ import annotations

import json
import random
import re
import time

from container import Container

from tests.system.conftest import agent_pid, agent_ready, assignment, farmnode, journal

LINES = 4000


def _counting_job(code: int) -> dict[str, object]:
    # Numbered lines, a little at a time, so restarts land in the middle of the output.
    script = (
        f'i=1; while [ $i -le {LINES} ]; do echo "line $i"; '
        'if [ $((i % 25)) -eq 0 ]; then sleep 0.1; fi; i=$((i+1)); done; '
        f'echo "bye" >&2; exit {code}'
    )
    return assignment("command", {"command": ["/bin/sh", "-c", script]}, [1])


def test_restarts_and_kill9_lose_nothing(ct: Container) -> None:
    rng = random.Random(20261123)
    jobs = [_counting_job(3 if i % 3 == 0 else 0) for i in range(8)]
    ids = []
    for a in jobs:
        ids.append(farmnode(ct, "assign", "-", input=json.dumps(a)).stdout.strip())
    for aid in ids:
        farmnode(ct, "wait", aid, "--until", "running")
    kills = restarts = 0
    readopt = []
    for _ in range(22):
        # Random moments: anywhere in the output, in a restart's start-up, or in a conclusion.
        time.sleep(rng.uniform(0.0, 0.6))
        before = agent_pid(ct)
        t0 = time.monotonic()
        if rng.random() < 0.5:
            ct.run(["kill", "-9", str(before)])
            kills += 1
        else:
            ct.run(["systemctl", "restart", "farmnode.service"], timeout=60)
            restarts += 1
        agent_ready(ct, not_pid=before)
        readopt.append(time.monotonic() - t0)
        assert agent_pid(ct) != before
    print(f"\n{kills} kill -9, {restarts} restarts; back to READY with tasks re-adopted in "
          f"{min(readopt):.2f}/{sorted(readopt)[len(readopt) // 2]:.2f}/{max(readopt):.2f} s "
          "(min/median/max)")
    for aid in ids:
        farmnode(ct, "wait", aid, check=False)
    ct.run(["systemctl", "reset-failed", "farmnode.service"])  # the start-limit counter

    tasks = {t["id"]: t for t in json.loads(farmnode(ct, "--json", "tasks").stdout)}
    agent_log = ct.run(["journalctl", "-u", "farmnode.service", "-o", "cat",
                        "--no-pager"]).stdout
    for i, a in enumerate(jobs):
        task_id = a["tasks"][0]["id"]  # type: ignore[index]
        rec = tasks[task_id]
        want_code = 3 if i % 3 == 0 else 0
        assert rec["exit_code"] == want_code, json.dumps(rec)
        assert rec["state"] == ("failed" if want_code else "done"), rec
        entries = journal(ct, f"FARMNODE_TASK={task_id}")
        out = [e for e in entries if e.get("SYSLOG_IDENTIFIER") == "farmnode-stdout"]
        got = [e["MESSAGE"] for e in out]
        missing = sorted(set(range(1, LINES + 1)) - {int(m.split()[1]) for m in got})
        problems = [ln for ln in agent_log.splitlines() if "ERROR" in ln or "Traceback" in ln]
        assert got == [f"line {n}" for n in range(1, LINES + 1)], (
            f"task {task_id}: {len(got)} lines, missing {missing[:10]}; agent: {problems[-5:]}")
        err = [e["MESSAGE"] for e in entries if e.get("SYSLOG_IDENTIFIER") == "farmnode-stderr"]
        assert err == ["bye"]
        # every state change of the task was recorded once, whatever the agent went through
        changes = re.findall(rf"task {task_id} \([0-9a-f-]+\): (\w+)", agent_log)
        assert changes == ["running", rec["state"]], changes


def test_stop_stops_tasks_gracefully(ct: Container) -> None:
    a = assignment("command", {"command": ["/bin/sh", "-c",
                                           "trap 'echo got TERM; exit 0' TERM; "
                                           "echo ready; while :; do sleep 0.1; done"]}, [1])
    aid = farmnode(ct, "assign", "-", input=json.dumps(a)).stdout.strip()
    farmnode(ct, "wait", aid, "--until", "running")
    task_id = a["tasks"][0]["id"]
    ct.run(["systemctl", "stop", "farmnode.service"], timeout=120)
    try:
        unit = f"farmnode-task-{task_id}.scope"
        assert ct.run(["systemctl", "is-active", unit], check=False).stdout.strip() != "active"
    finally:
        agent_ready(ct)
    rec = json.loads(farmnode(ct, "--json", "tasks").stdout)
    (t,) = [x for x in rec if x["id"] == task_id]
    assert t["state"] == "cancelled" and t["reason"] == "agent stopped", t
    msgs = [e["MESSAGE"] for e in journal(ct, f"FARMNODE_TASK={task_id}")]
    # SIGTERM went to every process of the scope (sh reports its sleep 'Terminated')
    assert msgs[0] == "ready" and "got TERM" in msgs, msgs


def test_upgrade_from_link_protocol_1_loses_nothing(ct: Container) -> None:
    """A task started by the farmnode before the stream output path (link protocol 1, whose
    shim leaves journaling to the agent; tests/data/link1 is that build, commit f95727e)
    runs on through an upgrade: the new agent speaks its protocol until it ends."""
    wheel = "/src/tests/data/link1/farmnode-0.1.0-py3-none-any.whl"
    pip = "/opt/farmnode/bin/pip install -q --no-deps --no-index --force-reinstall"
    # The old build refuses keys it does not know, and the installed file lists every key of
    # this build: it runs on the defaults, as it would have with the file it shipped.
    conf = "/etc/farmnode/farmnode.yaml"
    ct.sh(f"cp -a {conf} {conf}.new\n: > {conf}\n{pip} {wheel}\n"
          "systemctl restart farmnode.service")
    try:
        a = _counting_job(0)
        task_id = a["tasks"][0]["id"]  # type: ignore[index]
        aid = farmnode(ct, "assign", "-", input=json.dumps(a)).stdout.strip()
        farmnode(ct, "wait", aid, "--until", "running")
        old_lines = [e for e in journal(ct, f"FARMNODE_TASK={task_id}")
                     if e.get("FARMNODE_STREAM") == "stdout"]
        assert old_lines and "FARMNODE_NEXT" in old_lines[0]  # the old agent's native entries
    finally:
        # the upgrade, in the middle of the output
        ct.sh(f"mv {conf}.new {conf}\n{pip} /wheels/farmnode-*.whl\n"
              "systemctl restart farmnode.service")
    assert farmnode(ct, "wait", aid, check=False).returncode == 0
    rec = next(t for t in json.loads(farmnode(ct, "--json", "tasks").stdout)
               if t["id"] == task_id)
    assert rec["state"] == "done" and rec["exit_code"] == 0, rec
    entries = journal(ct, f"FARMNODE_TASK={task_id}")
    out = [e["MESSAGE"] for e in entries if e.get("FARMNODE_STREAM") == "stdout"]
    assert out == [f"line {n}" for n in range(1, LINES + 1)], (len(out), out[-3:])
    assert [e["MESSAGE"] for e in entries if e.get("FARMNODE_STREAM") == "stderr"] == ["bye"]
    assert len(old_lines) < LINES  # the upgrade did land mid-output
    agent_log = ct.run(["journalctl", "-u", "farmnode.service", "-o", "cat", "--no-pager"]).stdout
    assert f"assignment {aid}: its shim speaks link protocol 1" in agent_log
    # and `farmnode logs` (the new CLI) reads both kinds of entry
    assert "line 4000" in farmnode(ct, "logs", str(task_id)).stdout


def test_wait_follows_an_assignment_across_agent_restarts(ct: Container) -> None:
    """`farmnode wait` (and `assign --wait`) outlive the agent: an upgrade or a crash while an
    admin waits must not leave the command hanging or answering wrong."""
    go = "/tmp/wait-across-go"
    script = f"echo started; while [ ! -e {go} ]; do sleep 0.05; done; echo finished"
    a = assignment("command", {"command": ["/bin/sh", "-c", script]}, [1])
    aid = farmnode(ct, "assign", "-", input=json.dumps(a)).stdout.strip()
    farmnode(ct, "wait", aid, "--until", "running")
    waiter = ct.popen(["farmnode", "wait", aid])
    try:
        assert waiter.stdout is not None
        assert waiter.stdout.readline().startswith(f"assignment {aid}")  # it has subscribed
        before = agent_pid(ct)
        ct.run(["systemctl", "restart", "farmnode.service"], timeout=60)
        agent_ready(ct, not_pid=before)
        before = agent_pid(ct)
        ct.run(["kill", "-9", str(before)])
        # the task ends while no agent is there: the next one concludes it
        ct.run(["touch", go])
        agent_ready(ct, not_pid=before)
        out, err = waiter.communicate(timeout=60)
    finally:
        if waiter.poll() is None:
            waiter.kill()
        ct.run(["rm", "-f", go])
    assert waiter.returncode == 0, (out, err)
    assert f"task {a['tasks'][0]['id']}: done" in out, out  # type: ignore[index]


BROKEN = "/run/systemd/system/farmnode.service.d/zz-broken.conf"
GO = "/tmp/restart-test-go"


def _break_agent(ct: Container) -> None:
    """What a broken drop-in does: every start fails until systemd's start limit stops the
    retrying (a tight limit here, so the test does not wait a minute for it)."""
    ct.sh(f"mkdir -p {BROKEN.rsplit('/', 1)[0]}\n"
          "printf '[Unit]\\nStartLimitBurst=2\\n[Service]\\nExecStartPre=/bin/false\\n'"
          f" > {BROKEN}\n"
          "systemctl daemon-reload")


def _repair_agent(ct: Container) -> None:
    ct.sh(f"rm -f {BROKEN}\nsystemctl daemon-reload\nsystemctl reset-failed farmnode.service")
    agent_ready(ct)


def _until(ct: Container, what: str, cmd: str, want: str, tries: int = 600) -> None:
    """Until `cmd`'s output is `want`: what is awaited is systemd's own state, asked through
    the container's shell (each ask takes a process start, so no extra sleep is needed)."""
    out = ""
    for _ in range(tries):
        out = ct.run(["sh", "-c", cmd], check=False).stdout.strip()
        if out == want:
            return
        time.sleep(0.05)
    raise AssertionError(f"{what}: {cmd!r} said {out!r}, not {want!r}")


LIMIT_HIT = "journalctl -u farmnode.service -o cat --no-pager | grep -c 'repeated too quickly'"


def _start_limits(ct: Container) -> int:
    # systemd 252 leaves Result at exit-code when the limit stops the restarts: its log line
    # is the event to await.
    return int(ct.run(["sh", "-c", LIMIT_HIT], check=False).stdout.strip() or 0)


def _start_limit_hit(ct: Container, before: int) -> None:
    _until(ct, "the start limit", LIMIT_HIT, str(before + 1))


def _stored_tasks(ct: Container, ids: set[int]) -> dict[int, tuple[str, int | None]]:
    """(state, exit code) of each task in the agent's store, read the agent's way."""
    script = ("import json, sqlite3; db = sqlite3.connect('file:/var/lib/farmnode/farmnode.db"
              "?mode=ro', uri=True); print(json.dumps(db.execute('SELECT id, state, exit_code"
              " FROM tasks').fetchall()))")
    rows = json.loads(ct.run(["/opt/farmnode/bin/python", "-c", script]).stdout)
    return {r[0]: (r[1], r[2]) for r in rows if r[0] in ids}


def _task_states(ct: Container, agent_log: str, task_id: int) -> list[str]:
    return re.findall(rf"task {task_id} \([0-9a-f-]+\): (\w+)", agent_log)


def test_shim_ending_while_no_agent_ran_concludes_from_its_record(ct: Container) -> None:
    """The agent is killed and cannot start again (a broken drop-in, the start limit hit, so
    its fd store and with it every link is gone); the jobs end meanwhile. Once repaired, the
    agent concludes each task from its shim's status record: right exit status, every line in
    the journal, each state change reported once."""
    lines = 300
    jobs = []
    for code in (0, 3):
        # the first 100 lines, then (once the agent is gone) the rest
        script = (f'i=1; while [ $i -le {lines} ]; do echo "line $i"; i=$((i+1)); '
                  f'if [ $i -eq 100 ]; then while [ ! -e {GO} ]; do sleep 0.05; done; fi; '
                  f'done; exit {code}')
        jobs.append(assignment("command", {"command": ["/bin/sh", "-c", script]}, [1]))
    ids = [farmnode(ct, "assign", "-", input=json.dumps(a)).stdout.strip() for a in jobs]
    for aid in ids:
        farmnode(ct, "wait", aid, "--until", "running")
    limits = _start_limits(ct)
    _break_agent(ct)
    try:
        ct.run(["kill", "-9", str(agent_pid(ct))])
        _start_limit_hit(ct, limits)
        ct.run(["touch", GO])
        for a in jobs:
            unit = f"farmnode-task-{a['tasks'][0]['id']}.scope"
            _until(ct, f"{unit} ended", f"systemctl is-active {unit}", "inactive")
    finally:
        ct.run(["touch", GO])
        _repair_agent(ct)
        ct.run(["rm", "-f", GO])
    for aid in ids:
        farmnode(ct, "wait", aid, check=False)
    tasks = {t["id"]: t for t in json.loads(farmnode(ct, "--json", "tasks").stdout)}
    agent_log = ct.run(["journalctl", "-u", "farmnode.service", "-o", "cat",
                        "--no-pager"]).stdout
    for a, code in zip(jobs, (0, 3), strict=True):
        task_id = a["tasks"][0]["id"]
        rec = tasks[task_id]
        assert (rec["state"], rec["exit_code"]) == ("done" if code == 0 else "failed", code), \
            rec
        out = [e["MESSAGE"] for e in journal(ct, f"FARMNODE_TASK={task_id}")
               if e.get("SYSLOG_IDENTIFIER") == "farmnode-stdout"]
        assert out == [f"line {n}" for n in range(1, lines + 1)], (len(out), out[-3:])
        assert _task_states(ct, agent_log, task_id) == ["running", rec["state"]]


def test_5000_task_assignment_killed_mid_run_concludes_every_task_once(ct: Container) -> None:
    """One assignment of 5,000 tasks (one batch, one process) survives a kill -9 in the
    middle of its run, then, in a second assignment, a kill -9 with the start limit hit;
    every task ends `done` with exit status 0, and each state change is reported once."""
    frames = list(range(1, 5001))
    # A few lines, then on until the test says go: each kill lands while the job runs.
    job = (f"i=1; while [ $i -le 40 ]; do echo \"line $i\"; i=$((i+1)); done; "
           f"while [ ! -e {GO} ]; do sleep 0.05; done")
    first = assignment("command", {"command": ["/bin/sh", "-c", job]}, frames)
    second = assignment("command", {"command": ["/bin/sh", "-c", job]}, frames)
    t0 = time.monotonic()
    aid = farmnode(ct, "assign", "-", input=json.dumps(first)).stdout.strip()
    farmnode(ct, "wait", aid, "--until", "running")
    accepted = time.monotonic() - t0
    before = agent_pid(ct)
    t0 = time.monotonic()
    ct.run(["kill", "-9", str(before)])
    agent_ready(ct, not_pid=before)
    readopted = time.monotonic() - t0
    ct.run(["touch", GO])
    assert farmnode(ct, "wait", aid, check=False).returncode == 0
    ct.run(["rm", "-f", GO])

    aid2 = farmnode(ct, "assign", "-", input=json.dumps(second)).stdout.strip()
    farmnode(ct, "wait", aid2, "--until", "running")
    limits = _start_limits(ct)
    _break_agent(ct)
    try:
        ct.run(["kill", "-9", str(agent_pid(ct))])
        _start_limit_hit(ct, limits)
        ct.run(["touch", GO])
        unit = f"farmnode-task-{second['tasks'][0]['id']}.scope"
        _until(ct, f"{unit} ended", f"systemctl is-active {unit}", "inactive")
    finally:
        ct.run(["touch", GO])
        t0 = time.monotonic()
        _repair_agent(ct)
        ct.run(["rm", "-f", GO])
    assert farmnode(ct, "wait", aid2, check=False).returncode == 0
    concluded = time.monotonic() - t0
    ct.run(["journalctl", "--sync"])
    print(f"\n5,000 tasks: accepted and running in {accepted:.2f} s; back to READY after "
          f"kill -9 in {readopted:.2f} s; concluded headless in {concluded:.2f} s")
    agent_log = ct.run(["journalctl", "-u", "farmnode.service", "-o", "cat",
                        "--no-pager"]).stdout
    assert f"re-adopting assignment {aid} " in agent_log  # its link survived the kill
    assert f"assignment {aid2}: no link to its task survived" in agent_log
    for a in (first, second):
        want = {t["id"] for t in a["tasks"]}
        # The listings keep the last 1,000 finished tasks: the whole record is in the store.
        got = _stored_tasks(ct, want)
        assert set(got) == want, f"{len(want - set(got))} tasks missing from the store"
        bad = [(tid, t) for tid, t in got.items() if t != ("done", 0)]
        assert not bad, (len(bad), bad[:3])
        for task_id in (min(want), max(want)):
            assert _task_states(ct, agent_log, task_id) == ["running", "done"], (
                task_id, [ln for ln in agent_log.splitlines() if str(task_id) in ln])
    counts: dict[str, int] = {}
    for tid, aid_of, state in re.findall(r"task (\d+) \(([0-9a-f-]+)\): (\w+)", agent_log):
        if aid_of in (aid, aid2):  # other tests reuse task ids in assignments of their own
            counts[f"{tid} {state}"] = counts.get(f"{tid} {state}", 0) + 1
    assert max(counts.values()) == 1, [k for k, v in counts.items() if v > 1][:5]
    assert len(counts) == 2 * 2 * 5000  # running and done, every task of both
