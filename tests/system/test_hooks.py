"""Pre and post hooks under a real systemd: in the task's scope, as the job's user, their
lines in the task's journal; a failing pre-hook fails the assignment with its output."""

from __future__ import annotations

from container import Container

from tests.system.conftest import agent_config, assign_wait, assignment, farmnode, journal

PRE = "/usr/local/bin/farmnode-test-pre-hook"
PRE_SCRIPT = """#!/bin/sh
echo "pre as $(id -un) in $(grep -o 'farmnode-task-[0-9]*.scope' /proc/self/cgroup)"
test -e /tmp/hook-ok || { echo scratch is not mounted >&2; exit 1; }
"""
HOOKS = f"""task_pre_hook: {PRE}
task_post_hook: "/bin/sh -c 'echo post saw $FARMNODE_EXIT_CODE'"
"""


def test_hooks_run_in_the_scope_as_the_job_user_and_a_failing_pre_hook_fails_it(
        ct: Container) -> None:
    ct.run(["rm", "-f", "/tmp/hook-ok", "/tmp/job-ran"])
    ct.run(["tee", PRE], input=PRE_SCRIPT)
    ct.run(["chmod", "755", PRE])
    with agent_config(ct, HOOKS):
        a = assignment("command", {"command": ["/bin/sh", "-c", "touch /tmp/job-ran"]}, [1],
                       user="nobody")
        tid = a["tasks"][0]["id"]
        task = assign_wait(ct, a)["tasks"][0]
        assert task["state"] == "failed", task
        assert task["reason"].startswith(f"pre-hook {PRE} failed (exit 1): "), task
        assert "scratch is not mounted" in task["reason"], task
        assert ct.run(["test", "-e", "/tmp/job-ran"], check=False).returncode != 0
        lines = [e["MESSAGE"] for e in journal(ct, f"FARMNODE_TASK={tid}")]
        assert f"pre as nobody in farmnode-task-{tid}.scope" in lines, lines

        ct.run(["touch", "/tmp/hook-ok"])
        a = assignment("command", {"command": ["/bin/sh", "-c", "echo job as $(id -un)"]}, [1],
                       user="nobody")
        tid = a["tasks"][0]["id"]
        task = assign_wait(ct, a)["tasks"][0]
        assert task["state"] == "done", task
        out = farmnode(ct, "logs", str(tid)).stdout.splitlines()
        wanted = [f"pre as nobody in farmnode-task-{tid}.scope", "job as nobody", "post saw 0"]
        at = [next(i for i, line in enumerate(out) if line.endswith(w)) for w in wanted]
        assert at == sorted(at), out
    ct.run(["rm", "-f", "/tmp/hook-ok", "/tmp/job-ran", PRE])
