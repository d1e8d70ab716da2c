"""Fleet control on the host: -H/-M decoding, and failures through the real transport.

The nodes that fail here fail for real: the host's own ssh, started by sd-bus, cannot
resolve a name or finds nothing listening. Answering nodes are the system tier's
(tests/system/test_fleet_control.py).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from farmnode.fleet.fanout import Command, Outcome, summarise
from farmnode.fleet.target import LOCAL, TargetError, Transport, parse_targets


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "farmnode.cli.main", *args],
                          capture_output=True, text=True, timeout=60)


def test_targets_split_on_commas_repeat_and_keep_their_order_once() -> None:
    got = parse_targets(["b,a", " c ", "a"], ["ct1,root@ct2"])
    assert [(t.transport, t.name) for t in got] == [
        (Transport.HOST, "b"), (Transport.HOST, "a"), (Transport.HOST, "c"),
        (Transport.MACHINE, "ct1"), (Transport.MACHINE, "root@ct2")]
    assert [t.name for t in parse_targets(["root@h:container", "[::1]"], [])] == [
        "root@h:container", "[::1]"]
    assert parse_targets([], []) == [] and LOCAL.label == "localhost"


@pytest.mark.parametrize(("hosts", "machines", "named"), [
    (["a,,b"], [], "-H: empty name"),
    (["-oProxyCommand=x"], [], "-H '-oProxyCommand=x'"),
    (["a b"], [], "-H 'a b'"),
    ([], ["x/y"], "-M 'x/y'"),
    ([], ["ct:inner"], "-M 'ct:inner'"),
])
def test_bad_names_are_refused_naming_the_entry(hosts: list[str], machines: list[str],
                                               named: str) -> None:
    with pytest.raises(TargetError, match="^" + named.replace("[", r"\[")):
        parse_targets(hosts, machines)


def test_bad_names_and_one_node_commands_are_usage_errors() -> None:
    r = cli("-H", "ok,-bad", "status")
    assert r.returncode == 2 and "-H '-bad'" in r.stderr
    r = cli("-H", "node1", "assign", "job.yaml")
    assert r.returncode == 2 and "assign runs on one node" in r.stderr


@pytest.mark.skipif(shutil.which("ssh") is None, reason="needs ssh (make apt: openssh-client)")
def test_each_failed_node_is_named_with_sshs_own_cause_and_the_others_still_run() -> None:
    # 127.0.0.1: nothing listens on port 22 on the build machine (the test checks that ssh
    # said so); node-gone.invalid never resolves (RFC 6761)
    r = cli("--json", "-H", "node-gone.invalid,127.0.0.1", "status")
    assert r.returncode == 1
    events = [json.loads(line) for line in r.stdout.splitlines()]
    failed = {e["node"]: e["error"] for e in events if e.get("event") == "failed"}
    assert set(failed) == {"node-gone.invalid", "127.0.0.1"}
    assert "Could not resolve hostname node-gone.invalid" in failed["node-gone.invalid"]
    if "Connection refused" not in failed["127.0.0.1"]:
        pytest.skip(f"this host answers ssh on 127.0.0.1: {failed['127.0.0.1']}")
    summary = events[-1]["summary"]
    assert summary["ok"] is False
    assert summary["text"].startswith("0 of 2 node(s) succeeded")
    assert set(summary["nodes"]) == {"node-gone.invalid", "127.0.0.1"}
    # human form: each failure on stderr, prefixed by its node; the summary on stdout
    r = cli("-H", "node-gone.invalid", "tasks")
    assert r.returncode == 1
    assert r.stderr.startswith("node-gone.invalid: failed: cannot reach the node: ssh: "
                               "Could not resolve hostname node-gone.invalid"), r.stderr
    assert r.stdout.startswith("fleet: 0 of 1 node(s) succeeded")


def test_an_unknown_machine_is_named() -> None:
    # On a host whose PID 1 is not systemd there is no machined: the error says so by name.
    r = cli("--json", "-M", "no-such-machine", "status")
    assert r.returncode == 1
    (failed,) = [json.loads(x) for x in r.stdout.splitlines() if '"failed"' in x]
    assert failed["node"] == "no-such-machine"
    assert failed["error"].startswith("cannot reach machine no-such-machine: ")


def test_cancel_succeeds_only_where_some_node_held_the_task() -> None:
    a, b = parse_targets(["a", "b"], [])
    cmd = Command("cancel", task=7)
    ok, text = summarise([Outcome(a, True, "no task 7 here"),
                          Outcome(b, True, "task 7: stopping", held=True)], cmd, 0.5)
    assert ok and text == "2 of 2 node(s) succeeded in 0.50 s"
    ok, text = summarise([Outcome(a, True, "no task 7 here"),
                          Outcome(b, True, "no task 7 here")], cmd, 0.5)
    assert not ok and text.endswith("no node has task 7")
    ok, text = summarise([Outcome(a, False, "refused: x"), Outcome(b, True, "online")],
                         Command("status"), 1.0)
    assert not ok and text == "1 of 2 node(s) succeeded in 1.00 s; failed: a"


def test_completion_skips_the_nodes_and_knows_drain() -> None:
    from tests.system.test_package import COMPLETE

    script = COMPLETE.replace("/usr/share/bash-completion/completions/farmnode",
                              str(Path(__file__).resolve().parents[1]
                                  / "packaging/completion/farmnode"))
    lines = ["farmnode -H n1,n2 st", "farmnode --json -M ct1 dr", "farmnode -H n1 state ",
             "farmnode --ho"]
    r = subprocess.run(["bash", "-c", script, "complete", *lines], capture_output=True,
                       text=True, timeout=30, check=True)
    assert r.stdout.splitlines() == ["status state", "drain", "online disabled", "--host"]


@pytest.mark.skipif(shutil.which("ssh") is None, reason="needs ssh (make apt: openssh-client)")
def test_every_call_on_a_dead_connection_is_lost_not_a_crash() -> None:
    import asyncio

    import sdbus

    from farmnode.fleet.calls import Lost, NodeAgent

    async def calls() -> list[str]:
        # ssh exits at once (the name never resolves): the first call sees the connection
        # end (a D-Bus error), later ones a closed socket (sd-bus's own errno)
        agent = NodeAgent(sdbus.sd_bus_open_system_remote("node-gone.invalid"))
        out = []
        for call in (agent.status, agent.status, agent.watch_idle):
            with pytest.raises(Lost) as exc:
                await call()
            out.append(str(exc.value))
        return out

    first, later, watch = asyncio.run(calls())
    assert first == "Connection terminated"
    assert later == watch == "Transport endpoint is not connected"
