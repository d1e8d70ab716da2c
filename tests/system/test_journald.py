"""journald away: the task's output is held, never dropped, and journaled once it is back."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

import pytest
from container import Container

from tests.system.conftest import agent_config, assignment, farmnode, journal

LINES = 20000
JOURNALD_UNITS = ["systemd-journald.socket", "systemd-journald-dev-log.socket",
                  "systemd-journald.service"]


@pytest.fixture(autouse=True)
def _node_back_after(ct: Container) -> Iterator[None]:
    # journald away fails the journald health check, which disables the node until the
    # check's next run; the next test needs it taking work again: run it now.
    yield
    ct.run(["systemctl", "start", "farmnode-health@journald.service"], check=False)
    deadline = time.monotonic() + 60
    while json.loads(farmnode(ct, "--json", "status").stdout)["state"] == "disabled":
        assert time.monotonic() < deadline, farmnode(ct, "status").stdout
        time.sleep(0.2)


def _journaled_up_to(ct: Container, task_id: int, line: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = ct.run(["journalctl", f"FARMNODE_TASK={task_id}", "-t", "farmnode-stdout",
                    "-o", "cat", "-n", "1", "--no-pager"], check=False)
        last = r.stdout.strip()
        if last.startswith("line ") and int(last.split()[1]) >= line:
            return
        time.sleep(0.1)
    raise AssertionError(f"task {task_id}: line {line} not journaled in {timeout} s")


def test_journald_stopped_15s_mid_task_loses_no_line(ct: Container) -> None:
    # Three times as long as the shim once held output before it dropped it. About 1,000
    # lines a second, so lines are in flight in journald's stream the moment
    # it is stopped, and the job goes on printing all the while it is away.
    script = (
        f'i=1; while [ $i -le {LINES} ]; do echo "line $i"; '
        'if [ $((i % 50)) -eq 0 ]; then sleep 0.05; fi; i=$((i+1)); done; echo bye >&2'
    )
    a = assignment("command", {"command": ["/bin/sh", "-c", script]}, [1])
    task_id = a["tasks"][0]["id"]
    aid = farmnode(ct, "assign", "-", input=json.dumps(a)).stdout.strip()
    _journaled_up_to(ct, task_id, 2000)
    ct.run(["systemctl", "stop", *JOURNALD_UNITS])
    stopped = time.monotonic()
    try:
        time.sleep(5)
        # Meanwhile the job runs on; the shim holds what it prints.
        task = next(t for t in json.loads(farmnode(ct, "--json", "tasks").stdout)
                    if t["id"] == task_id)
        assert task["state"] == "running", task
        time.sleep(max(0.0, 15 - (time.monotonic() - stopped)))
    finally:
        started = ct.run(["systemctl", "start", *JOURNALD_UNITS], check=False)
        if started.returncode != 0:
            why = ct.run(["sh", "-c", "systemctl show -p Result,NRestarts,ExecMainStatus "
                          "systemd-journald.service; systemctl status --no-pager -l "
                          "systemd-journald.service; df -h /run /var/log"], check=False)
            raise AssertionError(f"journald did not start again: {started.stderr}\n"
                                 f"{why.stdout}{why.stderr}")
    farmnode(ct, "wait", aid)
    task = next(t for t in json.loads(farmnode(ct, "--json", "tasks").stdout)
                if t["id"] == task_id)
    assert task["state"] == "done", task
    entries = journal(ct, f"FARMNODE_TASK={task_id}")
    got = [e["MESSAGE"] for e in entries if e.get("SYSLOG_IDENTIFIER") == "farmnode-stdout"]
    if got != [f"line {n}" for n in range(1, LINES + 1)]:
        numbers = [int(m.split()[1]) for m in got]
        missing = sorted(set(range(1, LINES + 1)) - set(numbers))
        twice = sorted({n for n in numbers if numbers.count(n) > 1})
        raise AssertionError(f"{len(got)} lines; missing {missing[:10]} ({len(missing)}), "
                             f"twice {twice[:10]} ({len(twice)})")
    assert [e["MESSAGE"] for e in entries
            if e.get("SYSLOG_IDENTIFIER") == "farmnode-stderr"] == ["bye"]
    # The lines journaled late are explained, in the task's own journal.
    notes = [e for e in entries if e.get("SYSLOG_IDENTIFIER") == "farmnode-shim"]
    assert notes and "journald was unreachable" in notes[0]["MESSAGE"], notes
    assert all(e["_SYSTEMD_UNIT"] == f"farmnode-task-{task_id}.scope" for e in entries)


def _poll(what: str, check: Callable[[], bool], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.2)


def _stdout_of(ct: Container, *match: str) -> list[str]:
    return [e["MESSAGE"] for e in journal(ct, *match)
            if e.get("SYSLOG_IDENTIFIER") == "farmnode-stdout"]


def _no_spool_left(ct: Container) -> bool:
    return ct.run(["sh", "-c", "ls /run/farmnode/tasks/*.spool*"], check=False).returncode != 0


def _cancel_while_journald_is_away(ct: Container, lines: int, tag: str) -> tuple[int, str, str]:
    """Stop journald, let a job print its lines only then and cancel it: the shim holds all of
    them when systemd kills the scope. Returns with journald still stopped (the caller starts
    it again): the task id, its scope and the assignment id."""
    go, printed = f"/tmp/{tag}-go", f"/tmp/{tag}-printed"
    ct.run(["rm", "-f", go, printed])
    script = (
        f'while [ ! -e {go} ]; do sleep 0.05; done; i=1; while [ $i -le {lines} ]; do '
        f'echo "line $i"; i=$((i+1)); done; touch {printed}; exec sleep 300'
    )
    a = assignment("command", {"command": ["/bin/sh", "-c", script]}, [1])
    task_id = a["tasks"][0]["id"]
    aid = farmnode(ct, "assign", "-", input=json.dumps(a)).stdout.strip()
    farmnode(ct, "wait", aid, "--until", "running")
    ct.run(["systemctl", "stop", *JOURNALD_UNITS])
    ct.run(["touch", go])
    _poll("the job printed its lines",
          lambda: ct.run(["test", "-e", printed], check=False).returncode == 0)
    farmnode(ct, "cancel", str(task_id))
    farmnode(ct, "wait", aid, check=False)
    task = next(t for t in json.loads(farmnode(ct, "--json", "tasks").stdout)
                if t["id"] == task_id)
    # The outcome says where the output is, while journald is still away.
    assert task["state"] == "cancelled", task
    assert "waits in" in task["reason"] and "spool" in task["reason"], task
    return task_id, f"farmnode-task-{task_id}.scope", aid


def test_task_cancelled_while_journald_is_away_loses_no_line(ct: Container) -> None:
    try:
        task_id, unit, aid = _cancel_while_journald_is_away(ct, LINES, "jlost")
    finally:
        ct.run(["systemctl", "start", *JOURNALD_UNITS])

    want = [f"line {n}" for n in range(1, LINES + 1)]
    _poll("the spooled lines are journaled",
          lambda: len(_stdout_of(ct, f"FARMNODE_TASK={task_id}")) >= LINES)
    assert _stdout_of(ct, f"FARMNODE_TASK={task_id}") == want
    assert _stdout_of(ct, "-u", unit) == want
    notes = [e["MESSAGE"] for e in journal(ct, "-u", unit)
             if e.get("SYSLOG_IDENTIFIER") == "farmnode-shim"]
    assert any("journaled late from the shim's spool" in n for n in notes), notes
    assert _no_spool_left(ct)

    # ... and the task's reason no longer says the output waits: it says it came late
    def reason() -> str:
        return str(next(t for t in json.loads(farmnode(ct, "--json", "tasks").stdout)
                        if t["id"] == task_id)["reason"])
    _poll("the reason says what came of the output", lambda: "waits in" not in reason())
    assert "output lines" in reason() and "journaled late" in reason(), reason()
    # The agent's own line about it, written after journald was stopped and started again,
    # is in the journal: it logs by journald's native protocol, not a stream journald cut.
    said = [e for e in journal(ct, "_SYSTEMD_UNIT=farmnode.service", "SYSLOG_IDENTIFIER=farmnode")
            if e["MESSAGE"].startswith(f"WARNING farmnode.agent.janitor: assignment {aid}: ")]
    assert said and all(e["_TRANSPORT"] == "journal" for e in said), said
    assert said[-1]["PRIORITY"] == "4"  # a warning, as journalctl -p warning shows it


def test_spool_of_a_cancelled_task_is_journaled_by_the_next_agent(ct: Container) -> None:
    # The agent that concluded the task goes while journald is still away: its retry goes
    # with it, so the agent started next must find the spool and journal it.
    lines = 2000
    try:
        task_id, unit, _ = _cancel_while_journald_is_away(ct, lines, "jorphan")
        assert not _no_spool_left(ct)
        ct.run(["systemctl", "restart", "farmnode"])
        # The new agent is up (it answers) before journald is back.
        farmnode(ct, "--json", "tasks")
        assert not _no_spool_left(ct)
    finally:
        ct.run(["systemctl", "start", *JOURNALD_UNITS])
    want = [f"line {n}" for n in range(1, lines + 1)]
    _poll("the spool is journaled and removed", lambda: _no_spool_left(ct)
          and len(_stdout_of(ct, f"FARMNODE_TASK={task_id}")) >= lines)
    assert _stdout_of(ct, f"FARMNODE_TASK={task_id}") == want
    assert _stdout_of(ct, "-u", unit) == want
    notes = [e["MESSAGE"] for e in journal(ct, "-u", unit)
             if e.get("SYSLOG_IDENTIFIER") == "farmnode-shim"]
    assert any(f"{lines} output lines" in n and "journaled late from the shim's spool" in n
               for n in notes), notes


def test_shim_gives_up_on_journald_and_the_task_concludes(ct: Container) -> None:
    # journald stays away past the shim's grace (task_journal_grace after the job's end): the
    # shim leaves its output in the spool, the task is concluded meanwhile, not left running.
    with agent_config(ct, "task_journal_grace: 3"):
        _give_up_and_conclude(ct)


def _give_up_and_conclude(ct: Container) -> None:
    lines = 500
    script = f'i=1; while [ $i -le {lines} ]; do echo "line $i"; i=$((i+1)); done'
    go = "/tmp/jgrace-go"
    ct.run(["rm", "-f", go])
    a = assignment("command", {"command": ["/bin/sh", "-c",
                                           f"while [ ! -e {go} ]; do sleep 0.05; done; "
                                           + script]}, [1])
    task_id = a["tasks"][0]["id"]
    aid = farmnode(ct, "assign", "-", input=json.dumps(a)).stdout.strip()
    farmnode(ct, "wait", aid, "--until", "running")
    ct.run(["systemctl", "stop", *JOURNALD_UNITS])
    try:
        ct.run(["touch", go])
        ct.run(["farmnode", "wait", aid], timeout=240)
        task = next(t for t in json.loads(farmnode(ct, "--json", "tasks").stdout)
                    if t["id"] == task_id)
        assert task["state"] == "done", task
        assert "waits in" in task["reason"] and "spool" in task["reason"], task
        assert not _no_spool_left(ct)
    finally:
        ct.run(["systemctl", "start", *JOURNALD_UNITS])
    _poll("the spool is journaled and removed", lambda: _no_spool_left(ct)
          and len(_stdout_of(ct, f"FARMNODE_TASK={task_id}")) >= lines)
    assert _stdout_of(ct, f"FARMNODE_TASK={task_id}") == [f"line {n}" for n in range(1, lines + 1)]
