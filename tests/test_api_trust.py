"""Who may call the HTTP API without credentials: a trusted master, by the peer address of
its connection; everyone else needs credentials. Falcon's testing client drives the real app
and guard; the agent's side of D-Bus is replaced by a small fake of `client.call` (no system
bus on the host), which answers what the agent would: its TrustedMasters, an assignment id."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from falcon import testing

from farmnode.api import client, settings, trusted
from farmnode.api.app import MASTER_CONTACT_EVERY, Guard, create_app
from farmnode.api.generator import generate
from farmnode.config import ConfigError, load_config
from farmnode.master.trust import (
    TrustedMasters,
    normalise,
    parse_networks,
    peer_trusted,
    resolve,
)

ASSIGNMENT = {"job": {"id": 1, "by": 1}, "jobtype": {"name": "command", "version": 1},
              "tasks": [{"id": 7, "frame": 1}]}


class FakeAgent:
    def __init__(self, networks: list[str]) -> None:
        self.networks = networks
        self.assigned: list[str] = []
        self.cancelled: list[int] = []
        self.restarts: list[bool] = []


        self.master_contacts = 0

    class _Prop:
        def __init__(self, value: list[str]) -> None:
            self.value = value

        async def get_async(self) -> list[str]:
            return self.value

    @property
    def trusted_masters(self) -> FakeAgent._Prop:
        return FakeAgent._Prop(self.networks)

    async def try_assign(self, payload: str) -> tuple[str, bool, str, str, dict[str, Any]]:
        self.assigned.append(payload)
        return "a-1", True, "", "", {}

    class _Task:
        def __init__(self, agent: FakeAgent, task_id: int) -> None:
            self.agent, self.task_id = agent, task_id

        async def cancel(self) -> bool:
            self.agent.cancelled.append(self.task_id)
            return True

    async def restart(self, immediately: bool) -> bool:
        self.restarts.append(immediately)
        return True

    async def get_status(self) -> str:
        return '{"state": "online", "agent_id": "x", "farm_name": null}'

    async def list_tasks(self, active_only: bool) -> str:
        return "[]"

    async def note_master_contact(self) -> None:
        self.master_contacts += 1


@pytest.fixture
def agent(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeAgent]:
    conf = tmp_path / "farmnode.yaml"
    conf.write_text("agent_api_username: admin\nagent_api_password: s3cret\n"
                    f"agent_api_tokens_file: {tmp_path}/tokens\n")
    monkeypatch.setattr(settings, "CONFIG_PATH", conf)
    fake = FakeAgent(["192.0.2.10/32", "2001:db8::/64"])

    def call(fn: Any) -> Any:
        return asyncio.run(fn(fake))

    def call_task(task_id: int, fn: Any) -> Any:
        return asyncio.run(fn(FakeAgent._Task(fake, task_id)))

    monkeypatch.setattr(client, "call", call)
    monkeypatch.setattr(client, "call_task", call_task)
    trusted.clear()
    yield fake
    trusted.clear()


def post_assign(peer: str, **headers: str) -> testing.Result:
    return testing.TestClient(create_app()).simulate_post(
        "/api/v1/assign", json=ASSIGNMENT, remote_addr=peer, headers=headers)


@pytest.mark.parametrize("peer", ["192.0.2.10", "::ffff:192.0.2.10", "2001:db8::5"])
def test_a_trusted_master_needs_no_credentials(agent: FakeAgent, peer: str) -> None:
    r = post_assign(peer, **{"User-Agent": "PyFarm/1.0 (master)"})
    assert r.status_code == 202, r.text
    assert r.json == {"id": "a-1"} and len(agent.assigned) == 1


@pytest.mark.parametrize("peer", ["192.0.2.11", "::ffff:192.0.2.11", "2001:db8:1::5",
                                  "127.0.0.1", ""])
def test_anyone_else_needs_credentials(agent: FakeAgent, peer: str) -> None:
    # Claiming to be the master in headers changes nothing: only the address counts.
    r = post_assign(peer, **{"User-Agent": "PyFarm/1.0 (master)",
                             "X-Forwarded-For": "192.0.2.10", "Forwarded": "for=192.0.2.10"})
    assert r.status_code == 401 and agent.assigned == []
    basic = "Basic " + base64.b64encode(b"admin:s3cret").decode()
    assert post_assign(peer, Authorization=basic).status_code == 202


def master_call(peer: str, method: str, **headers: str) -> testing.Result:
    """PyFarm's master's two other unauthenticated calls: pause/delete of a task and
    "restart agent" (its UI), as it sends them: no body for DELETE, JSON for restart."""
    c = testing.TestClient(create_app())
    if method == "DELETE":
        return c.simulate_delete("/api/v1/tasks/7", remote_addr=peer, headers=headers)
    return c.simulate_post("/api/v1/restart", json={}, remote_addr=peer, headers=headers)


@pytest.mark.parametrize("method", ["DELETE", "POST"])
@pytest.mark.parametrize("peer", ["192.0.2.10", "::ffff:192.0.2.10", "2001:db8::5"])
def test_a_trusted_master_may_delete_tasks_and_restart(agent: FakeAgent, peer: str,
                                                       method: str) -> None:
    r = master_call(peer, method)
    assert r.status_code == 202, r.text
    assert (agent.cancelled, agent.restarts) == (([7], []) if method == "DELETE"
                                                 else ([], [False]))


@pytest.mark.parametrize("method", ["DELETE", "POST"])
@pytest.mark.parametrize("peer", ["192.0.2.11", "::ffff:192.0.2.11", "2001:db8:1::5",
                                  "127.0.0.1", ""])
def test_anyone_else_may_not_delete_tasks_or_restart(agent: FakeAgent, peer: str,
                                                     method: str) -> None:
    r = master_call(peer, method, **{"User-Agent": "PyFarm/1.0 (master)",
                                     "X-Forwarded-For": "192.0.2.10"})
    assert r.status_code == 401, r.text
    assert "WWW-Authenticate" in r.headers and r.json["error"]
    assert agent.cancelled == [] and agent.restarts == []
    basic = "Basic " + base64.b64encode(b"admin:s3cret").decode()
    assert master_call(peer, method, Authorization=basic).status_code == 202
    assert len(agent.cancelled) + len(agent.restarts) == 1


MASTER_UA = {"User-Agent": "PyFarm/1.0 (master)"}


@pytest.mark.parametrize(("method", "path"), [("GET", "/api/v1/status"),
                                              ("GET", "/api/v1/tasks/"),
                                              ("POST", "/api/v1/assign"),
                                              ("GET", "/api/versions"),
                                              ("GET", "/api/v1/no-such-thing")])
def test_a_strangers_master_user_agent_is_no_master_contact(agent: FakeAgent, method: str,
                                                            path: str) -> None:
    # The header is anyone's to send: from an untrusted address without credentials the
    # agent's state (last_master_contact) must not change, whatever the answer.
    Guard.last_master_note = -MASTER_CONTACT_EVERY
    c = testing.TestClient(create_app())
    c.simulate_request(method, path, json=ASSIGNMENT, remote_addr="192.0.2.99",
                       headers={**MASTER_UA, "Authorization": "Bearer wrong"})
    assert agent.master_contacts == 0 and agent.assigned == []


@pytest.mark.parametrize("headers", [
    {"Authorization": "Basic " + base64.b64encode(b"admin:s3cret").decode()},
    {}])
def test_the_master_is_noted_once_trusted_or_authenticated(agent: FakeAgent,
                                                           headers: dict[str, str]) -> None:
    Guard.last_master_note = -MASTER_CONTACT_EVERY
    peer = "192.0.2.99" if headers else "192.0.2.10"  # credentials, or a trusted address
    r = testing.TestClient(create_app()).simulate_get(
        "/api/v1/status", remote_addr=peer, headers={**MASTER_UA, **headers})
    assert r.status_code == 200 and agent.master_contacts == 1


def test_trust_covers_only_pyfarm_endpoints(agent: FakeAgent) -> None:
    c = testing.TestClient(create_app())
    # PATCH /api/v1/config is ours: a master never calls it, so trust does not open it
    r = c.simulate_patch("/api/v1/config", json={"farm_name": "x"}, remote_addr="192.0.2.10",
                         headers={"Content-Type": "application/merge-patch+json"})
    assert r.status_code == 401


def test_status_omits_a_null_farm_name(agent: FakeAgent) -> None:
    r = testing.TestClient(create_app()).simulate_get("/api/v1/status",
                                                      remote_addr="192.0.2.10")
    assert r.status_code == 200 and "farm_name" not in r.json
    assert r.json["state"] == "online"


def test_no_answer_from_the_agent_trusts_no_one(agent: FakeAgent,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(fn: Any) -> Any:
        raise RuntimeError("bus down")

    monkeypatch.setattr(client, "call", broken)
    trusted.clear()
    assert not trusted.trusted("192.0.2.10")


def test_peer_address_rules() -> None:
    nets = parse_networks("10.0.0.5, 192.168.1.0/24 fd00::/8")
    assert [str(n) for n in nets] == ["10.0.0.5/32", "192.168.1.0/24", "fd00::/8"]
    assert peer_trusted("10.0.0.5", nets) and peer_trusted("::ffff:10.0.0.5", nets)
    assert peer_trusted("192.168.1.77", nets) and peer_trusted("fd12::1", nets)
    assert not peer_trusted("10.0.0.6", nets) and not peer_trusted("fe80::1%eth0", nets)
    assert not peer_trusted(None, nets) and not peer_trusted("not-an-ip", nets)
    assert normalise("::ffff:127.0.0.1") == ipaddress.ip_address("127.0.0.1")
    with pytest.raises(ValueError, match="'nope'"):
        parse_networks("10.0.0.1 nope")


def test_trusted_masters_default_is_what_master_resolves_to() -> None:
    async def scenario() -> None:
        tm = TrustedMasters("auto", "http://localhost:5000/api/v1")
        assert tm.as_strings() == [] and tm.needs_resolving
        assert await tm.refresh()
        assert "127.0.0.1/32" in tm.as_strings()
        assert {str(n) for n in await resolve("127.0.0.1")} == {"127.0.0.1/32"}
        # an explicit list is used as written; null trusts no address; no master, nothing
        assert TrustedMasters("10.1.0.0/16", "http://m/api/v1").as_strings() == ["10.1.0.0/16"]
        assert TrustedMasters(None, "http://m/api/v1").as_strings() == []
        assert TrustedMasters("auto", None).as_strings() == []
        # a failed lookup keeps what was known
        gone = TrustedMasters("auto", "http://no-such-host.invalid/api/v1")
        gone.networks = parse_networks("10.9.9.9")
        assert not await gone.refresh() and gone.as_strings() == ["10.9.9.9/32"]

    asyncio.run(scenario())


def test_config_keys(tmp_path: Path) -> None:
    conf = tmp_path / "farmnode.yaml"
    conf.write_text("agent_api_trusted_masters: 10.0.0.5 192.168.1.0/24\n"
                    "agent_api_listen: 10.0.0.2, ::1\n")
    c = load_config(conf)
    assert c.agent_api_trusted_masters == "10.0.0.5/32, 192.168.1.0/24"
    assert c.agent_api_listen == "10.0.0.2, ::1"
    assert load_config(tmp_path / "missing.yaml").agent_api_trusted_masters == "auto"
    conf.write_text("agent_api_trusted_masters: 10.0.0.300\n")
    with pytest.raises(ConfigError, match=r"10\.0\.0\.300"):
        load_config(conf)
    conf.write_text("agent_api_listen: 10.0.0.0/8\n")
    with pytest.raises(ConfigError, match="not an IP address"):
        load_config(conf)


def test_generator_writes_listen_addresses(tmp_path: Path) -> None:
    conf = tmp_path / "farmnode.yaml"
    conf.write_text("agent_api_port: 51000\nagent_api_listen: 10.0.0.2 fd00::2\n")
    generate(tmp_path / "gen", conf)
    text = (tmp_path / "gen/farmnode-api.socket.d/50-farmnode-config.conf").read_text()
    assert ("ListenStream=\nListenStream=10.0.0.2:51000\nListenStream=[fd00::2]:51000\n"
            "FreeBind=yes\n") in text
