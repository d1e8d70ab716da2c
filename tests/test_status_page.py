"""The status page (GET /, /static/*) and what it reads: the page asks for the credentials
task output needs and is no way round them, its files name no other origin, a log's tail,
and the event stream's `node` snapshots. The real app and guard through Falcon's testing
client, with a fake of the agent's D-Bus side (no system bus on the host); the page itself
runs in a real Chromium in tests/system/test_status_page.py."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import falcon
import pytest
from falcon import testing

from farmnode.api import client, events, node_events, page, settings, trusted
from farmnode.api.app import create_app
from farmnode.api.auth import TOKEN_USER, Basic, accepted
from farmnode.tasks.tasklog import LogEntry

TOKEN = "tok-3f9a"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


ADMIN = basic("admin", "s3cret")
ENTRIES = [LogEntry(f"2026-12-07T06:00:0{i}.000000+00:00", 7, 0, i, f"line {i}")
           for i in range(1, 6)]


class FakeAgent:
    class _Prop:
        async def get_async(self) -> list[str]:
            return []

    trusted_masters = _Prop()

    def __init__(self) -> None:
        self.status = {"state": "running", "agent_hostname": "node7", "free_ram": 1000,
                       "ram": 4000, "cpus": 8.0, "running_tasks": 1, "assignments": ["a"],
                       "jobs": [3], "gpus": [], "uptime": 1.0, "version": "0.1.0"}

    async def get_status(self) -> str:
        self.status["uptime"] += 1  # changes on every call, as the agent's does
        return json.dumps(self.status)

    async def task_log(self, identifier: str) -> int:
        fd = os.memfd_create("log")
        os.write(fd, "".join(json.dumps(e.to_json()) + "\n" for e in ENTRIES).encode())
        os.lseek(fd, 0, os.SEEK_SET)
        return fd


@pytest.fixture
def agent(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeAgent]:
    path = tmp_path / "farmnode.yaml"
    (tmp_path / "tokens").write_text(f"{TOKEN}\n")
    path.write_text("agent_api_username: admin\nagent_api_password: s3cret\n"
                    f"agent_api_tokens_file: {tmp_path}/tokens\n")
    monkeypatch.setattr(settings, "CONFIG_PATH", path)
    fake = FakeAgent()
    monkeypatch.setattr(client, "call", lambda fn: asyncio.run(fn(fake)))
    trusted.clear()
    yield fake
    trusted.clear()


def get(path: str, **headers: str) -> testing.Result:
    return testing.TestClient(create_app()).simulate_get(path, remote_addr="198.51.100.7",
                                                         headers=headers)


def set_config(extra: str) -> None:
    settings.CONFIG_PATH.write_text(settings.CONFIG_PATH.read_text() + extra)


def test_the_page_asks_for_what_task_output_needs(agent: FakeAgent) -> None:
    r = get("/", Accept="text/html,application/xhtml+xml,*/*;q=0.8")
    # A browser's own credential prompt: Basic is offered
    assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Basic ")
    assert get("/api/v1/task_logs/1").status_code == 401
    for creds in (ADMIN, basic(TOKEN_USER, TOKEN), f"Bearer {TOKEN}"):
        r = get("/", Authorization=creds)
        assert r.status_code == 200, creds
        assert r.headers["Content-Type"] == "text/html; charset=utf-8"
    assert get("/", Authorization=basic(TOKEN_USER, "guess")).status_code == 401
    assert get("/", Authorization=basic("admin", TOKEN)).status_code == 401


def test_the_page_is_open_only_when_what_it_shows_is(agent: FakeAgent) -> None:
    set_config("agent_api_output_requires_auth: false\n")
    assert get("/").status_code == 200
    assert get("/api/v1/task_logs/1").status_code == 200
    set_config("agent_api_read_requires_auth: true\n")
    for path in ("/", "/api/v1/status", "/api/v1/events"):
        assert get(path).status_code == 401, path


def test_static_files_hold_no_data_and_are_served_to_anyone(agent: FakeAgent) -> None:
    for name, kind in (("page.css", "text/css"), ("page.js", "text/javascript")):
        r = get(f"/static/{name}")
        assert r.status_code == 200 and r.headers["Content-Type"].startswith(kind)
        assert r.content == page.read_asset(page.ASSETS[name])
        assert "script-src 'self'" in r.headers["Content-Security-Policy"]
        assert r.headers["X-Content-Type-Options"] == "nosniff"
    for bad in ("/static/app.py", "/static/index.html"):
        r = get(bad)
        assert r.status_code == 404 and "page.css" in r.json["error"], bad
    assert get("/static/..%2Fapp.py").status_code == 404  # no route: two segments


def test_the_page_names_no_other_origin_and_fits_a_phone() -> None:
    html = page.read_asset(page.PAGE).decode()
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in html
    files = [html] + [page.read_asset(a).decode() for a in page.ASSETS.values()]
    for text in files:
        # no external asset (the page works offline) and nothing inline the CSP would block
        assert not re.search(r"(https?:)?//[a-z0-9]", text.replace("// ", "")), text[:80]
        assert "innerHTML" not in text  # data reaches the page as text only
    assert re.findall(r'(?:src|href)="([^"]+)"', html) == ["/static/page.css",
                                                            "/static/page.js"]
    assert "<script>" not in html and "style=" not in html


def test_a_token_is_the_basic_password_of_the_token_user() -> None:
    tokens = frozenset({"t1", "t2"})
    assert accepted(Basic(TOKEN_USER, "t2"), None, None, tokens)
    assert not accepted(Basic(TOKEN_USER, "t3"), None, None, tokens)
    assert not accepted(Basic("admin", "t1"), "admin", "pw", tokens)
    # a configured user named like it keeps its own password
    assert accepted(Basic(TOKEN_USER, "pw"), TOKEN_USER, "pw", tokens)


def test_a_log_tail_keeps_the_last_lines(agent: FakeAgent) -> None:
    r = get("/api/v1/task_logs/1?format=text&tail=2", Authorization=ADMIN)
    assert r.status_code == 200
    assert [line.split(" ", 2)[2] for line in r.text.splitlines()] == ["line 4", "line 5"]
    r = get("/api/v1/task_logs/1?tail=1", Authorization=ADMIN)
    assert r.text.splitlines() == ["2026-12-07T06:00:05.000000+00:00,7,0,5,line 5"]
    for bad in ("0", "10001", "abc", "-1", "9" * 30):
        r = get(f"/api/v1/task_logs/1?format=text&tail={bad}", Authorization=ADMIN)
        assert r.status_code == 400 and "tail" in r.json["error"], bad


def test_node_watch_samples_on_state_changes_not_on_progress() -> None:
    w = node_events.NodeWatch(next_sample=100.0)
    assert w.sampled({"state": "online", "free_ram": 5, "uptime": 1}, 0.0) is not None
    assert w.next_sample == node_events.RESAMPLE
    w.saw("TaskChanged", ("a", 1, "queued", "", 0.0), 1.0)
    assert w.due(1.0 + node_events.SETTLE)
    w.sampled(None, 1.5)  # the agent did not answer: nothing sent, tried again later
    w.saw("TaskChanged", ("a", 1, "queued", "", 0.0), 2.0)
    w.saw("TaskChanged", ("a", 1, "queued", "", 0.5), 2.0)
    assert not w.due(2.0 + node_events.SETTLE)  # progress alone changes no figure
    w.saw("TaskChanged", ("a", 1, "done", "", 1.0), 2.0)
    assert w.due(2.0 + node_events.SETTLE)
    w.sampled({"state": "online", "free_ram": 5, "uptime": 9}, 3.0)
    w.saw("StateChanged", ("disabled",), 3.0)
    assert w.due(3.0 + node_events.SETTLE)
    # the same figures are no news; uptime is not one of them
    assert w.sampled({"state": "online", "free_ram": 5, "uptime": 10}, 4.0) is None
    assert w.sampled({"state": "online", "free_ram": 4, "uptime": 11}, 9.0) == {
        **dict.fromkeys(node_events.NODE_KEYS), "state": "online", "free_ram": 4,
        "master_link": None}
    link = {"master": "http://m:5000", "announced": True, "queued_reports": 0,
            "last_error": None, "last_contact": "2026-12-07T06:00:00Z"}
    assert w.sampled({"state": "online", "master_link": link}, 10.0)["master_link"] == {
        k: link[k] for k in node_events.LINK_KEYS}
    # the master's polls alone are no news
    assert w.sampled({"state": "online", "master_link": {
        **link, "last_contact": "2026-12-07T06:00:05Z"}}, 11.0) is None


def _events(stream: Iterator[bytes], n: int) -> list[tuple[str, dict[str, Any]]]:
    out = []
    while len(out) < n:
        chunk = next(stream).decode()
        m = re.fullmatch(r"event: (\w+)\ndata: (.*)\n\n", chunk)
        if m:
            out.append((m[1], json.loads(m[2])))
    return out


def test_the_event_stream_sends_the_node_and_its_changes(agent: FakeAgent,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    loop = asyncio.new_event_loop()
    monkeypatch.setattr(client, "connection", lambda: (loop, None))
    monkeypatch.setattr(client, "call_with_bus", lambda fn: [])  # no signals on the host
    monkeypatch.setattr(node_events, "RESAMPLE", 0.01)
    req = testing.create_req(path="/api/v1/events", headers={"Accept": "text/event-stream"})
    resp = falcon.Response()
    events.Events().on_get(req, resp)
    stream = resp.stream
    try:
        first = _events(stream, 2)
        assert first[0] == ("agent", {"state": "running"})
        assert first[1][0] == "node" and first[1][1]["free_ram"] == 1000
        assert "uptime" not in first[1][1]
        agent.status["free_ram"] = 900  # no signal says so: a sample does
        assert _events(stream, 1) == [("node", {**first[1][1], "free_ram": 900})]
    finally:
        stream.close()
        loop.close()
    assert events.slots.open(False) == 0
