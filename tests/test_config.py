"""farmnode.config: defaults, file/drop-in/override precedence, errors, expansion, redaction."""

from __future__ import annotations

import dataclasses
import pwd
from pathlib import Path

import pytest
import yaml

from farmnode.config import (
    COMMAND_LINE,
    SECRET_KEYS,
    Config,
    ConfigError,
    load_config,
    parse_override,
    redacted,
)

REPO = Path(__file__).resolve().parent.parent
ETC_DEFAULT = REPO / "etc" / "farmnode.yaml"


@pytest.fixture
def etc(tmp_path: Path) -> Path:
    (tmp_path / "conf.d").mkdir()
    return tmp_path


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def load(etc: Path, **kwargs: object) -> Config:
    kwargs.setdefault("environ", {})
    return load_config(etc / "farmnode.yaml", **kwargs)  # type: ignore[arg-type]


def error(etc: Path, **kwargs: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(etc, **kwargs)
    return info.value


# --- defaults ------------------------------------------------------------------------------


def test_missing_file_gives_defaults(etc: Path) -> None:
    config = load(etc)
    assert config.agent_api_port == 50000
    assert config.agent_api_password is None
    assert config.agent_ram == "auto"
    assert config.agent_cpus == "auto"
    assert config.agent_master_reannounce == 120
    assert config.task_memory_high_ratio == 0.9
    assert config.agent_log_level == "info"
    assert config.master is None
    assert config.master_api is None  # no master: the template names nothing


def test_empty_and_comment_only_files_give_defaults(etc: Path) -> None:
    write(etc / "farmnode.yaml", "")
    write(etc / "conf.d" / "10-a.yaml", "# nothing here\n")
    assert load(etc) == load_config(etc / "absent.yaml", environ={})


def test_shipped_default_file_equals_defaults() -> None:
    shipped = load_config(ETC_DEFAULT, dropin_dir=ETC_DEFAULT.parent / "no-such-dir", environ={})
    assert shipped == load_config("/nonexistent/farmnode.yaml", environ={})


def test_shipped_default_file_lists_every_key_with_its_default() -> None:
    listed = yaml.safe_load(ETC_DEFAULT.read_text())
    fields = {f.name: f.default for f in dataclasses.fields(Config)}
    # YAML has no tuple: a list-valued key's default () is written [].
    fields = {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}
    assert list(listed) == list(fields)
    assert listed == fields


def test_secret_keys() -> None:
    assert sorted(SECRET_KEYS) == ["agent_api_password"]


def test_secret_not_in_repr(etc: Path) -> None:
    config = load(etc, overrides={"agent_api_password": "hunter2"})
    assert config.agent_api_password == "hunter2"
    assert "hunter2" not in repr(config)


# --- precedence ------------------------------------------------------------------------------


def test_file_values_are_typed(etc: Path) -> None:
    write(
        etc / "farmnode.yaml",
        "agent_api_port: 8080\nagent_cpus: 4\nagent_ram: 16384\ntask_allow_root: false\n"
        "master: farm.example:5000\nagent_log_level: WARNING\n",
    )
    config = load(etc)
    assert config.agent_api_port == 8080
    assert config.agent_cpus == 4.0 and isinstance(config.agent_cpus, float)
    assert config.agent_ram == 16384
    assert config.task_allow_root is False
    assert config.master_api == "http://farm.example:5000/api/v1"
    assert config.agent_log_level == "warning"


def test_dropins_apply_in_lexical_order_after_main_file(etc: Path) -> None:
    write(etc / "farmnode.yaml", "agent_api_port: 1000\nfarm_name: main\nagent_ram: 100\n")
    write(etc / "conf.d" / "20-b.yaml", "agent_api_port: 2000\nfarm_name: b\n")
    write(etc / "conf.d" / "10-a.yaml", "agent_api_port: 3000\nfarm_name: a\ntask_swap_max: 7\n")
    write(etc / "conf.d" / "30-c.yaml.disabled", "agent_api_port: 4000\n")
    write(etc / "conf.d" / ".99-hidden.yaml", "agent_api_port: 5000\n")
    config = load(etc)
    assert config.agent_api_port == 2000
    assert config.farm_name == "b"
    assert config.task_swap_max == 7
    assert config.agent_ram == 100


def test_explicit_dropin_dir(etc: Path, tmp_path: Path) -> None:
    other = tmp_path / "elsewhere"
    other.mkdir()
    write(other / "x.yaml", "farm_name: elsewhere\n")
    write(etc / "conf.d" / "x.yaml", "farm_name: default-dir\n")
    assert load(etc, dropin_dir=other).farm_name == "elsewhere"


def test_dropins_without_main_file(etc: Path) -> None:
    write(etc / "conf.d" / "10-site.yaml", "master: m1\n")
    assert load(etc).master == "m1"


def test_overrides_win_and_are_yaml_scalars(etc: Path) -> None:
    write(etc / "farmnode.yaml", "agent_api_port: 1000\nmaster: m1\n")
    write(etc / "conf.d" / "10.yaml", "agent_api_port: 2000\n")
    config = load(
        etc,
        overrides={
            "agent_api_port": "3000",
            "master": "",  # empty means null
            "agent_pretty_json": "false",
            "task_memory_high_ratio": "1",
            "farm_name": "2024",  # string keys keep the text
            "task_allowed_cpus": "0-3, 6",
        },
    )
    assert config.agent_api_port == 3000
    assert config.master is None and config.master_api is None
    assert config.agent_pretty_json is False
    assert config.task_memory_high_ratio == 1.0
    assert config.farm_name == "2024"
    assert config.task_allowed_cpus == "0-3,6"


def test_string_overrides_that_are_not_yaml_scalars_are_text(etc: Path) -> None:
    config = load(etc, overrides={"master": "[::1]:5000", "farm_name": "{a"})
    assert config.master == "[::1]:5000"
    assert config.master_api == "http://[::1]:5000/api/v1"
    assert config.farm_name == "{a"


def test_plain_scalars_for_string_keys_are_taken_as_written(etc: Path) -> None:
    write(etc / "farmnode.yaml", "agent_api_password: 0123\nfarm_name: yes\ntask_allowed_cpus: 3\n")
    config = load(etc)
    assert config.agent_api_password == "0123"
    assert config.farm_name == "yes"
    assert config.task_allowed_cpus == "3"


def test_parse_override() -> None:
    assert parse_override("master=farm:5000") == ("master", "farm:5000")
    assert parse_override(" farm_name =a=b") == ("farm_name", "a=b")
    with pytest.raises(ConfigError, match=r"^<command line>: --set expects key=value"):
        parse_override("master")


# --- errors ----------------------------------------------------------------------------------


def test_unknown_key_in_dropin_names_file_line_and_suggestion(etc: Path) -> None:
    path = write(etc / "conf.d" / "10-site.yaml", "# site\nmaster: m\nagent_rma: 4096\n")
    err = error(etc)
    assert str(err) == f"{path}:3: unknown key 'agent_rma' (did you mean 'agent_ram'?)"
    assert (err.path, err.line, err.key) == (str(path), 3, "agent_rma")


def test_unknown_key_without_suggestion(etc: Path) -> None:
    path = write(etc / "farmnode.yaml", "colour: blue\n")
    assert str(error(etc)) == f"{path}:1: unknown key 'colour'"


def test_wrong_type(etc: Path) -> None:
    path = write(etc / "farmnode.yaml", "\n\n\n\nagent_api_port: abc\n")
    err = error(etc)
    assert str(err) == f"{path}:5: agent_api_port: expected an integer, got 'abc'"
    assert (err.line, err.key) == (5, "agent_api_port")


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("agent_api_port: true", "expected an integer, got true"),
        ("agent_api_port: 1.5", "expected an integer, got 1.5"),
        ("agent_ram: lots", "expected an integer or 'auto', got 'lots'"),
        ("agent_ram: yes", "expected an integer or 'auto', got 'yes' (YAML reads it as true)"),
        ("agent_cpus: [1, 2]", "expected a number or 'auto', got a list"),
        ("agent_cpus: .inf", "must be a finite number, got inf"),
        ("agent_time_offset: 1.5", "expected an integer or 'auto', got 1.5"),
        ("task_slice: auto", "must be a systemd slice name ending in '.slice', got 'auto'"),
        ("task_swap_max: auto", "expected an integer, got 'auto'"),
        ("task_allow_root: 1", "expected a boolean (true or false), got 1"),
        ("agent_hostname: {a: 1}", "expected a string, got a mapping"),
        ("agent_api_port: 2024-01-01", "expected an integer, got a date"),
        ("agent_state_dir: null", "expected a string, got null"),
        ("agent_state_dir: ~", "expected a string, got null (YAML reads a bare ~ as null"),
        ("agent_log_level: verbose", "expected one of 'debug', 'info', 'warning', 'error', got"),
    ],
)
def test_type_errors(etc: Path, line: str, expected: str) -> None:
    path = write(etc / "farmnode.yaml", f"master: m\n{line}\n")
    key = line.split(":")[0]
    err = error(etc)
    assert str(err).startswith(f"{path}:2: {key}: {expected}")
    assert err.key == key


def test_float_keys_accept_integers(etc: Path) -> None:
    write(etc / "farmnode.yaml", "agent_master_reannounce: 60\n")
    assert load(etc).agent_master_reannounce == 60.0


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("agent_api_port: 0", "must be between 1 and 65535, got 0"),
        ("agent_api_port: 65536", "must be between 1 and 65535, got 65536"),
        ("agent_master_reannounce: 0", "must be greater than 0, got 0.0"),
        ("agent_http_retry_delay: -1", "must be greater than 0, got -1.0"),
        ("task_memory_high_ratio: 1.5", "must be greater than 0 and at most 1, got 1.5"),
        ("task_memory_high_ratio: 0", "must be greater than 0 and at most 1, got 0.0"),
        ("task_io_weight: 0", "must be between 1 and 10000, got 0"),
        ("task_swap_max: -1", "must be at least 0, got -1"),
        ("agent_task_object_retention: -5", "must be at least 0, got -5.0"),
        ("agent_task_object_retention: soon", "expected a number"),
        ("agent_ram: 0", "must be at least 1, got 0"),
        ("task_default_ram_max: 0", "must be at least 1, got 0"),
        ("task_allowed_cpus: 0-3;6", "must be a CPU list like '0-3,6', got '0-3;6'"),
        ("agent_ip_remote: 10.0.0.300", "must be an IP address, got '10.0.0.300'"),
        ("agent_hostname: bad_host!", "must be 'auto' or a valid host name"),
        ("agent_state_dir: var/lib", "must be an absolute path, got 'var/lib'"),
        ("master: http://farm", "must be a host name or host:port"),
        ("master_api: ftp://farm", "must be an http:// or https:// URL"),
        ("task_default_user: a/b", "must be a user name, got 'a/b'"),
        ("task_default_user: ''", "must not be empty"),
        ("agent_api_username: 'a:b'", "must not contain ':'"),
    ],
)
def test_range_errors(etc: Path, line: str, expected: str) -> None:
    path = write(etc / "farmnode.yaml", f"farm_name: f\n{line}\n")
    key = line.split(":")[0]
    assert str(error(etc)).startswith(f"{path}:2: {key}: {expected}")


def test_bad_value_in_an_overridden_file_is_still_an_error(etc: Path) -> None:
    path = write(etc / "farmnode.yaml", "agent_api_port: 0\n")
    write(etc / "conf.d" / "10.yaml", "agent_api_port: 80\n")
    assert str(error(etc)).startswith(f"{path}:1: agent_api_port:")


def test_error_found_after_expansion_points_at_the_line(etc: Path) -> None:
    path = write(etc / "farmnode.yaml", "farm_name: f\nagent_state_dir: $STATE\n")
    err = error(etc, environ={"STATE": "relative/dir"})
    assert str(err) == f"{path}:2: agent_state_dir: must be an absolute path, got 'relative/dir'"


def test_cross_key_checks(etc: Path) -> None:
    write(etc / "farmnode.yaml", "agent_http_retry_delay: 10\n")
    path = write(etc / "conf.d" / "10.yaml", "agent_http_retry_max: 5\n")
    assert str(error(etc)) == (
        f"{path}:1: agent_http_retry_max: must be at least agent_http_retry_delay (10), got 5"
    )
    (etc / "conf.d" / "10.yaml").unlink()
    path = write(etc / "farmnode.yaml", "task_default_user: root\n")
    assert str(error(etc)) == f"{path}:1: task_default_user: tasks never run as root"
    # the old escape hatch is refused, naming where it is, rather than silently ignored
    path = write(etc / "farmnode.yaml", "task_default_user: nobody\ntask_allow_root: true\n")
    assert str(error(etc)).startswith(f"{path}:2: task_allow_root: tasks never run as root")


def test_task_user_rule_keys(etc: Path) -> None:
    assert load(etc).task_min_uid == "auto" and load(etc).task_system_users == "nobody"
    write(etc / "farmnode.yaml", "task_min_uid: 500\ntask_system_users: [nobody, render]\n")
    config = load(etc)
    assert config.task_min_uid == 500 and config.task_system_users == "nobody, render"
    write(etc / "farmnode.yaml", "task_system_users: nobody render\n")
    assert load(etc).task_system_users == "nobody, render"
    path = write(etc / "farmnode.yaml", "task_system_users: [nobody, 'a/b']\n")
    assert str(error(etc)) == f"{path}:1: task_system_users: must be a user name, got 'a/b'"
    path = write(etc / "farmnode.yaml", "task_system_users: [nobody, 3]\n")
    assert "expected a string, got a list" in str(error(etc))
    write(etc / "farmnode.yaml", "task_min_uid: -1\n")
    assert "task_min_uid: must be at least 0" in str(error(etc))


def test_invalid_yaml_names_line_and_column(etc: Path) -> None:
    path = write(etc / "farmnode.yaml", "master: m\nmaster_api: 'unterminated\n")
    err = error(etc)
    assert str(err).startswith(f"{path}:3:1: invalid YAML: ")
    path = write(etc / "farmnode.yaml", "master: m\n  bad: indent\n")
    err = error(etc)
    assert str(err).startswith(f"{path}:2:6: invalid YAML: mapping values are not allowed here")
    assert (err.line, err.column, err.key) == (2, 6, None)


def test_invalid_utf8(etc: Path) -> None:
    path = etc / "farmnode.yaml"
    path.write_bytes(b"master: m\nfarm_name: \xff\n")
    assert str(error(etc)) == f"{path}:2: invalid YAML: not UTF-8 text"


def test_top_level_must_be_a_mapping(etc: Path) -> None:
    path = write(etc / "farmnode.yaml", "- agent_api_port: 1\n")
    assert str(error(etc)) == f"{path}:1: top level must be a mapping of key: value, got a list"
    write(etc / "farmnode.yaml", "just text\n")
    assert "got a single value" in str(error(etc))


def test_duplicate_key_in_one_file(etc: Path) -> None:
    path = write(etc / "farmnode.yaml", "master: a\nfarm_name: f\nmaster: b\n")
    assert str(error(etc)) == f"{path}:3: duplicate key 'master' (first set on line 1)"


def test_main_path_is_a_directory(etc: Path) -> None:
    (etc / "farmnode.yaml").mkdir()
    assert "is a directory" in str(error(etc))


def test_override_errors_name_the_command_line(etc: Path) -> None:
    err = error(etc, overrides={"agent_api_port": "abc"})
    assert str(err) == "<command line>: agent_api_port: expected an integer, got 'abc'"
    assert (err.path, err.line, err.key) == (COMMAND_LINE, None, "agent_api_port")
    err = error(etc, overrides={"agent_rma": "1"})
    assert str(err) == "<command line>: unknown key 'agent_rma' (did you mean 'agent_ram'?)"
    err = error(etc, overrides={"agent_cpus": "[1, 2"})
    assert str(err).startswith("<command line>: agent_cpus: cannot parse '[1, 2':")
    err = error(etc, overrides={"agent_cpus": "[1, 2]"})
    assert str(err) == "<command line>: agent_cpus: expected a single value, got '[1, 2]'"
    err = error(etc, overrides={"task_io_weight": "0"})
    assert str(err) == "<command line>: task_io_weight: must be between 1 and 10000, got 0"


# --- expansion -------------------------------------------------------------------------------


def test_master_api_follows_final_master(etc: Path) -> None:
    write(etc / "farmnode.yaml", "master: first\n")
    write(etc / "conf.d" / "10.yaml", "master_api_version: 2\n")
    config = load(etc, overrides={"master": "second:8080"})
    assert config.master_api == "http://second:8080/api/v2"


def test_explicit_master_api_without_master_is_kept(etc: Path) -> None:
    write(etc / "farmnode.yaml", "master_api: https://farm.example/api/v1\n")
    assert load(etc).master_api == "https://farm.example/api/v1"


def test_expansion_from_environment_first_then_config(etc: Path) -> None:
    write(
        etc / "farmnode.yaml",
        "farm_name: ${SITE}-$agent_ntp_server\nagent_ntp_server: ntp.$SITE.example\n"
        "agent_state_dir: /srv/$UNDEFINED/${ALSO_UNDEFINED}/$agent_ntp_server\n",
    )
    config = load(etc, environ={"SITE": "paris", "agent_ntp_server": "from-env"})
    assert config.farm_name == "paris-from-env"  # the environment wins over config keys
    assert config.agent_ntp_server == "ntp.paris.example"
    assert config.agent_state_dir == "/srv/$UNDEFINED/${ALSO_UNDEFINED}/from-env"


def test_nested_expansion_and_non_string_values(etc: Path) -> None:
    write(
        etc / "farmnode.yaml",
        "agent_state_dir: /srv/$farm_name\nfarm_name: f-${agent_api_port}\n"
        "jobtype_cache_directory: ${agent_state_dir}/jt-$agent_pretty_json-$agent_stop\n"
        "agent_api_port: 8080\n",
    )
    config = load(etc)
    assert config.farm_name == "f-8080"
    assert config.agent_state_dir == "/srv/f-8080"
    assert config.jobtype_cache_directory == "/srv/f-8080/jt-true-$agent_stop"


def test_dollar_dollar_is_a_literal_dollar(etc: Path) -> None:
    write(etc / "farmnode.yaml", "farm_name: cost$$HOME\n")
    assert load(etc, environ={"HOME": "/h"}).farm_name == "cost$HOME"


def test_expansion_uses_merged_values(etc: Path) -> None:
    write(etc / "farmnode.yaml", "farm_name: $agent_hostname\n")
    write(etc / "conf.d" / "10.yaml", "agent_hostname: node7\n")
    assert load(etc).farm_name == "node7"


def test_reference_cycle_is_an_error(etc: Path) -> None:
    path = write(
        etc / "farmnode.yaml",
        "farm_name: f\nagent_state_dir: /a/$agent_runtime_dir\n"
        "agent_runtime_dir: /b$agent_state_dir\n",
    )
    err = error(etc)
    assert str(err) == (
        f"{path}:2: agent_state_dir: variable reference cycle: "
        "$agent_state_dir -> $agent_runtime_dir -> $agent_state_dir"
    )
    assert err.key == "agent_state_dir"


def test_self_reference_is_a_cycle(etc: Path) -> None:
    write(etc / "farmnode.yaml", "farm_name: x$farm_name\n")
    assert "farm_name: variable reference cycle: $farm_name -> $farm_name" in str(error(etc))


def test_tilde_expands_to_home(etc: Path) -> None:
    write(
        etc / "farmnode.yaml",
        "agent_state_dir: ~/state\nagent_runtime_dir: '~'\n"
        "jobtype_cache_directory: $agent_state_dir/cache\nfarm_name: a~b\n",
    )
    config = load(etc, environ={"HOME": "/home/render"})
    assert config.agent_state_dir == "/home/render/state"
    assert config.agent_runtime_dir == "/home/render"
    assert config.jobtype_cache_directory == "/home/render/state/cache"
    assert config.farm_name == "a~b"


def test_tilde_user(etc: Path) -> None:
    root_home = pwd.getpwnam("root").pw_dir
    write(etc / "farmnode.yaml", "agent_state_dir: ~root/farm\n")
    assert load(etc).agent_state_dir == f"{root_home}/farm"


def test_secrets_are_not_expanded_nor_substituted(etc: Path) -> None:
    write(
        etc / "farmnode.yaml",
        "agent_api_password: pa$$w0rd$HOME~\nfarm_name: $agent_api_password\n",
    )
    config = load(etc, environ={"HOME": "/h"})
    assert config.agent_api_password == "pa$$w0rd$HOME~"
    assert config.farm_name == "$agent_api_password"


# --- redaction -------------------------------------------------------------------------------


def test_redacted_hides_secrets_only(etc: Path) -> None:
    config = load(etc, overrides={"agent_api_password": "hunter2", "agent_api_username": "farm"})
    out = redacted(config)
    assert out["agent_api_password"] == "********"
    assert out["agent_api_username"] == "farm"
    assert "hunter2" not in repr(out)
    assert set(out) == {f.name for f in dataclasses.fields(Config)}
    assert config.agent_api_password == "hunter2"  # the config itself is untouched


def test_redacted_keeps_none(etc: Path) -> None:
    assert redacted(load(etc))["agent_api_password"] is None


def test_a_hook_that_does_not_parse_names_file_line_and_key(etc: Path) -> None:
    path = write(etc / "conf.d" / "20-hooks.yaml",
                 "task_post_hook: /usr/bin/true\ntask_pre_hook: \"/usr/bin/check 'mounts\"\n")
    err = error(etc)
    assert str(err).startswith(f"{path}:2: task_pre_hook: does not parse as a command line "
                               "(No closing quotation)"), str(err)
    write(etc / "conf.d" / "20-hooks.yaml", "task_pre_hook: \"/usr/bin/check 'a b'\"\n")
    assert load(etc).task_pre_hook == "/usr/bin/check 'a b'"
