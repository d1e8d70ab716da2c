"""farmnode.tasks.schema: PyFarm assignment validation, JSON round trip, assignment files."""

from __future__ import annotations

import copy
import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from farmnode.tasks.model import Assignment, Job, JobTypeRef, Task
from farmnode.tasks.schema import (
    AssignmentError,
    assignment_to_json,
    load_assignment_file,
    parse_assignment,
)


def minimal() -> dict[str, Any]:
    return {
        "job": {"id": 7, "by": 1},
        "jobtype": {"name": "blender", "version": 2},
        "tasks": [{"id": 100, "frame": 1}],
    }


def full() -> dict[str, Any]:
    """What pyfarm-master's send_tasks_to_agent builds, every field set."""
    return {
        "job": {
            "id": 7,
            "by": 1.5,
            "title": "shot_010 beauty",
            "user": "alice",
            "ram": 2048,
            "cpus": 4,
            "ram_warning": 3000,
            "ram_max": 4096,
            "batch": 2,
            "data": {"scene": "/srv/shot.blend", "nested": {"list": [1, 2.5, None, True]}},
            "environ": {"OCIO": "/srv/ocio.config", "EMPTY": ""},
            "notified_users": [
                {"username": "alice", "on_success": False, "on_failure": True, "on_deletion": True}
            ],
            "priority": -5,
            "job_group_id": 3,
            "job_group": "shot_010",
            "notes": "rush",
            "tags": ["rush", "4k"],
            "num_tiles": 4,
            "agent_id": 12,
        },
        "jobtype": {"name": "blender", "version": 2},
        "tasks": [
            {"id": 100, "frame": 1, "tile": 0, "attempt": 1},
            {"id": 101, "frame": 1.5, "tile": 3, "attempt": 0},
        ],
    }


def error(obj: object) -> AssignmentError:
    with pytest.raises(AssignmentError) as info:
        parse_assignment(obj)
    return info.value


def with_job(**fields: Any) -> dict[str, Any]:
    obj = minimal()
    obj["job"].update(fields)
    return obj


def with_task(index: int = 0, **fields: Any) -> dict[str, Any]:
    obj = minimal()
    obj["tasks"] = [{"id": i, "frame": i} for i in range(3)]
    obj["tasks"][index].update(fields)
    return obj


# --- valid -----------------------------------------------------------------------------------


def test_minimal() -> None:
    a = parse_assignment(minimal(), "fixed-id")
    assert a == Assignment(
        id="fixed-id",
        job=Job(id=7, by=1.0),
        jobtype=JobTypeRef(name="blender", version=2),
        tasks=(Task(id=100, frame=1.0, tile=None, attempt=0),),
    )
    assert a.job.data == {} and a.job.environ == {} and a.job.tags == []


def test_new_id_is_a_uuid4() -> None:
    a, b = parse_assignment(minimal()), parse_assignment(minimal())
    assert uuid.UUID(a.id).version == 4
    assert a.id != b.id


def test_full() -> None:
    a = parse_assignment(full())
    assert a.job.by == 1.5
    assert a.job.user == "alice"
    assert a.job.cpus == 4.0
    assert (a.job.ram, a.job.ram_warning, a.job.ram_max) == (2048, 3000, 4096)
    assert a.job.environ == {"OCIO": "/srv/ocio.config", "EMPTY": ""}
    assert a.job.data["nested"] == {"list": [1, 2.5, None, True]}
    assert a.job.notified_users[0]["on_success"] is False
    assert a.job.tags == ["rush", "4k"]
    assert (a.job.priority, a.job.job_group_id, a.job.num_tiles, a.job.agent_id) == (-5, 3, 4, 12)
    assert a.task_ids == (100, 101)
    assert a.tasks[1] == Task(id=101, frame=1.5, tile=3, attempt=0)


def test_nulls_mean_not_given() -> None:
    # pyfarm-master sends its unset columns as null.
    unset = ("title", "user", "ram", "cpus", "ram_warning", "ram_max", "batch", "data", "environ")
    unset += ("notified_users", "tags", "notes", "priority", "num_tiles", "job_group")
    a = parse_assignment(with_job(**dict.fromkeys(unset)))
    assert a.job == Job(id=7, by=1.0)
    t = parse_assignment(with_task(0, tile=None, attempt=None)).tasks[0]
    assert (t.tile, t.attempt) == (None, 0)


def test_notified_user_defaults_as_pyfarm() -> None:
    a = parse_assignment(with_job(notified_users=[{"username": "bob"}]))
    assert a.job.notified_users == [
        {"username": "bob", "on_success": True, "on_failure": True, "on_deletion": False}
    ]


def test_input_is_copied_not_aliased() -> None:
    obj = full()
    a = parse_assignment(obj)
    obj["job"]["data"]["scene"] = "changed"
    obj["job"]["environ"]["OCIO"] = "changed"
    assert a.job.data["scene"] == "/srv/shot.blend"
    assert a.job.environ["OCIO"] == "/srv/ocio.config"


def test_input_is_not_modified() -> None:
    obj = full()
    before = copy.deepcopy(obj)
    parse_assignment(obj)
    assert obj == before


@pytest.mark.parametrize("make", [minimal, full])
def test_json_round_trip(make: Any) -> None:
    a = parse_assignment(make())
    wire = json.loads(json.dumps(assignment_to_json(a)))
    assert parse_assignment(wire, a.id) == a
    assert "id" not in wire  # our assignment id is not part of the master's schema


def test_to_json_leaves_out_unset_job_fields() -> None:
    wire = assignment_to_json(parse_assignment(minimal()))
    assert wire["job"] == {
        "id": 7, "by": 1.0, "data": {}, "environ": {}, "notified_users": [], "tags": [],
    }  # fmt: skip
    assert wire["tasks"] == [{"id": 100, "frame": 1.0, "tile": None, "attempt": 0}]


# --- invalid ---------------------------------------------------------------------------------


def test_error_str_and_attributes() -> None:
    err = error(with_job(ram="lots"))
    assert str(err) == "job.ram: expected an integer, got 'lots'"
    assert (err.field, err.message) == ("job.ram", "expected an integer, got 'lots'")
    assert isinstance(err, ValueError)


@pytest.mark.parametrize("obj", [None, [], "job", 3])
def test_not_an_object(obj: object) -> None:
    assert error(obj).field == "assignment"


@pytest.mark.parametrize(
    ("obj", "field", "message"),
    [
        ({**minimal(), "id": "x"}, "id", "unknown key"),
        ({"job": {"id": 1, "by": 1}, "tasks": [{"id": 1, "frame": 1}]}, "jobtype", "is required"),
        ({"jobtype": {"name": "a", "version": 1}, "tasks": []}, "job", "is required"),
        ({k: v for k, v in minimal().items() if k != "tasks"}, "tasks", "is required"),
        ({**minimal(), "job": []}, "job", "expected an object, got a list"),
        ({**minimal(), "jobtype": "blender"}, "jobtype", "expected an object, got 'blender'"),
    ],
)
def test_top_level(obj: object, field: str, message: str) -> None:
    err = error(obj)
    assert (err.field, err.message) == (field, message)


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"id": None}, "job.id", "expected an integer, got null"),
        ({"id": "7"}, "job.id", "expected an integer, got '7'"),
        ({"id": 7.0}, "job.id", "expected an integer, got 7.0"),
        ({"id": True}, "job.id", "expected an integer, got true"),
        ({"id": -1}, "job.id", "must be at least 0, got -1"),
        ({"by": "1"}, "job.by", "expected a number, got '1'"),
        ({"by": False}, "job.by", "expected a number, got false"),
        ({"by": 0}, "job.by", "must be greater than 0, got 0"),
        ({"by": float("nan")}, "job.by", "must be a finite number, got nan"),
        ({"by": float("inf")}, "job.by", "must be a finite number, got inf"),
        ({"by": 10**400}, "job.by", "must be a finite number"),
        ({"title": 3}, "job.title", "expected a string, got 3"),
        ({"user": ""}, "job.user", "must be a user name, got ''"),
        ({"user": "a b"}, "job.user", "must be a user name, got 'a b'"),
        ({"user": "../etc"}, "job.user", "must be a user name, got '../etc'"),
        ({"user": "alice\n"}, "job.user", "must be a user name"),
        ({"user": 1000}, "job.user", "expected a string, got 1000"),
        ({"ram": "lots"}, "job.ram", "expected an integer, got 'lots'"),
        ({"ram": 0}, "job.ram", "must be at least 1, got 0"),
        ({"ram_warning": 0}, "job.ram_warning", "must be at least 1, got 0"),
        ({"ram_max": -5}, "job.ram_max", "must be at least 1, got -5"),
        (
            {"ram": 4096, "ram_max": 2048},
            "job.ram_max",
            "must be at least job.ram (4096), got 2048",
        ),
        ({"cpus": 0}, "job.cpus", "must be greater than 0, got 0"),
        ({"cpus": float("inf")}, "job.cpus", "must be a finite number, got inf"),
        ({"cpus": True}, "job.cpus", "expected a number, got true"),
        ({"batch": 0}, "job.batch", "must be at least 1, got 0"),
        ({"data": []}, "job.data", "expected an object, got a list"),
        ({"data": {"a": {"b": float("nan")}}}, "job.data.a.b", "must be a finite number, got nan"),
        ({"data": {"a": [1, {2: 3}]}}, "job.data.a[1]", "keys must be strings, got 2"),
        ({"data": {"a": (1, 2)}}, "job.data.a", "expected a JSON value, got a list"),
        ({"environ": ["A=1"]}, "job.environ", "expected an object, got a list"),
        ({"environ": {"A": 1}}, "job.environ.A", "expected a string, got 1"),
        ({"environ": {"A": None}}, "job.environ.A", "expected a string, got null"),
        ({"environ": {"A=B": "1"}}, "job.environ", "invalid variable name 'A=B'"),
        ({"environ": {"": "1"}}, "job.environ", "invalid variable name ''"),
        ({"environ": {"A": "x\0y"}}, "job.environ.A", "must not contain NUL characters"),
        ({"notified_users": {}}, "job.notified_users", "expected a list, got an object"),
        ({"notified_users": ["bob"]}, "job.notified_users[0]", "expected an object, got 'bob'"),
        ({"notified_users": [{}]}, "job.notified_users[0].username", "is required"),
        (
            {"notified_users": [{"username": "b", "on_success": 1}]},
            "job.notified_users[0].on_success",
            "expected true or false, got 1",
        ),
        (
            {"notified_users": [{"username": "b", "email": "x"}]},
            "job.notified_users[0].email",
            "unknown key",
        ),
        ({"priority": 1.5}, "job.priority", "expected an integer, got 1.5"),
        ({"job_group_id": -1}, "job.job_group_id", "must be at least 0, got -1"),
        ({"job_group": 1}, "job.job_group", "expected a string, got 1"),
        ({"notes": ["x"]}, "job.notes", "expected a string, got a list"),
        ({"tags": "rush"}, "job.tags", "expected a list, got 'rush'"),
        ({"tags": ["ok", 2]}, "job.tags[1]", "expected a string, got 2"),
        ({"num_tiles": 0}, "job.num_tiles", "must be at least 1, got 0"),
        ({"agent_id": "uuid"}, "job.agent_id", "expected an integer, got 'uuid'"),
        ({"ramm": 5}, "job.ramm", "unknown key (did you mean 'ram'?)"),
        ({"colour": "red"}, "job.colour", "unknown key"),
    ],
)
def test_job_fields(fields: dict[str, Any], field: str, message: str) -> None:
    err = error(with_job(**fields))
    assert err.field == field
    assert err.message.startswith(message)
    assert str(err).startswith(f"{field}: {message}")


def test_job_required_fields() -> None:
    obj = minimal()
    del obj["job"]["by"]
    assert str(error(obj)) == "job.by: is required"
    obj = minimal()
    del obj["job"]["id"]
    assert str(error(obj)) == "job.id: is required"


@pytest.mark.parametrize(
    ("jobtype", "field", "message"),
    [
        ({"name": "blender"}, "jobtype.version", "is required"),
        ({"version": 1}, "jobtype.name", "is required"),
        ({"name": "blender", "version": "1"}, "jobtype.version", "expected an integer, got '1'"),
        ({"name": "blender", "version": -1}, "jobtype.version", "must be at least 0, got -1"),
        ({"name": None, "version": 1}, "jobtype.name", "expected a string, got null"),
        ({"name": 5, "version": 1}, "jobtype.name", "expected a string, got 5"),
        ({"name": "", "version": 1}, "jobtype.name", "must be a job type name, got ''"),
        ({"name": "a/b", "version": 1}, "jobtype.name", "must be a job type name, got 'a/b'"),
        ({"name": "a", "version": 1, "id": 3}, "jobtype.id", "unknown key"),
    ],
)
def test_jobtype_fields(jobtype: dict[str, Any], field: str, message: str) -> None:
    err = error({**minimal(), "jobtype": jobtype})
    assert (err.field, err.message) == (field, message)


@pytest.mark.parametrize(
    ("tasks", "field", "message"),
    [
        ({}, "tasks", "expected a list, got an object"),
        (None, "tasks", "expected a list, got null"),
        ([], "tasks", "must not be empty"),
        ([1], "tasks[0]", "expected an object, got 1"),
    ],
)
def test_tasks_list(tasks: object, field: str, message: str) -> None:
    err = error({**minimal(), "tasks": tasks})
    assert (err.field, err.message) == (field, message)


@pytest.mark.parametrize(
    ("index", "fields", "field", "message"),
    [
        (2, {"frame": "x"}, "tasks[2].frame", "expected a number, got 'x'"),
        (2, {"frame": None}, "tasks[2].frame", "expected a number, got null"),
        (1, {"frame": float("inf")}, "tasks[1].frame", "must be a finite number, got inf"),
        (1, {"frame": True}, "tasks[1].frame", "expected a number, got true"),
        (0, {"id": "1"}, "tasks[0].id", "expected an integer, got '1'"),
        (0, {"id": -3}, "tasks[0].id", "must be at least 0, got -3"),
        (2, {"id": 0}, "tasks[2].id", "duplicate task id 0 (also tasks[0])"),
        (1, {"tile": -1}, "tasks[1].tile", "must be at least 0, got -1"),
        (1, {"tile": 1.0}, "tasks[1].tile", "expected an integer, got 1.0"),
        (0, {"attempt": -1}, "tasks[0].attempt", "must be at least 0, got -1"),
        (0, {"attempt": "2"}, "tasks[0].attempt", "expected an integer, got '2'"),
        (1, {"state": "queued"}, "tasks[1].state", "unknown key"),
    ],
)
def test_task_fields(index: int, fields: dict[str, Any], field: str, message: str) -> None:
    err = error(with_task(index, **fields))
    assert (err.field, err.message) == (field, message)


def test_task_required_fields() -> None:
    obj = with_task()
    del obj["tasks"][1]["frame"]
    assert str(error(obj)) == "tasks[1].frame: is required"
    obj = with_task()
    del obj["tasks"][2]["id"]
    assert str(error(obj)) == "tasks[2].id: is required"


def test_negative_frames_are_fine() -> None:
    assert parse_assignment(with_task(0, frame=-10)).tasks[0].frame == -10.0


def test_tile_must_be_below_num_tiles() -> None:
    obj = with_task(1, tile=4)
    obj["job"]["num_tiles"] = 4
    assert str(error(obj)) == "tasks[1].tile: must be less than job.num_tiles (4), got 4"
    obj["tasks"][1]["tile"] = 3
    assert parse_assignment(obj).tasks[1].tile == 3


# --- files -----------------------------------------------------------------------------------


def test_load_json_file(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    # Tab indentation and exponents are JSON that YAML 1.1 does not read the same way.
    path.write_text(json.dumps(full(), indent="\t").replace('"by": 1.5', '"by": 15e-1'))
    assert parse_assignment(load_assignment_file(path), "x") == parse_assignment(full(), "x")


def test_load_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "a.yaml"
    path.write_text(
        "# a hand-written test assignment\n"
        "job: {id: 7, by: 1}\n"
        "jobtype:\n  name: blender\n  version: 2\n"
        "tasks:\n  - {id: 100, frame: 1}\n"
    )
    assert parse_assignment(load_assignment_file(path), "x") == parse_assignment(minimal(), "x")


def test_load_file_syntax_error_has_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("job: {id: 7, by: 1}\njobtype: [\n")
    with pytest.raises(AssignmentError) as info:
        load_assignment_file(path)
    err = info.value
    assert err.field == str(path)
    assert err.line == 3
    assert str(err).startswith(f"{path}:3:1: invalid YAML: ")


def test_load_file_bad_json_reports_yaml_position(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"job": {"id": 7,\n  "by": 1,,}}\n')
    with pytest.raises(AssignmentError) as info:
        load_assignment_file(path)
    assert info.value.line == 2


def test_load_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.json"
    with pytest.raises(AssignmentError) as info:
        load_assignment_file(path)
    assert str(info.value) == f"{path}: cannot read: No such file or directory"


def test_yaml_only_values_are_refused_by_the_parser(tmp_path: Path) -> None:
    path = tmp_path / "a.yaml"
    path.write_text(
        "job: {id: 7, by: 1, data: {when: 2024-01-01}}\n"
        "jobtype: {name: a, version: 1}\ntasks: [{id: 1, frame: 1}]\n"
    )
    err = error(load_assignment_file(path))
    assert err.field == "job.data.when"
    assert err.message == "expected a JSON value, got a date"


def _nested(depth: int) -> dict[str, Any]:
    """{"a": {"a": ... {}}}: `depth` objects, the outermost included."""
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def test_job_data_nesting_is_bounded() -> None:
    from farmnode.tasks.schema import MAX_DATA_DEPTH

    # MAX_DATA_DEPTH levels inside job.data are fine, one more is not.
    assert parse_assignment(with_job(data=_nested(MAX_DATA_DEPTH + 1))).job.data
    err = error(with_job(data=_nested(MAX_DATA_DEPTH + 2)))
    assert err.field == "job.data" + ".a" * (MAX_DATA_DEPTH + 1)
    assert err.message == f"nested deeper than {MAX_DATA_DEPTH} levels"
    # what once reached Python's recursion limit in the agent: an error naming the field
    err = error(with_job(data=_nested(600)))
    assert err.field.startswith("job.data.a.a") and "nested deeper" in err.message
    lists: Any = []
    for _ in range(600):
        lists = [lists]
    assert error(with_job(data={"x": lists})).field.startswith("job.data.x[0][0]")
