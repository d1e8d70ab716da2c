"""What a task cannot do to the node, judged by the real journald, systemd and accounts."""

from __future__ import annotations

import json

from container import Container

from tests.system.conftest import assign_wait, assignment, journal

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
