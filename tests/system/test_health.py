"""Health checks under a real systemd: the built-in checks' units pass in the container, a
failing drop-in disables the node with its name and output (status, CLI, the master) and its
fix brings the node back (never one an admin disabled), a hanging check is killed at its
TimeoutStartSec=, and an agent started afresh takes no work until the checks have passed.

Rounds run every second here (health_interval, set by the module's drop-in).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from container import Container

from tests.master_stub import MasterStub
from tests.system.conftest import assignment, farmnode, journal

DROPIN = "/etc/farmnode/conf.d/50-test-health.yaml"
HEALTH_D = "/etc/farmnode/health.d"
BUILTIN = {"scratch", "state", "journald", "gpu", "network"}
# Fails until the test creates its file; says why on stdout, as an admin's check would.
FLAKY = """#!/bin/sh
if [ -e /run/fn-{name}-ok ]; then echo "{name} fine"; exit 0; fi
echo "/shots is not mounted ({name})"
exit 1
"""


def status(ct: Container) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(farmnode(ct, "--json", "status").stdout)
    return out


def until(ct: Container, pred: Callable[[dict[str, Any]], bool], what: str,
          timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        st = status(ct)
        if pred(st):
            return st
        assert time.monotonic() < deadline, f"{what}: {json.dumps(st, indent=1)}"
        time.sleep(0.2)


def dropin(ct: Container, name: str, text: str) -> None:
    ct.run(["sh", "-c", f"cat > {HEALTH_D}/{name} && chmod 0755 {HEALTH_D}/{name}"],
           input=text)


@pytest.fixture(scope="module")
def master(ct: Container) -> Iterator[MasterStub]:
    with MasterStub() as m:
        ct.run(["tee", DROPIN], input=(
            f"master: {m.address}\nhealth_interval: 1\nagent_master_reannounce: 2\n"
            "agent_http_retry_delay: 0.1\nagent_http_retry_max: 1\n"
            "agent_shutdown_timeout: 3\n"))
        ct.run(["systemctl", "restart", "farmnode.service"])
        try:
            yield m
        finally:
            ct.sh(f"rm -f {DROPIN} {HEALTH_D}/* /run/fn-*-ok\n"
                  "rm -rf /etc/systemd/system/farmnode-health@hang.service.d\n"
                  "systemctl daemon-reload\nsystemctl restart farmnode.service")


def test_builtin_checks_pass_and_journal_under_their_units(ct: Container,
                                                           master: MasterStub) -> None:
    st = until(ct, lambda s: all(c["ok"] for c in s["health"]["checks"]),
               "every built-in check has run (this agent's first round) and passed")
    checks = {c["name"]: c for c in st["health"]["checks"]}
    assert set(checks) == BUILTIN, checks
    assert st["health"]["passed_once"] and st["state"] == "online" and not st["state_reason"]
    assert checks["journald"]["output"][0].startswith("journald answered in")
    assert checks["network"]["output"][0].startswith("route to the master 127.0.0.1")
    # the output is the unit's own journal, not the agent's
    lines = [e["MESSAGE"] for e in journal(ct, "-u", "farmnode-health@state.service")]
    assert "state directory /var/lib/farmnode: writable" in lines
    human = farmnode(ct, "status").stdout
    assert "health journald: ok" in human and "health network: ok" in human


def test_failing_dropin_disables_with_its_output_and_its_fix_brings_the_node_back(
        ct: Container, master: MasterStub) -> None:
    reason = "health check mounts exited with status 1: /shots is not mounted (mounts)"
    dropin(ct, "mounts", FLAKY.format(name="mounts"))
    until(ct, lambda s: s["state"] == "disabled" and s["state_reason"] == reason,
          "the failing check disables the node, with its name and output")
    a = assignment("command", {"command": ["true"]}, [1])
    r = farmnode(ct, "assign", "-", input=json.dumps(a), check=False)
    assert r.returncode != 0 and reason in r.stderr, r.stderr
    assert "health mounts: FAILING (exited with status 1): /shots is not mounted" \
        in farmnode(ct, "status").stdout
    # the master hears the node is disabled
    deadline = time.monotonic() + 10
    while not any(r.body.get("state") == "disabled" for r in master.of("reannounce")):
        assert time.monotonic() < deadline, [r.body for r in master.of("reannounce")]
        time.sleep(0.1)
    heard = len(master.of("reannounce"))
    assert any(e["MESSAGE"] == "/shots is not mounted (mounts)"
               for e in journal(ct, "-u", "farmnode-health@mounts.service"))

    ct.run(["touch", "/run/fn-mounts-ok"])
    st = until(ct, lambda s: s["state"] == "online", "the fixed check brings the node back")
    assert st["state_reason"] is None
    deadline = time.monotonic() + 10
    while master.of("reannounce")[-1].body.get("state") != "online":
        assert time.monotonic() < deadline, [r.body for r in master.of("reannounce")[heard:]]
        time.sleep(0.1)

    # an admin's disable outlives the check's failure and its fix
    farmnode(ct, "state", "disabled")
    ct.run(["rm", "/run/fn-mounts-ok"])
    until(ct, lambda s: reason in (s["state_reason"] or ""), "the check fails again")
    ct.run(["touch", "/run/fn-mounts-ok"])
    st = until(ct, lambda s: all(c["ok"] for c in s["health"]["checks"]), "the check passes")
    assert st["state"] == "disabled" and not st["state_reason"]  # the admin's own
    out = farmnode(ct, "state", "online").stdout
    assert out.strip() == "agent online"
    ct.run(["rm", f"{HEALTH_D}/mounts"])


def test_hanging_check_is_killed_at_its_timeout(ct: Container, master: MasterStub) -> None:
    ct.sh("mkdir -p /etc/systemd/system/farmnode-health@hang.service.d\n"
          "printf '[Service]\\nTimeoutStartSec=2s\\n' > "
          "/etc/systemd/system/farmnode-health@hang.service.d/50-test.conf\n"
          "systemctl daemon-reload")
    # From a node that takes work (in the full tier it was once found disabled here, right
    # after the reload: what did it is not known yet), so the time is the hang's own.
    until(ct, lambda s: s["state"] == "online", "the node takes work before the hang")
    dropin(ct, "hang", "#!/bin/sh\necho 'asking the NFS server'\nexec sleep 600\n")
    until(ct, lambda s: s["state"] == "disabled", "the hanging check disables the node")
    until(ct, lambda s: s["state_reason"] == (
        "health check hang did not finish within its timeout 2 s (TimeoutStartSec=) and was "
        "killed: asking the NFS server"), "the reason names the timeout and the output")
    # systemd killed it at its 2 s timeout, not the 600 s sleep's end (the rounds go on
    # starting it again meanwhile)
    said = [e["MESSAGE"] for e in journal(ct, "-u", "farmnode-health@hang.service")]
    assert "farmnode-health@hang.service: start operation timed out. Terminating." in said
    assert "farmnode-health@hang.service: Failed with result 'timeout'." in said
    # the admin takes the check out: the node is back
    ct.run(["rm", f"{HEALTH_D}/hang"])
    until(ct, lambda s: s["state"] == "online", "a removed check no longer counts")


def test_agent_takes_no_work_at_start_until_the_checks_pass(ct: Container,
                                                             master: MasterStub) -> None:
    # As at boot: /run holds no note that the checks passed since (a restart within a boot
    # after they passed takes work at once; a check that failed is still failed in systemd).
    ct.run(["systemctl", "stop", "farmnode.service"])
    ct.run(["rm", "/run/farmnode/health-passed"])
    dropin(ct, "gate", FLAKY.format(name="gate"))
    ct.run(["systemctl", "start", "farmnode.service"])  # returns at READY
    st = status(ct)
    assert st["state"] == "disabled" and not st["health"]["passed_once"], st
    assert "health check gate exited with status 1" in st["state_reason"]
    a = assignment("command", {"command": ["true"]}, [1])
    r = farmnode(ct, "assign", "-", input=json.dumps(a), check=False)
    assert r.returncode != 0 and "health check gate" in r.stderr, r.stderr
    ct.run(["touch", "/run/fn-gate-ok"])
    st = until(ct, lambda s: s["state"] == "online", "the node takes work once they pass")
    assert st["health"]["passed_once"]
    ct.run(["rm", f"{HEALTH_D}/gate"])
