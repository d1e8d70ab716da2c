"""Webhooks under a real systemd: the agent posts a real task's events to receivers that are
Debian's python3 http.server in the container, signed with the configured secret; a
receiver that accepts and never answers holds up neither the task nor the other receivers;
events queued while a receiver is down survive an agent restart and reach it later."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from container import Container

from tests.system.conftest import agent_pid, agent_ready, assign_wait, assignment, farmnode

DROPIN = "/etc/farmnode/conf.d/50-test-webhooks.yaml"
SECRET_FILE = "/etc/farmnode/webhook-test.secret"
SECRET = "correct horse battery staple"
RECEIVER = "/root/webhook-receiver.py"
SIGNED, SILENT, LATE = 8430, 8431, 8432  # ports: the signed receiver, the silent one, the late
WAIT = 60.0

# Type=notify once it listens, so `systemd-run` returns when posts can be taken. Each post
# is written out before it is answered: what the agent saw accepted is in the file.
RECEIVER_PY = r'''
import http.server, json, os, socket, sys
port, out = int(sys.argv[1]), sys.argv[2]
class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with open(out, "a") as f:
            f.write(json.dumps({"path": self.path, "headers": dict(self.headers),
                                "body": body.decode()}) + "\n")
        self.send_response(204)
        self.end_headers()
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
n = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
n.sendto(b"READY=1", os.environ["NOTIFY_SOCKET"])
server.serve_forever()
'''
# Listens and never accepts: the kernel completes each connection from the backlog, and
# the request sits there unread and unanswered.
SILENT_PY = (
    "import os, socket, time; s = socket.socket(); s.bind(('127.0.0.1', {port})); "
    "s.listen(64); n = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); "
    "n.sendto(b'READY=1', os.environ['NOTIFY_SOCKET']); time.sleep(86400)")


def _start(ct: Container, unit: str, argv: list[str]) -> None:
    ct.run(["systemd-run", "--quiet", f"--unit={unit}", "-p", "Type=notify",
            "-p", "NotifyAccess=all", *argv])


def _receiver(ct: Container, port: int) -> None:
    _start(ct, f"webhook-receiver-{port}", ["/usr/bin/python3", RECEIVER, str(port),
                                            f"/root/posts-{port}.jsonl"])


def _posts(ct: Container, port: int) -> list[dict[str, Any]]:
    text = ct.run(["cat", f"/root/posts-{port}.jsonl"], check=False).stdout
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _events_of(ct: Container, port: int, task_ids: set[int], until: str) -> list[dict[str, Any]]:
    """The posts of these tasks, once each has posted `until` (polled: the receiver is
    another process; the deadline only bounds a failure)."""
    deadline = time.monotonic() + WAIT
    while True:
        posts = [p for p in _posts(ct, port)
                 if json.loads(p["body"])["data"].get("task_id") in task_ids]
        done = {json.loads(p["body"])["data"]["task_id"] for p in posts
                if json.loads(p["body"])["event"] == until}
        if done == task_ids or time.monotonic() > deadline:
            return posts
        time.sleep(0.2)


@pytest.fixture(scope="module")
def hooks(ct: Container) -> Iterator[None]:
    t0 = time.monotonic()
    ct.run(["tee", RECEIVER], input=RECEIVER_PY)
    ct.sh(f"umask 077; printf '%s\\n' '{SECRET}' > {SECRET_FILE}")
    _receiver(ct, SIGNED)
    _start(ct, f"webhook-silent-{SILENT}",
           ["/usr/bin/python3", "-c", SILENT_PY.format(port=SILENT)])
    ct.run(["tee", DROPIN], input=(
        "webhooks:\n"
        f"  - url: http://127.0.0.1:{SILENT}/never\n"
        f"  - url: http://127.0.0.1:{SIGNED}/hooks/farm?node=ct\n"
        "    events: ['task.*', 'agent.*']\n"
        f"    secret_file: {SECRET_FILE}\n"
        f"  - url: http://127.0.0.1:{LATE}/late\n"
        "    events: task.*\n"
        "webhook_timeout: 600\n"
        "webhook_retry_delay: 0.5\n"
        "webhook_retry_max: 1\n"))
    ct.run(["systemctl", "restart", "farmnode.service"])
    print(f"\nwebhooks set-up (receivers, drop-in, agent restart): {time.monotonic() - t0:.2f} s")
    try:
        yield
    finally:
        t0 = time.monotonic()
        ct.run(["rm", "-f", DROPIN, SECRET_FILE])
        ct.run(["systemctl", "stop", f"webhook-receiver-{SIGNED}", f"webhook-silent-{SILENT}",
                f"webhook-receiver-{LATE}"], check=False)
        ct.run(["systemctl", "restart", "farmnode.service"])
        print(f"\nwebhooks tear-down (agent restart): {time.monotonic() - t0:.2f} s")


def test_a_tasks_events_arrive_signed_while_a_silent_receiver_waits(
        ct: Container, hooks: None) -> None:
    a = assignment("fakerender", {"duration": 0.5}, [1, 2])
    ids = {t["id"] for t in a["tasks"]}
    result = assign_wait(ct, a)
    assert [t["state"] for t in result["tasks"]] == ["done", "done"], result
    farmnode(ct, "state", "disabled")
    farmnode(ct, "state", "online")

    posts = _events_of(ct, SIGNED, ids, "task.done")
    secret = SECRET.encode()
    for p in posts + _posts(ct, SIGNED):
        body = p["body"].encode()
        want = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
        assert p["headers"]["X-Farmnode-Signature-256"] == want, p
        decoded = json.loads(body)
        assert p["headers"]["X-Farmnode-Event"] == decoded["event"]
        assert p["headers"]["X-Farmnode-Event-Id"] == decoded["id"]
        assert p["headers"]["Content-Type"] == "application/json"
        assert p["path"] == "/hooks/farm?node=ct"
    for task_id in ids:
        mine = [json.loads(p["body"]) for p in posts
                if json.loads(p["body"])["data"]["task_id"] == task_id]
        names = [m["event"] for m in mine]
        assert names[-1] == "task.done" and "task.running" in names[:-1], names
        assert mine[-1]["data"] == {"assignment_id": result["id"], "task_id": task_id,
                                    "state": "done", "reason": None, "progress": 1.0}
    agent_states = [json.loads(p["body"])["data"]["state"] for p in _posts(ct, SIGNED)
                    if json.loads(p["body"])["event"].startswith("agent.")]
    assert agent_states[-2:] == ["disabled", "online"], agent_states
    status = json.loads(farmnode(ct, "--json", "status").stdout)
    assert status["state"] == "online"


def test_events_queued_while_the_receiver_is_down_survive_an_agent_restart(
        ct: Container, hooks: None) -> None:
    a = assignment("fakerender", {"duration": 0.2}, [1])
    task_id = a["tasks"][0]["id"]
    assert assign_wait(ct, a)["tasks"][0]["state"] == "done"
    # refused connections, retried and logged, while the task itself went on
    log = ct.run(["journalctl", "-u", "farmnode.service", "-o", "cat", "--no-pager",
                  "-g", f"webhook http://127.0.0.1:{LATE}/late: ConnectionRefusedError"],
                 check=False).stdout
    assert "retrying in" in log, log
    before = agent_pid(ct)
    restarted = time.time()
    ct.run(["systemctl", "restart", "farmnode.service"])
    agent_ready(ct, not_pid=before)
    _receiver(ct, LATE)

    posts = _events_of(ct, LATE, {task_id}, "task.done")
    got = [json.loads(p["body"]) for p in posts]
    assert [g["event"] for g in got][-1:] == ["task.done"], got
    assert "task.running" in [g["event"] for g in got]
    # queued by the agent that ran the task, posted by the next one
    assert all(g["time"] < restarted for g in got), (restarted, got)
    assert "X-Farmnode-Signature-256" not in posts[0]["headers"]  # no secret_file for it


def test_a_stopping_agent_posts_the_tasks_it_stopped_before_it_exits(
        ct: Container, hooks: None) -> None:
    a = assignment("command", {"command": ["sleep", "600"]}, [1])
    task_id = a["tasks"][0]["id"]
    aid = farmnode(ct, "assign", "-", input=json.dumps(a)).stdout.strip()
    farmnode(ct, "wait", aid, "--until", "running")
    t0 = time.monotonic()
    # returns once the agent has exited: what the receiver has now, the stopping agent sent
    # (the silent receiver never empties its queue, so the drain runs to its limit)
    ct.run(["systemctl", "stop", "farmnode.service"], timeout=120)
    stopped = time.monotonic() - t0
    try:
        got = [json.loads(p["body"]) for p in _posts(ct, SIGNED)]
        mine = [g["event"] for g in got if g["data"].get("task_id") == task_id]
        assert mine[-1:] == ["task.cancelled"], mine
        assert got[-1]["event"] == "agent.offline", got[-1]
    finally:
        ct.run(["systemctl", "start", "farmnode.service"])
    print(f"\nsystemctl stop with a silent webhook: {stopped:.2f} s")
