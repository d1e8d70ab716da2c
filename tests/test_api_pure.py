"""Host tests of the HTTP API's pure parts: auth, log formats, metrics, error mapping,
the OpenAPI document against the routes, the socket generator."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest

from farmnode.agent.core import (
    AgentError,
    InvalidArgument,
    InvalidAssignment,
    NotAccepting,
    NotEnoughResources,
    PartialOverlap,
)
from farmnode.api import formats
from farmnode.api.app import ROUTES, create_app, methods_of
from farmnode.api.auth import Basic, Bearer, accepted, parse_authorization, parse_tokens
from farmnode.api.errors import ApiError, from_dbus, from_refusal
from farmnode.api.generator import generate
from farmnode.api.openapi import document
from farmnode.api.resources import parse_signal, task_id_param, task_stats, task_view
from farmnode.bus.errors import detail, error_class
from farmnode.bus.interface import (
    PartialOverlapError,
)
from farmnode.systemd.cgroup import read_accounting
from farmnode.tasks.model import TaskState
from farmnode.tasks.schema import AssignmentError, parse_assignment
from farmnode.tasks.store import Store


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_authorization_header_parsing() -> None:
    assert parse_authorization(None) is None
    assert parse_authorization("Basic " + b64("u:p:w")) == Basic("u", "p:w")
    assert parse_authorization("basic  " + b64("u:")) == Basic("u", "")
    assert parse_authorization("Basic " + b64("nocolon")) is None
    assert parse_authorization("Basic !!!") is None
    assert parse_authorization("Basic") is None
    assert parse_authorization("Bearer abc") == Bearer("abc")
    assert parse_authorization("Digest x") is None


def test_credentials_are_checked() -> None:
    tokens = parse_tokens("# comment\n\n  tok1 \ntok2\n")
    assert tokens == {"tok1", "tok2"}
    assert accepted(Bearer("tok2"), None, None, tokens)
    assert not accepted(Bearer("tok"), None, None, tokens)
    assert accepted(Basic("m", "p"), "m", "p", frozenset())
    assert not accepted(Basic("m", "x"), "m", "p", frozenset())
    assert not accepted(Basic("m", "p"), None, None, tokens)  # no user configured
    assert not accepted(None, "m", "p", tokens)


def test_csv_in_pyfarm_column_order() -> None:
    # PyFarm wrote str(pid): "None" for the agent's own lines
    lines = [json.dumps({"time": "2026-01-01T00:00:00+00:00", "stream": 1, "line": 7,
                         "pid": 42, "message": 'a, "quoted"\tline'}).encode(), b"\n",
             json.dumps({"time": "t", "stream": 0, "line": 1, "pid": None,
                         "message": "x"}).encode()]
    text = "".join(formats.csv_rows(formats.log_entries(lines)))
    rows = list(csv.reader(io.StringIO(text)))
    assert rows == [["2026-01-01T00:00:00+00:00", "42", "1", "7", 'a, "quoted"\tline'],
                    ["t", "None", "0", "1", "x"]]
    plain = "".join(formats.text_lines(formats.log_entries(lines)))
    assert plain.splitlines()[0].endswith('stderr a, "quoted"\tline')


def _real_task_record(tmp_path: Path, cgroup_files: dict[str, str]) -> dict[str, Any]:
    """A task record as the API receives it, made by the code that makes the real one: the
    figures read from a cgroup directory (files in the kernel's format) by read_accounting,
    kept by the store, turned into the record the agent sends over D-Bus as JSON."""
    cgroup = tmp_path / "farmnode-task-5.scope"
    cgroup.mkdir()
    for name, text in cgroup_files.items():
        (cgroup / name).write_text(text)
    store = Store(tmp_path / "state.db")
    store.add_assignment(parse_assignment({
        "job": {"id": 1, "by": 1, "ram": 100}, "jobtype": {"name": "command", "version": 1},
        "tasks": [{"id": 5, "frame": 1}]}, "x"), "farmnode-task-5.scope")
    store.set_task_state("x", 5, TaskState.RUNNING)
    store.set_accounting("x", read_accounting(str(cgroup)))
    rec = store.task(5)
    assert rec is not None
    store.close()
    return dict(json.loads(json.dumps(rec.to_dict())))


CGROUP_FILES = {
    "memory.current": "1024\n", "memory.peak": "4096\n", "pids.current": "3\n",
    "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n",
    "cpu.stat": "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n",
}


def test_task_stats_read_the_agents_record(tmp_path: Path) -> None:
    t = _real_task_record(tmp_path, CGROUP_FILES)
    assert task_stats(t) == {"task_id": 5, "state": "running", "memory_current": 1024,
                             "memory_peak": 4096, "cpu_usage_usec": 2_500_000,
                             "tasks_current": 3}


def test_task_stats_are_null_where_the_cgroup_has_no_figure(tmp_path: Path) -> None:
    # a hybrid-hierarchy host: cpu.stat only, no memory or pids controller
    t = _real_task_record(tmp_path, {"cpu.stat": "usage_usec 7\n"})
    stats = task_stats(t)
    assert stats["cpu_usage_usec"] == 7
    assert stats["memory_peak"] is None and stats["memory_current"] is None


def test_metrics_text_format(tmp_path: Path) -> None:
    status = {"state": "running", "version": "1", "agent_id": 'a"b', "ram": 100,
              "free_ram": 50, "cpus": 2.0}
    files = {k: v for k, v in CGROUP_FILES.items() if k != "memory.peak"}
    active = [_real_task_record(tmp_path, files)]
    text = formats.metrics(status, active, active)
    assert "farmnode_up 1\n" in text
    assert 'farmnode_tasks{state="running"} 1' in text
    assert 'farmnode_tasks{state="done"} 0' in text
    assert 'agent_id="a\\"b"' in text
    assert 'farmnode_task_memory_bytes{task_id="5",job_id="1",assignment_id="x"} 1024' in text
    assert 'farmnode_task_processes{task_id="5",job_id="1",assignment_id="x"} 3' in text
    assert "farmnode_task_cpu_seconds_total{" in text and "} 2.5" in text
    assert "farmnode_task_memory_peak_bytes" not in text  # absent fields are not invented
    # every family's samples follow its one TYPE line
    families = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(families) == len(set(families))
    assert formats.metrics(None, [], []) == (
        "# HELP farmnode_up 1 if the agent answered over D-Bus.\n# TYPE farmnode_up gauge\n"
        "farmnode_up 0\n")


def refusal(exc: AgentError) -> ApiError:
    """The HTTP answer to a refusal, through the agent's mapping and TryAssign's detail."""
    typed = {k: v for k, (_sig, v) in detail(exc).items()}
    return from_refusal(error_class(exc).dbus_error_name, str(exc), typed)


def test_refusals_map_to_pyfarm_statuses_from_typed_detail() -> None:
    e = refusal(PartialOverlap([3, 4]))
    assert (e.status_code, e.to_dict()) == (409, {"error": "Partial overlap of tasks",
                                                  "rejected_task_ids": [3, 4]})
    e = refusal(NotEnoughResources("ram", 100, 200))
    assert (e.status_code, e.to_dict()) == (400, {"error": "Not enough ram", "agent_ram": 100,
                                                  "requires_ram": 200})
    e = refusal(NotEnoughResources("cpus", 1.5, 4))
    assert e.to_dict() == {"error": "Not enough cpus", "agent_cpus": 1.5, "requires_cpus": 4}
    e = refusal(InvalidAssignment(AssignmentError("job.id", "expected an integer, got 'x'")))
    assert e.status_code == 400 and e.to_dict()["field"] == "job.id"
    # a message that merely looks like a field is not one: the detail decides
    e = refusal(InvalidArgument("assignment is not valid JSON: Expecting value"))
    assert e.status_code == 400 and "field" not in e.to_dict()
    e = refusal(NotAccepting("agent is disabled and takes no new work"))
    assert e.status_code == 503
    # errors raised by Assign (busctl, the CLI) keep their status without any detail
    e = from_dbus(PartialOverlapError("Partial overlap of tasks: rejected task ids [3, 4]"))
    assert e.status_code == 409


def test_request_parameters() -> None:
    assert task_id_param("12") == 12
    for bad in ("x", "-1", "1.5", "", "9" * 20, str(2**63)):
        with pytest.raises(ApiError) as exc:
            task_id_param(bad)
        assert exc.value.status_code == 400 and "not an integer" in exc.value.message
    assert parse_signal("usr1").name == "SIGUSR1"
    assert parse_signal("SIGTERM") == parse_signal(15)
    for bad in (0, 32, 65, True, "NOPE", "", "SIG", None):
        with pytest.raises(ApiError) as exc:
            parse_signal(bad)
        assert exc.value.status_code == 400 and "signal" in exc.value.message
    view = task_view({"id": 1, "frame": 3.0, "attempt": 0, "tile": None, "state": "done",
                      "accounting": {"memory_peak": 5}})
    assert list(view)[:5] == ["id", "frame", "attempt", "tile", "local_state"]
    assert view["frame"] == 3 and view["accounting"] == {"memory_peak": 5}


def test_openapi_document_matches_the_routes() -> None:
    doc = document()
    assert doc["openapi"].startswith("3.")
    documented = {(path, m) for path, ops in doc["paths"].items() for m in ops}
    routed = {(path, m) for path, resource in ROUTES for m in methods_of(resource)}
    assert documented == routed
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert op["operationId"] and op["responses"], (path, method)
            if method != "get":
                assert {} not in op["security"], (path, method)  # mutating: credentials
            params = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert params == {seg[1:-1] for seg in path.split("/") if seg.startswith("{")}
    create_app()  # every route is accepted by falcon


def test_openapi_document_is_valid() -> None:
    from openapi_spec_validator import validate  # schemathesis depends on it

    validate(document())


def test_generator_renders_port_and_credential(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    (etc / "conf.d").mkdir(parents=True)
    tokens = etc / "tokens"
    (etc / "farmnode.yaml").write_text(f"agent_api_port: 51234\n"
                                       f"agent_api_tokens_file: {tokens}\n")
    out = tmp_path / "gen"
    generate(out, etc / "farmnode.yaml")
    sock = (out / "farmnode-api.socket.d/50-farmnode-config.conf").read_text()
    assert "ListenStream=\nListenStream=51234\n" in sock
    assert not (out / "farmnode-api.service.d").exists()  # no token file: no LoadCredential
    tokens.write_text("t\n")
    generate(out, etc / "farmnode.yaml")
    svc = (out / "farmnode-api.service.d/50-farmnode-config.conf").read_text()
    assert f"LoadCredential=tokens:{tokens}" in svc
