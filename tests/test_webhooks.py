"""Webhooks on the host: the signature, the backoff schedule, the on-disk queue, and the
agent core's events posted to real HTTP receivers (http.server on loopback) — answering,
failing, refusing, and one that accepts the connection and never answers."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import http.server
import json
import logging
import os
import queue
import random
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import farmnode
from farmnode.agent.core import Agent, AgentState
from farmnode.config import Config
from farmnode.config.webhooks import Webhook
from farmnode.tasks.model import Assignment, Job, JobTypeRef, Task, TaskState
from farmnode.tasks.store import Store
from farmnode.webhooks import events
from farmnode.webhooks.queue import DeliveryQueue
from farmnode.webhooks.sender import QUEUE_FILE, Schedule, Webhooks

WAIT = 20.0  # s: how long a test waits for a post it expects (a loaded machine is slow)


# --- signing and the schedule ------------------------------------------------------------


def test_signature_is_hex_hmac_sha256_of_the_body() -> None:
    # RFC 4231, test case 2
    assert events.signature(b"Jefe", b"what do ya want for nothing?") == (
        "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")
    h = events.headers("task.done", "id-1", b"{}", b"k")
    assert h[events.SIGNATURE_HEADER] == events.signature(b"k", b"{}")
    assert (h[events.EVENT_HEADER], h[events.ID_HEADER]) == ("task.done", "id-1")
    assert events.SIGNATURE_HEADER not in events.headers("task.done", "id-1", b"{}", None)


class _Fixed(random.Random):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def random(self) -> float:
        return self.value


def test_backoff_doubles_from_the_delay_to_the_cap_with_equal_jitter() -> None:
    schedule = Schedule(delay=2.0, cap=300.0)
    lowest = [schedule.after(n, _Fixed(0.0)) for n in range(1, 11)]
    highest = [schedule.after(n, _Fixed(1.0)) for n in range(1, 11)]
    assert lowest == [1, 2, 4, 8, 16, 32, 64, 128, 150, 150]
    assert highest == [2, 4, 8, 16, 32, 64, 128, 256, 300, 300]
    assert schedule.after(10_000, _Fixed(1.0)) == 300  # no overflow after days away


# --- the queue -----------------------------------------------------------------------------


def test_queue_keeps_order_across_a_reopen(tmp_path: Path) -> None:
    q = DeliveryQueue(tmp_path / QUEUE_FILE, limit=10)
    for n in range(3):
        q.put("http://a/", "task.running", f"id{n}", b"body%d" % n)
    q.put("http://b/", "agent.disabled", "other", b"b")
    first = q.head("http://a/")
    assert first is not None
    q.failed(first.seq)
    q.close()  # the agent ends; the next one opens the same file
    q = DeliveryQueue(tmp_path / QUEUE_FILE, limit=10)
    head = q.head("http://a/")
    assert head is not None and (head.event_id, head.body, head.attempts) == ("id0", b"body0", 1)
    q.done(head.seq)
    assert [q.head("http://a/").event_id, q.pending("http://a/")] == ["id1", 2]  # type: ignore[union-attr]
    assert q.forget_others(["http://a/"]) == {"http://b/": 1}
    assert q.pending("http://b/") == 0


def test_a_full_queue_drops_its_oldest_events(tmp_path: Path) -> None:
    q = DeliveryQueue(tmp_path / QUEUE_FILE, limit=3)
    dropped = [q.put("http://a/", "task.done", f"id{n}", b"x") for n in range(5)]
    assert dropped == [0, 0, 0, 1, 1]
    assert q.pending("http://a/") == 3
    assert q.head("http://a/").event_id == "id2"  # type: ignore[union-attr]
    q.put("http://b/", "task.done", "b0", b"x")  # another webhook's queue is its own
    assert q.pending("http://a/") == 3 and q.pending("http://b/") == 1


def test_a_queued_progress_event_is_superseded_by_the_next(tmp_path: Path) -> None:
    q = DeliveryQueue(tmp_path / QUEUE_FILE, limit=100)
    running = [events.task_event("a1", 7, "running", "", p) for p in (0.1, 0.5, 0.9)]
    for n, e in enumerate(running):
        q.put("http://a/", e.name, f"r{n}", b"x", e.supersedes)
    done = events.task_event("a1", 7, "done", "", 1.0)
    q.put("http://a/", done.name, "d", b"x", done.supersedes)
    ids = []
    while (d := q.head("http://a/")) is not None:
        ids.append(d.event_id)
        q.done(d.seq)
    assert ids == ["r2", "d"]


# --- real receivers ------------------------------------------------------------------------


@dataclass
class Post:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    """http.server on loopback: records each post, answers with the next of `statuses`."""

    statuses: list[int] = field(default_factory=list)
    posts: queue.Queue[Post] = field(default_factory=queue.Queue)
    server: http.server.ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook?token=t"

    def start(self, server: type[http.server.ThreadingHTTPServer] = (
            http.server.ThreadingHTTPServer), port: int = 0) -> Receiver:
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                owner.posts.put(Post(self.path, dict(self.headers), body))
                self.send_response(owner.statuses.pop(0) if owner.statuses else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = server(("127.0.0.1", port), Handler)
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        assert self.server is not None
        self.server.shutdown()
        self.server.server_close()

    async def next(self) -> Post:
        return await asyncio.to_thread(self.posts.get, timeout=WAIT)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


@pytest.fixture
def silent() -> Iterator[str]:
    """A receiver that accepts connections (the kernel does, from its backlog) and never
    reads or answers a byte."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    yield f"http://127.0.0.1:{s.getsockname()[1]}/never"
    s.close()


def _agent(tmp_path: Path, config: Config) -> tuple[Agent, Assignment]:
    store = Store(tmp_path / "farmnode.db")
    agent = Agent(config, store, scopes=None)  # type: ignore[arg-type]  # no task runs here
    a = Assignment(str(uuid.uuid4()), Job(id=4, by=1), JobTypeRef("fakerender", 1),
                   (Task(40, 1.0), Task(41, 2.0)))
    store.add_assignment(a, "farmnode-task-40.scope")
    return agent, a


def _hooks(tmp_path: Path, agent: Agent, config: Config) -> Webhooks:
    hooks = Webhooks(config, tmp_path, lambda: agent.agent_id, lambda: "node1.example")
    hooks.attach(agent)  # as the agent's entry point does
    hooks.start()
    return hooks


FAST = {"webhook_retry_delay": 0.02, "webhook_retry_max": 0.05}


def test_the_cores_events_reach_a_receiver_signed_and_in_order(tmp_path: Path,
                                                               receiver: Receiver) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"hush\n")
    config = Config(webhooks=(Webhook(receiver.url, ("task.*",), str(secret)),
                              Webhook(receiver.url.replace("hook?", "agent?"), ("agent.*",))))
    agent, a = _agent(tmp_path, config)

    async def scenario() -> list[Post]:
        hooks = _hooks(tmp_path, agent, config)
        agent._report_state(a.id, 40, TaskState.RUNNING, None, None, None)
        agent._report_state(a.id, 40, TaskState.FAILED, "exit code 3", 3, None)
        agent.set_state("disabled")
        posts = [await receiver.next() for _ in range(3)]
        await hooks.stop()
        return posts

    posts = asyncio.run(scenario())
    by_event = {p.headers[events.EVENT_HEADER]: p for p in posts}
    assert set(by_event) == {"task.running", "task.failed", "agent.disabled"}
    for p in posts:
        assert p.headers["Content-Type"] == "application/json"
        assert p.headers[events.ID_HEADER] == p.json["id"]
        assert (p.json["agent_id"], p.json["hostname"]) == (agent.agent_id, "node1.example")
    task_posts = [p for p in posts if p.path == "/hook?token=t"]
    assert [p.json["event"] for p in task_posts] == ["task.running", "task.failed"]
    for p in task_posts:
        wanted = "sha256=" + hmac.new(b"hush", p.body, hashlib.sha256).hexdigest()
        assert p.headers[events.SIGNATURE_HEADER] == wanted
    assert by_event["task.failed"].json["data"] == {
        "assignment_id": a.id, "task_id": 40, "state": "failed", "reason": "exit code 3",
        "progress": 0.0}
    agent_post = by_event["agent.disabled"]
    assert agent_post.path == "/agent?token=t"
    assert agent_post.json["data"] == {"state": "disabled"}
    assert events.SIGNATURE_HEADER not in agent_post.headers  # that entry has no secret


def test_failures_are_retried_with_the_same_bytes_then_delivered(
        tmp_path: Path, receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    receiver.statuses = [503, 429, 200]
    config = Config(webhooks=(Webhook(receiver.url),), **FAST)  # type: ignore[arg-type]
    agent, a = _agent(tmp_path, config)

    async def scenario() -> list[Post]:
        hooks = _hooks(tmp_path, agent, config)
        with caplog.at_level(logging.INFO, "farmnode.webhooks"):
            agent._report_state(a.id, 41, TaskState.RUNNING, None, None, None)
            posts = [await receiver.next() for _ in range(3)]
            while hooks.queue.pending(receiver.url):
                await asyncio.sleep(0.01)
        await hooks.stop()
        return posts

    posts = asyncio.run(scenario())
    assert len({p.body for p in posts}) == 1  # one event, the same bytes each time
    text = caplog.text
    assert "webhook http://127.0.0.1:" in text and "token" not in text
    assert "HTTP 503 (event task.running, attempt 1); retrying in" in text
    assert "HTTP 429 (event task.running, attempt 2); retrying in" in text
    assert "answers again after 2 failed attempt(s)" in text


def test_a_refused_event_is_dropped_and_the_next_goes_out(
        tmp_path: Path, receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    receiver.statuses = [400]
    config = Config(webhooks=(Webhook(receiver.url),), **FAST)  # type: ignore[arg-type]
    agent, a = _agent(tmp_path, config)

    async def scenario() -> list[Post]:
        hooks = _hooks(tmp_path, agent, config)
        agent._report_state(a.id, 40, TaskState.RUNNING, None, None, None)
        agent._report_state(a.id, 41, TaskState.RUNNING, None, None, None)
        posts = [await receiver.next() for _ in range(2)]
        await hooks.stop()
        return posts

    posts = asyncio.run(scenario())
    assert [p.json["data"]["task_id"] for p in posts] == [40, 41]
    assert "refused event task.running" in caplog.text and "with HTTP 400" in caplog.text


def test_a_receiver_that_never_answers_holds_up_nothing(
        tmp_path: Path, receiver: Receiver, silent: str) -> None:
    # A deadline far beyond the test: only the loop not waiting on it can let the rest go on.
    config = Config(webhooks=(Webhook(silent), Webhook(receiver.url)), webhook_timeout=600)
    agent, a = _agent(tmp_path, config)

    async def scenario() -> tuple[list[Post], int]:
        hooks = _hooks(tmp_path, agent, config)
        posts = []
        for task_id, state in ((40, TaskState.RUNNING), (40, TaskState.DONE),
                               (41, TaskState.RUNNING), (41, TaskState.DONE)):
            agent._report_state(a.id, task_id, state, None,
                                0 if state is TaskState.DONE else None, None)
            posts.append(await receiver.next())
        assert [t.state for t in agent.store.tasks(a.id)] == [TaskState.DONE] * 2
        await asyncio.wait_for(hooks.stop(), WAIT)  # cancels the stuck post at once
        return posts, DeliveryQueue(tmp_path / QUEUE_FILE, 10).pending(silent)

    posts, still_queued = asyncio.run(scenario())
    assert [p.json["event"] for p in posts] == ["task.running", "task.done"] * 2
    assert still_queued == 4  # kept for the next agent, nothing lost


def test_an_unreachable_webhook_is_retried_and_logged(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{s.getsockname()[1]}/gone"
    s.close()  # nothing listens there: connections are refused
    nowhere = "http://no-such-host.invalid/hook"  # RFC 2606: never resolves
    config = Config(webhooks=(Webhook(url), Webhook(nowhere)), **FAST)  # type: ignore[arg-type]
    agent, _a = _agent(tmp_path, config)

    async def scenario() -> int:
        hooks = _hooks(tmp_path, agent, config)
        with caplog.at_level(logging.WARNING, "farmnode.webhooks"):
            agent.set_state("disabled")
            while (head := hooks.queue.head(url)) is None or head.attempts < 3:
                await asyncio.sleep(0.01)
            while (other := hooks.queue.head(nowhere)) is None or other.attempts < 1:
                await asyncio.sleep(0.01)
        await hooks.stop()
        return head.attempts

    assert asyncio.run(scenario()) >= 3
    assert f"webhook {url}: ConnectionRefusedError" in caplog.text
    assert f"webhook {nowhere}: cannot resolve no-such-host.invalid:" in caplog.text
    assert "(event agent.disabled, attempt 1); retrying in" in caplog.text
    assert "(event agent.disabled, attempt 3); retrying in" in caplog.text
    assert agent.state == AgentState.DISABLED


def test_a_webhook_no_longer_configured_loses_its_queue_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    q = DeliveryQueue(tmp_path / QUEUE_FILE, limit=10)
    q.put("http://old.example/x?token=t", "task.done", "i", b"x")
    q.close()
    Webhooks(Config(webhooks=(Webhook("http://new.example/"),)), tmp_path, str, str)
    assert ("webhook http://old.example/x is no longer configured: dropped its 1 queued "
            "event(s)") in caplog.text


def test_what_one_agent_queued_the_next_one_posts(tmp_path: Path) -> None:
    # The first agent's receiver is down the whole time; the second's answers.
    down = Receiver().start()
    url = down.url
    down.stop()
    config = Config(webhooks=(Webhook(url),), **FAST)  # type: ignore[arg-type]
    agent, a = _agent(tmp_path, config)

    async def first() -> None:
        hooks = _hooks(tmp_path, agent, config)
        agent._report_state(a.id, 40, TaskState.RUNNING, None, None, None)
        agent._report_state(a.id, 40, TaskState.DONE, None, 0, None)
        while (head := hooks.queue.head(url)) is None or head.attempts < 1:
            await asyncio.sleep(0.01)
        await hooks.stop()

    asyncio.run(first())
    port = int(url.split(":")[2].split("/")[0])
    up = Receiver()

    class Server(http.server.ThreadingHTTPServer):
        allow_reuse_address = True

    async def second() -> list[Post]:
        hooks = Webhooks(config, tmp_path, lambda: agent.agent_id, str)
        hooks.start()  # nothing new happens: only what the first agent queued goes out
        posts = [await up.next() for _ in range(2)]
        await hooks.stop()
        return posts

    up.start(Server, port)
    try:
        posts = asyncio.run(second())
    finally:
        up.stop()
    assert [p.json["event"] for p in posts] == ["task.running", "task.done"]


def test_a_stop_with_a_drain_posts_what_is_queued_first(tmp_path: Path, receiver: Receiver,
                                                         silent: str) -> None:
    config = Config(webhooks=(Webhook(receiver.url), Webhook(silent)), webhook_timeout=600)
    agent, a = _agent(tmp_path, config)

    async def scenario() -> tuple[int, int]:
        hooks = _hooks(tmp_path, agent, config)
        for task_id in (40, 41):
            agent._report_state(a.id, task_id, TaskState.CANCELLED, "agent stopped", None,
                                None)
        # the silent one never empties: the drain ends at its limit, not at its answer
        await hooks.stop(drain=0.5)
        q = DeliveryQueue(tmp_path / QUEUE_FILE, 10)
        return q.pending(receiver.url), q.pending(silent)

    assert asyncio.run(scenario()) == (0, 2)
    assert [receiver.posts.get_nowait().json["event"] for _ in range(2)] == [
        "task.cancelled"] * 2


# --- a kill -9 between the store's commit and the queue's -----------------------------------

# The first agent: queues task 40's `running` (its receiver is not posted to: no sender
# runs), then is killed with SIGKILL inside the queue's insert of task 40's `done`, after
# the state store committed it: the window in which an event had no durable home.
_KILLED_AGENT = """
import os, signal, sys
from pathlib import Path
from farmnode.agent.core import Agent
from farmnode.config import Config
from farmnode.config.webhooks import Webhook
from farmnode.tasks.model import TaskState
from farmnode.tasks.store import Store
from farmnode.webhooks.queue import DeliveryQueue
from farmnode.webhooks.sender import Webhooks

state_dir, url, assignment_id = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
config = Config(webhooks=(Webhook(url),))
agent = Agent(config, Store(state_dir / "farmnode.db"), scopes=None)
hooks = Webhooks(config, state_dir, lambda: agent.agent_id, str)
hooks.attach(agent)
agent._report_state(assignment_id, 40, TaskState.RUNNING, None, None, None)

def killed(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

DeliveryQueue.put_all = killed
agent._report_state(assignment_id, 40, TaskState.DONE, None, 0, None)
print("not killed")
"""


def test_a_kill_9_after_the_stores_commit_loses_no_event_and_repeats_none(
        tmp_path: Path, receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    config = Config(webhooks=(Webhook(receiver.url),))
    agent, a = _agent(tmp_path, config)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(farmnode.__file__).parent.parent), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", _KILLED_AGENT, str(tmp_path), receiver.url, a.id],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert agent.store.task_in(a.id, 40).state is TaskState.DONE  # type: ignore[union-attr]
    assert DeliveryQueue(tmp_path / QUEUE_FILE, 10).pending(receiver.url) == 1  # running only

    async def restart() -> list[Post]:
        hooks = _hooks(tmp_path, agent, config)  # a fresh agent's start, on the same files
        posts = [await receiver.next() for _ in range(2)]
        while hooks.queue.pending(receiver.url):
            await asyncio.sleep(0.01)
        await hooks.stop()
        return posts

    with caplog.at_level(logging.INFO, "farmnode.webhooks"):
        posts = asyncio.run(restart())
    assert [(p.json["event"], p.json["data"]["task_id"]) for p in posts] == [
        ("task.running", 40), ("task.done", 40)]
    assert posts[1].json["data"]["progress"] == 1.0
    assert "queued 1 task change(s) the store holds and no event was queued for" in caplog.text
    assert receiver.posts.empty()  # 41 did not change; nothing went out twice

    # Another start finds every change queued: nothing is sent again.
    hooks = Webhooks(config, tmp_path, lambda: agent.agent_id, str)
    assert hooks.catch_up(agent.store.tasks(active_only=True)) == 0
    assert hooks.queue.pending(receiver.url) == 0
    hooks.queue.close()


def test_catch_up_sends_no_history_and_forgets_ended_assignments(tmp_path: Path) -> None:
    config = Config(webhooks=(Webhook("http://127.0.0.1:9/failed", ("task.failed",)),))
    agent, a = _agent(tmp_path, config)
    agent._report_state(a.id, 40, TaskState.RUNNING, None, None, None)  # no webhooks yet
    tasks = lambda: agent.store.tasks(active_only=True)  # noqa: E731
    hooks = Webhooks(config, tmp_path, lambda: agent.agent_id, str)
    # A queue that never knew these tasks: their past is not news.
    assert hooks.catch_up(tasks()) == 0
    assert hooks.queue.pending(config.webhooks[0].url) == 0
    assert set(hooks.queue.marks() or {}) == {(a.id, 40), (a.id, 41)}
    # A change the webhook does not want is marked, not queued, and not looked at again.
    agent.store.set_task_state(a.id, 41, TaskState.RUNNING)
    assert hooks.catch_up(tasks()) == 0
    assert (hooks.queue.marks() or {})[(a.id, 41)].state == "running"
    # One it wants is queued once.
    agent.store.set_task_state(a.id, 41, TaskState.FAILED, "exit code 1", 1)
    assert [hooks.catch_up(tasks()), hooks.catch_up(tasks())] == [1, 0]
    assert hooks.queue.pending(config.webhooks[0].url) == 1
    # An ended assignment's tasks change no more: their marks go.
    agent.store.finish_assignment(a.id)
    assert hooks.catch_up(tasks()) == 0
    assert hooks.queue.marks() == {}
    hooks.queue.close()


def test_no_log_line_carries_a_urls_credentials_or_query(
        tmp_path: Path, receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    receiver.statuses = [503, 400]
    url = receiver.url.replace("http://", "http://hook-user:pw-s3cret@").replace(
        "token=t", "token=tok-s3cret")
    config = Config(webhooks=(Webhook(url),), **FAST)  # type: ignore[arg-type]
    old = DeliveryQueue(tmp_path / QUEUE_FILE, limit=10)
    old.put("http://old-user:pw-s3cret@old.example/x?token=tok-s3cret", "task.done", "i", b"x")
    old.close()
    agent, a = _agent(tmp_path, config)

    async def scenario() -> list[Post]:
        hooks = _hooks(tmp_path, agent, config)
        agent._report_state(a.id, 40, TaskState.RUNNING, None, None, None)
        posts = [await receiver.next() for _ in range(2)]  # failed, then refused
        await asyncio.wait_for(hooks.senders[0].idle.wait(), WAIT)  # the refusal logged
        await hooks.stop()
        return posts

    with caplog.at_level(logging.DEBUG):
        posts = asyncio.run(scenario())
    assert posts[0].path == "/hook?token=tok-s3cret"  # the receiver still gets its token
    text = caplog.text
    assert "HTTP 503" in text and "with HTTP 400" in text and "no longer configured" in text
    assert "s3cret" not in text and "-user" not in text, text
