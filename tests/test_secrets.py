"""Secrets stay private: the agent refuses a config file holding one that others can read,
and the API password reaches the API as a systemd credential, as the tokens do."""

from __future__ import annotations

import asyncio
import base64
import grp
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from falcon import testing

from farmnode.api import client, settings, trusted
from farmnode.api.app import create_app
from farmnode.api.generator import generate
from farmnode.config import ConfigError, load_config


@pytest.fixture
def etc(tmp_path: Path) -> Path:
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "farmnode.yaml").write_text(
        f"agent_api_tokens_file: {tmp_path}/tokens\n"
        f"agent_api_password_file: {tmp_path}/api-password\n")
    return tmp_path


def dropin(etc: Path, text: str, mode: int) -> Path:
    path = etc / "conf.d" / "50-site.yaml"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_a_readable_file_holding_the_password_stops_the_agent(etc: Path) -> None:
    path = dropin(etc, "agent_api_username: master\nagent_api_password: s3cret\n", 0o644)
    with pytest.raises(ConfigError) as err:
        load_config(etc / "farmnode.yaml", private_secrets=True)
    assert str(err.value).startswith(
        f"{path}:2: agent_api_password: this file holds a secret but everyone can read it "
        "(mode 0644, ")
    assert "chmod 0600" in str(err.value)
    # The API and the CLI read the same files without that rule (the agent is the judge).
    assert load_config(etc / "farmnode.yaml").agent_api_password == "s3cret"
    path.chmod(0o600)
    assert load_config(etc / "farmnode.yaml", private_secrets=True).agent_api_password
    path.chmod(0o640)  # group root (or farmnode) may read it
    os.chown(path, -1, 0)
    assert load_config(etc / "farmnode.yaml", private_secrets=True).agent_api_password


def test_a_group_other_than_farmnode_must_not_read_it(etc: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown to another group needs root")
    path = dropin(etc, "agent_api_password: s3cret\n", 0o640)
    os.chown(path, -1, grp.getgrnam("daemon").gr_gid)
    with pytest.raises(ConfigError, match=r"group 'daemon' can read it \(mode 0640"):
        load_config(etc / "farmnode.yaml", private_secrets=True)


def test_a_file_without_secrets_may_be_readable(etc: Path) -> None:
    dropin(etc, "agent_api_username: master\nagent_api_password: null\n", 0o644)
    assert load_config(etc / "farmnode.yaml", private_secrets=True).agent_api_username


@pytest.mark.parametrize("name", ["tokens", "api-password"])
def test_readable_credential_files_stop_the_agent(etc: Path, name: str) -> None:
    (etc / name).write_text("secret\n")
    (etc / name).chmod(0o604)
    with pytest.raises(ConfigError, match=rf"{etc}/{name} holds secrets but everyone can read"
                                          r" it \(mode 0604"):
        load_config(etc / "farmnode.yaml", private_secrets=True)
    (etc / name).chmod(0o600)
    load_config(etc / "farmnode.yaml", private_secrets=True)


def test_generator_hands_the_password_file_over_as_a_credential(etc: Path) -> None:
    generate(etc / "gen", etc / "farmnode.yaml")
    assert not (etc / "gen/farmnode-api.service.d").exists()  # neither file: no credential
    (etc / "api-password").write_text("s3cret\n")
    generate(etc / "gen", etc / "farmnode.yaml")
    text = (etc / "gen/farmnode-api.service.d/50-farmnode-config.conf").read_text()
    assert f"LoadCredential=api-password:{etc}/api-password\n" in text
    assert "tokens" not in text


class FakeAgent:
    class _Prop:
        async def get_async(self) -> list[str]:
            return []

    trusted_masters = _Prop()

    async def try_assign(self, payload: str) -> tuple[str, bool, str, str, dict[str, Any]]:
        return "a-1", True, "", "", {}


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch, etc: Path) -> Iterator[Path]:
    creds = etc / "credentials"
    creds.mkdir()
    (etc / "farmnode.yaml").write_text(
        "agent_api_username: master\nagent_api_password: from-yaml\n"
        f"agent_api_tokens_file: {etc}/tokens\n"
        f"agent_api_password_file: {etc}/not-readable-by-the-api\n")
    monkeypatch.setattr(settings, "CONFIG_PATH", etc / "farmnode.yaml")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))

    def call(fn: Any) -> Any:
        return asyncio.run(fn(FakeAgent()))

    monkeypatch.setattr(client, "call", call)
    trusted.clear()
    yield creds
    trusted.clear()


def assign(password: str) -> int:
    basic = "Basic " + base64.b64encode(f"master:{password}".encode()).decode()
    r = testing.TestClient(create_app()).simulate_post(
        "/api/v1/assign", json={}, remote_addr="192.0.2.1", headers={"Authorization": basic})
    return r.status_code


def test_the_api_takes_the_password_from_its_credential(api: Path) -> None:
    assert assign("from-yaml") == 202  # no credential: PyFarm's agent_api_password
    (api / "api-password").write_text("from credential\n")  # as systemd hands it over
    assert assign("from credential") == 202  # the trailing newline is not part of it
    assert assign("from-yaml") == 401  # the credential wins
