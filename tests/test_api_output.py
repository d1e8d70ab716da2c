"""Task output and the event stream: credentials by default (a trusted master reads task
logs without), open with agent_api_output_requires_auth: false; event streams hold a bounded
share of the API's threads. The real app and guard through Falcon's testing client, with a
fake of `client.call` (no system bus on the host)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from falcon import testing

from farmnode.api import client, events, settings, trusted
from farmnode.api.app import create_app

BASIC = "Basic " + base64.b64encode(b"admin:s3cret").decode()
MASTER = "192.0.2.10"
ROW = {"time": "2026-12-07T06:00:00.000000+00:00", "pid": 0, "stream": 0, "line": 1,
       "message": "hello"}


class FakeAgent:
    class _Prop:
        async def get_async(self) -> list[str]:
            return [f"{MASTER}/32"]

    trusted_masters = _Prop()

    async def task_log(self, identifier: str) -> int:
        fd = os.memfd_create("log")
        os.write(fd, (json.dumps(ROW) + "\n").encode())
        os.lseek(fd, 0, os.SEEK_SET)
        return fd


@pytest.fixture
def conf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "farmnode.yaml"
    path.write_text("agent_api_username: admin\nagent_api_password: s3cret\n"
                    f"agent_api_tokens_file: {tmp_path}/tokens\n")
    monkeypatch.setattr(settings, "CONFIG_PATH", path)
    fake = FakeAgent()
    monkeypatch.setattr(client, "call", lambda fn: asyncio.run(fn(fake)))
    trusted.clear()
    yield path
    trusted.clear()


def get(path: str, peer: str = "198.51.100.7", **headers: str) -> testing.Result:
    return testing.TestClient(create_app()).simulate_get(path, remote_addr=peer,
                                                         headers=headers)


def test_task_output_needs_credentials_by_default(conf: Path) -> None:
    r = get("/api/v1/task_logs/1")
    assert r.status_code == 401 and r.headers["Connection"] == "close"
    assert "credentials" in r.json["error"]
    r = get("/api/v1/task_logs/1", Authorization=BASIC)
    assert r.status_code == 200 and "hello" in r.text
    # PyFarm's master cannot authenticate: trusted by its address, it reads them as before
    assert get("/api/v1/task_logs/1", peer=MASTER).status_code == 200
    # the event stream is not PyFarm's: trust does not open it
    assert get("/api/v1/events", peer=MASTER).status_code == 401


def test_task_output_can_be_opened(conf: Path) -> None:
    conf.write_text(conf.read_text() + "agent_api_output_requires_auth: false\n")
    r = get("/api/v1/task_logs/1")
    assert r.status_code == 200 and "hello" in r.text


def test_event_streams_are_refused_beyond_their_share(conf: Path) -> None:
    conf.write_text(conf.read_text() + "agent_api_output_requires_auth: false\n")
    taken = [events.slots.take(False) for _ in range(events.MAX_PUBLIC_STREAMS)]
    try:
        assert all(taken) and not events.slots.take(False)
        r = get("/api/v1/events")
        assert r.status_code == 503 and r.headers["Retry-After"]
        assert "without credentials" in r.json["error"] and "at most 4" in r.json["error"]
        # clients with credentials have their own share
        assert events.slots.take(True)
        events.slots.give_back(True)
    finally:
        for _ in taken:
            events.slots.give_back(False)
    assert events.slots.open(False) == 0


def test_a_stream_gives_its_slot_back_once_even_if_never_started() -> None:
    def stream() -> Iterator[bytes]:
        yield b"x"

    for started in (False, True):
        assert events.slots.take(True)
        held = events._Held(stream(), True)
        if started:
            assert next(held) == b"x"
        held.close()
        held.close()
        assert events.slots.open(True) == 0


def test_slots_count_each_kind() -> None:
    s = events.StreamSlots({True: 2, False: 1})
    assert s.take(True) and s.take(True) and not s.take(True)
    assert s.take(False) and not s.take(False)
    s.give_back(True)
    assert s.open(True) == 1 and s.take(True)


def test_a_python_error_reply_keeps_the_bus_connection(monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    resets: list[Any] = []
    monkeypatch.setattr(client, "reset", lambda: resets.append(1))
    loop = asyncio.new_event_loop()
    monkeypatch.setattr(client, "connection", lambda: (loop, None))

    async def recursion(bus: Any) -> None:
        raise RecursionError("maximum recursion depth exceeded")  # as sdbus raises it

    with pytest.raises(client.ApiError) as info:
        client.call_with_bus(recursion)
    assert info.value.status_code == 502 and "RecursionError" in info.value.message
    assert resets == []
    loop.close()
