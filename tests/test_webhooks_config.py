"""The `webhooks` setting: entries become typed Webhooks, bad ones stop the load with the
file, line, key and entry; secret files are checked as the agent loads its config."""

from __future__ import annotations

from pathlib import Path

import pytest

from farmnode.config import Config, ConfigError, load_config, redacted
from farmnode.config.webhooks import Webhook


@pytest.fixture
def etc(tmp_path: Path) -> Path:
    (tmp_path / "conf.d").mkdir()
    return tmp_path


def load(etc: Path, text: str, **kwargs: object) -> object:
    (etc / "farmnode.yaml").write_text(text)
    return load_config(etc / "farmnode.yaml", environ={}, **kwargs)  # type: ignore[arg-type]


def error(etc: Path, text: str, **kwargs: object) -> str:
    with pytest.raises(ConfigError) as info:
        load(etc, text, **kwargs)
    assert info.value.key is not None
    return str(info.value)


def test_entries_become_webhooks(etc: Path) -> None:
    config = load(etc, "farm_name: f\nwebhooks:\n"
                       "  - url: https://hooks.example.com/farm?token=x\n"
                       "    events: [task.failed, 'agent.*']\n"
                       "  - url: http://[::1]:8080/all\n")
    assert config.webhooks == (  # type: ignore[attr-defined]
        Webhook("https://hooks.example.com/farm?token=x", ("task.failed", "agent.*")),
        Webhook("http://[::1]:8080/all", ("*",)))
    first, second = config.webhooks  # type: ignore[attr-defined]
    assert first.wants("task.failed") and first.wants("agent.disabled")
    assert not first.wants("task.done") and second.wants("task.running")
    # log lines name a webhook without its query (tokens live there)
    assert first.name == "https://hooks.example.com/farm"
    assert second.name == "http://[::1]:8080/all"
    # GET /api/v1/config and GetConfig show no more of a URL than where it goes: services
    # put the receiver's token in its path or query
    assert redacted(config)["webhooks"] == [  # type: ignore[arg-type]
        {"url": "https://hooks.example.com/********", "events": ["task.failed", "agent.*"],
         "secret_file": None},
        {"url": "http://[::1]:8080/********", "events": ["*"], "secret_file": None}]
    bare = load(etc, "webhooks: [{url: 'http://h.example:81/'}]\n")
    assert redacted(bare)["webhooks"][0]["url"] == "http://h.example:81/"  # type: ignore[arg-type]


def test_no_webhooks_by_default(etc: Path) -> None:
    assert load(etc, "").webhooks == ()  # type: ignore[attr-defined]


@pytest.mark.parametrize(("entries", "wanted"), [
    ("  - url: ftp://files.example.com/in\n",
     "webhooks: entry 2: url must be an http:// or https:// URL, got 'ftp://files.example.com"),
    ("  - url: file:///tmp/x\n", "entry 2: url must be an http:// or https:// URL"),
    ("  - url: http://bücher.example/\n", "entry 2: url must be ASCII (a host as punycode"),
    ("  - url: 'http:///nohost'\n", "entry 2: url 'http:///nohost' names no host"),
    ("  - url: http://h:99999/\n", "entry 2: url 'http://h:99999/' is not a valid URL"),
    ("  - url: http://u:pw@h/\n", "entry 2: url http://…@h must not carry credentials"),
    ("  - {url: http://h/, events: tsak.*}\n", "entry 2: event pattern 'tsak.*' matches no"),
    ("  - {url: http://h/, events: []}\n", "entry 2: events must be a pattern or a non-empty"),
    ("  - {url: http://h/, secret: s3cret}\n", "entry 2: unknown key 'secret'"),
    ("  - {events: '*'}\n", "entry 2: url is missing"),
    ("  - http://h/\n", "entry 2: expected a mapping with url and events, got 'http://h/'"),
    ("  - {url: http://h/, secret_file: rel/path}\n",
     "entry 2: secret_file must be an absolute path"),
    ("  - url: http://a.example/ok\n", "entry 2: url http://a.example/ok is already entry 1"),
])
def test_a_bad_entry_names_file_line_key_and_entry(etc: Path, entries: str,
                                                   wanted: str) -> None:
    text = "farm_name: f\n\nwebhooks:\n  - url: http://a.example/ok\n" + entries
    message = error(etc, text)
    assert message.startswith(f"{etc}/farmnode.yaml:3: webhooks: "), message
    assert wanted in message, message


def test_not_a_list(etc: Path) -> None:
    message = error(etc, "webhooks: http://h/\n")
    assert message == f"{etc}/farmnode.yaml:1: webhooks: expected a list, got 'http://h/'"


def test_retry_max_below_retry_delay(etc: Path) -> None:
    message = error(etc, "webhook_retry_delay: 10\nwebhook_retry_max: 5\n")
    assert "webhook_retry_max: must be at least webhook_retry_delay (10), got 5" in message


def _secret(etc: Path, text: bytes, mode: int) -> Path:
    path = etc / "hook.secret"
    path.write_bytes(text)
    path.chmod(mode)
    return path


def test_secret_file_is_checked_when_the_agent_loads(etc: Path) -> None:
    secret = _secret(etc, b"s3cret\n", 0o600)
    text = f"webhooks:\n  - {{url: 'http://h/', secret_file: {secret}}}\n"
    config = load(etc, text, private_secrets=True)
    assert config.webhooks[0].secret_file == str(secret)  # type: ignore[attr-defined]
    # GetConfig shows where the secret is, never the secret
    assert "s3cret" not in repr(redacted(config))  # type: ignore[arg-type]

    secret.chmod(0o644)
    message = error(etc, text, private_secrets=True)
    assert (f"webhooks: entry 1 (http://h/): secret_file {secret}: holds a secret but "
            "everyone can read it") in message, message
    # the API, which never reads the secret, loads the same files
    assert load(etc, text).webhooks  # type: ignore[attr-defined]

    _secret(etc, b"\n", 0o600)
    assert f"secret_file {secret}: is empty" in error(etc, text, private_secrets=True)
    secret.unlink()
    message = error(etc, text, private_secrets=True)
    assert f"secret_file {secret}: cannot read: No such file or directory" in message


def test_repr_and_str_of_a_config_hide_a_urls_credentials_and_query() -> None:
    # The loader refuses credentials in a URL; a Config built in code may still carry them.
    config = Config(webhooks=(
        Webhook("https://hook-user:pw-s3cret@hooks.example/path?token=tok-s3cret#frag"),
        Webhook("http://[::1]:8080/all", ("task.*",), "/etc/farmnode/hook.secret")))
    for text in (repr(config), str(config), repr(config.webhooks), str(config.webhooks[0])):
        assert "s3cret" not in text and "hook-user" not in text, text
    assert repr(config.webhooks[0]) == (
        "Webhook(url='https://***@hooks.example/path?***#***', events=('*',), "
        "secret_file=None)")
    assert repr(config.webhooks[1]) == (
        "Webhook(url='http://[::1]:8080/all', events=('task.*',), "
        "secret_file='/etc/farmnode/hook.secret')")
    # still the whole URL where it is used
    assert config.webhooks[0].url.endswith("token=tok-s3cret#frag")


@pytest.mark.parametrize("text", [
    "webhooks: https://h.example/x?token=tok-s3cret\n",
    "webhooks:\n  - https://h.example/x?token=tok-s3cret\n",
    "webhooks: [{url: 'ftp://h.example/x?token=tok-s3cret'}]\n",
    "webhooks: [{url: 'http://h.example/x y?token=tok-s3cret'}]\n",
    "webhooks: [{url: 'http://h.example:99999/?token=tok-s3cret'}]\n",
    "webhooks: [{url: 'http://pw-s3cret@h.example/'}]\n",
])
def test_a_config_error_does_not_repeat_a_urls_query_or_credentials(etc: Path,
                                                                   text: str) -> None:
    message = error(etc, text)
    assert "s3cret" not in message, message
    assert "h.example" in message, message  # still says which URL
