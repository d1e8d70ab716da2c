"""The `farmnode` command's own behaviour: parsing, exit codes, messages (no agent needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from farmnode.cli.main import EXIT_UNAVAILABLE, EXIT_USAGE, main


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "farmnode.cli.main", *args], input=stdin,
                          capture_output=True, text=True, timeout=60)


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["cancel", "not-a-number"])
    assert exc.value.code == 2
    assert "invalid int value" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["state", "sleepy"])


def test_bad_assignment_file_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "job.yaml"
    bad.write_text("job: {id: 1\n")
    r = run("assign", str(bad))
    assert r.returncode == EXIT_USAGE
    assert r.stderr.startswith(f"farmnode: {bad}:2:") and "invalid YAML" in r.stderr
    r = run("assign", "-", stdin="[1, 2")
    assert r.returncode == EXIT_USAGE and "<stdin>" in r.stderr
    r = run("assign", str(tmp_path / "missing.yaml"))
    assert r.returncode == EXIT_USAGE and "No such file" in r.stderr


def test_run_refuses_bad_config_with_file_line_and_key(tmp_path: Path) -> None:
    conf = tmp_path / "farmnode.yaml"
    conf.write_text("agent_api_port: 50000\nagent_rma: 12\n")
    r = run("run", "--config", str(conf))
    assert r.returncode == EXIT_USAGE
    assert f"{conf}:2: unknown key 'agent_rma'" in r.stderr
    r = run("run", "--config", str(conf.with_name("none.yaml")), "--set", "agent_api_port=x")
    assert r.returncode == EXIT_USAGE and "agent_api_port" in r.stderr
    r = run("run", "--set", "novalue")
    assert r.returncode == EXIT_USAGE and "KEY=VALUE" in r.stderr


def test_no_bus_is_a_clear_error_not_a_traceback() -> None:
    if Path("/run/dbus/system_bus_socket").exists():
        pytest.skip("this host has a system bus")
    r = run("status")
    assert r.returncode == EXIT_UNAVAILABLE
    assert "cannot connect to the system bus" in r.stderr and "Traceback" not in r.stderr


def test_fakerender_help_works() -> None:
    r = subprocess.run([sys.executable, "-m", "farmnode.jobtypes.fakerender_cmd", "--help"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "25% chance" in r.stdout, r.stderr


def test_wait_reads_the_tasks_again_when_the_agent_changes(tmp_path: Path) -> None:
    """A change a dying agent stored but never signalled is not missed: on a new owner of the
    bus name (`_subscribe` queues RESYNC) `_wait` reads the task objects again. The agent's
    service runs on a private dbus-daemon; tests/system/test_restart.py waits across real
    restarts."""
    import argparse
    import asyncio

    from sdbus import sd_bus_open_user

    from farmnode.bus.interface import BUS_NAME, OBJECT_PATH, Agent1Interface
    from farmnode.cli.main import RESYNC, _wait
    from farmnode.tasks.model import StateChange, TaskState
    from farmnode.tasks.store import Store
    from tests.private_bus import private_bus, serve, stored

    async def scenario() -> int:
        state = tmp_path / "state.db"
        bus = sd_bus_open_user()
        proxy = Agent1Interface.new_proxy(BUS_NAME, OBJECT_PATH, bus)
        changes: asyncio.Queue[tuple[str, dict[str, object]]] = asyncio.Queue()
        async with serve(state) as agent:
            a = stored(agent, [5])
            agent._report_states(a.id, [StateChange(5, TaskState.RUNNING, None, None, None)])
            waiting = asyncio.create_task(_wait(argparse.Namespace(json=False), proxy,
                                                changes, a.id, "finished"))
            await asyncio.sleep(0.1)
            assert not waiting.done()
        # the agent stored the end and died before it signalled it
        dying = Store(state)
        dying.set_task_state(a.id, 5, TaskState.DONE, exit_code=0)
        dying.close()
        async with serve(state):  # its successor: the objects show what is stored
            changes.put_nowait(RESYNC)
            try:
                return await asyncio.wait_for(waiting, 10)
            finally:
                bus.close()

    with private_bus(tmp_path):
        assert asyncio.run(scenario()) == 0


@pytest.mark.parametrize("value", ["[{url: 'https://h.example/x?token=s3cret'}]", "[]",
                                   "https://h.example/x?token=s3cret"])
def test_run_refuses_set_webhooks_and_names_the_dropin_directory(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str) -> None:
    conf = tmp_path / "farmnode.yaml"
    assert main(["run", "--config", str(conf), "--set", "webhook_timeout=5",
                 "--set", f" webhooks ={value}"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err == (f"farmnode: --set webhooks: a list of entries cannot be set on the command "
                   f"line; write it in a drop-in file under {tmp_path}/conf.d/ (e.g. "
                   f"{tmp_path}/conf.d/50-webhooks.yaml; farmnode.yaml(5))\n")
