"""The status page's script in a real headless Chromium against the real app (its guard,
resources and event stream), served in-process by wsgiref with a fake of the agent's D-Bus
side: what the page does with what it is sent, fast. The page against a real agent under a
real systemd is tests/system/test_status_page.py."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import wsgiref.handlers
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest

from farmnode.api import client, events, settings, trusted
from farmnode.api.app import create_app
from farmnode.tasks.tasklog import LogEntry
from tests import chromium

HOSTILE = "<img src=x onerror=window.pwned=1>"


class FakeAgent:
    class _Prop:
        async def get_async(self) -> list[str]:
            return []

    trusted_masters = _Prop()

    def __init__(self) -> None:
        self.tasks: dict[int, dict[str, Any]] = {}
        # The first task list is answered only once released, with the tasks of when it
        # was asked: an answer older than the events that came meanwhile.
        self.asked, self.release = threading.Event(), threading.Event()

    async def get_status(self) -> str:
        return json.dumps({"state": "running", "agent_hostname": f"node{HOSTILE}",
                           "free_ram": 1000, "ram": 4000, "cpus": 8.0, "running_tasks": 1,
                           "assignments": ["a1"], "gpus": [
                               {"id": "g0", "name": f"GPU{HOSTILE}", "assignment": "a1"}],
                           "master_link": None, "storage_error": None})

    async def list_tasks(self, active_only: bool) -> str:
        answer = json.dumps(list(self.tasks.values()))
        if not self.asked.is_set():
            self.asked.set()
            self.release.wait(30)
        return answer

    async def task_log(self, identifier: str) -> int:
        fd = os.memfd_create("log")
        os.write(fd, "".join(json.dumps(LogEntry("t", 1, 0, i, f"line {i} {HOSTILE}")
                                        .to_json()) + "\n" for i in range(300)).encode())
        os.lseek(fd, 0, os.SEEK_SET)
        return fd


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch, tmp_path: Path
           ) -> Iterator[tuple[str, FakeAgent, Callable[..., None]]]:
    conf = tmp_path / "farmnode.yaml"
    conf.write_text("agent_api_username: admin\nagent_api_password: s3cret\n"
                    f"agent_api_tokens_file: {tmp_path}/tokens\n")
    monkeypatch.setattr(settings, "CONFIG_PATH", conf)
    agent = FakeAgent()
    monkeypatch.setattr(client, "call", lambda fn: asyncio.run(fn(agent)))
    local = threading.local()

    def connection() -> tuple[asyncio.AbstractEventLoop, Any]:
        if not hasattr(local, "loop"):
            local.loop = asyncio.new_event_loop()
        return local.loop, None

    monkeypatch.setattr(client, "connection", connection)
    streams: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue[bytes]]] = []

    def subscribe(fn: Any) -> list[Any]:  # the stream's queue stands in for the bus's match
        cells = [c.cell_contents for c in fn.__closure__ or ()]
        streams.append((connection()[0], next(c for c in cells
                                              if isinstance(c, asyncio.Queue))))
        return []

    monkeypatch.setattr(client, "call_with_bus", subscribe)

    def signal(member: str, *args: Any) -> None:
        for loop, q in streams:
            loop.call_soon_threadsafe(q.put_nowait, events.signal_event(member, args))

    app = create_app()

    def wsgi(environ: dict[str, Any], start: Callable[..., Any]) -> Iterable[bytes]:
        if not environ.get("CONTENT_LENGTH"):  # wsgiref's default; gunicorn sends none
            environ.pop("CONTENT_TYPE", None)
        return app(environ, start)

    # wsgiref refuses the Connection: close that the guard sends with a 401.
    monkeypatch.setattr(wsgiref.handlers, "is_hop_by_hop", lambda name: False)
    trusted.clear()
    server = make_server("127.0.0.1", 0, wsgi, server_class=_Server, handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", agent, signal
    finally:
        server.shutdown()
        server.server_close()
        trusted.clear()


def task_row(agent: FakeAgent, tid: int, state: str, progress: float) -> None:
    agent.tasks[tid] = {"id": tid, "frame": 7, "job_id": 3, "assignment_id": "a1",
                        "state": state, "reason": None, "progress": progress}


def test_the_page_renders_what_it_is_sent_as_text(served: tuple[str, FakeAgent, Any],
                                                  tmp_path: Path) -> None:
    where, agent, signal = served
    with chromium.browser(tmp_path / "profile") as b:
        b.navigate(f"http://admin:s3cret@{where}/")
        b.wait_for("document.getElementById('link').textContent === 'live'", 30)
        assert b.wait_for("document.getElementById('ram').textContent.includes('free of')"
                          " && document.getElementById('ram').textContent", 30) \
            == "1000 MiB free of 3.9 GiB"
        assert agent.asked.wait(30)  # the page's first look at the tasks, held
        task_row(agent, 11, "queued", 0.0)
        signal("TaskChanged", "a1", 11, "queued", "", 0.0)
        b.wait_for("document.querySelector('[data-task=\"11\"]')", 30)
        agent.release.set()
        # a new task is looked up for its frame and job (again, after the older answer),
        # and chosen for the log
        assert b.wait_for("(e => e && e.textContent.includes('frame') && e.textContent)"
                          "(document.querySelector('[data-task=\"11\"] .task-name'))", 30) \
            == "Task 11 · frame 7 · job 3"
        for progress in (0.25, 0.5):
            signal("TaskChanged", "a1", 11, "running", "", progress)
            b.wait_for("document.querySelector('[data-task=\"11\"] [role=progressbar]')"
                       f".getAttribute('aria-valuenow') === '{int(progress * 100)}'", 30)
        lines = b.wait_for("(t => t.includes('line 299') && t.trim().split('\\n'))"
                           "(document.getElementById('log').textContent)", 30)
        assert len(lines) == 200 and lines[0].endswith(f"line 100 {HOSTILE}")
        # an event for a task the list does not have yet keeps what the event said
        signal("TaskChanged", "a1", 12, "failed", f"exit 1 {HOSTILE}", 0.1)
        assert b.wait_for("(e => e && e.textContent)(document.querySelector("
                          "'[data-task=\"12\"] .reason'))", 30) == f"exit 1 {HOSTILE}"
        assert b.evaluate("document.querySelector('[data-task=\"12\"] .task-state')"
                          ".textContent") == "failed · 10\u00a0%"
        # the task list's answer (without task 12) does not blank what the event said of 11
        assert b.evaluate("document.querySelector('[data-task=\"11\"]').className") \
            == "running selected"
        # names, reasons and output are text, never markup
        assert b.evaluate("document.getElementById('host').textContent") == f"node{HOSTILE}"
        assert b.evaluate("document.querySelectorAll('img').length") == 0
        assert b.evaluate("window.pwned === undefined")

