"""Validation of an assignment from the master (PyFarm's `POST /api/v1/assign` body).

`parse_assignment` is the only way untrusted input becomes a `farmnode.tasks.model.Assignment`:
it checks every field, rejects unknown keys at every level (as PyFarm's voluptuous schema did)
and names the offending field in the error, e.g. `tasks[2].frame: expected a number, got 'x'`.
Optional fields may be null (the master sends null for unset columns) and mean "not given".
"""

from __future__ import annotations

import difflib
import json
import math
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from farmnode.describe import describe
from farmnode.tasks.model import Assignment, Job, JobTypeRef, Task

T = TypeVar("T")


class AssignmentError(ValueError):
    """An invalid assignment; `field` is a path such as "job.ram" or "tasks[2].frame"."""

    def __init__(
        self, field: str, message: str, *, line: int | None = None, column: int | None = None
    ) -> None:
        super().__init__(field, message)
        self.field = field
        self.message = message
        self.line = line
        self.column = column

    def __str__(self) -> str:
        where = self.field
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        return f"{where}: {self.message}"


# The root of the document, when the whole thing is wrong.
ROOT = "assignment"

_JOB_KEYS = (
    "id", "by", "title", "user", "ram", "cpus", "ram_warning", "ram_max", "batch", "data",
    "environ", "notified_users", "priority", "job_group_id", "job_group", "notes", "tags",
    "num_tiles", "agent_id",
)  # fmt: skip
_JOBTYPE_KEYS = ("name", "version")
_TASK_KEYS = ("id", "frame", "tile", "attempt")
_NOTIFIED_USER_KEYS = ("username", "on_success", "on_failure", "on_deletion")
_TOP_KEYS = ("job", "jobtype", "tasks")


def _describe(value: object) -> str:
    return describe(value, "an object")  # an assignment is JSON


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Object:
    """One JSON object of the assignment, read field by field."""

    def __init__(
        self, value: object, path: str, known: tuple[str, ...], required: tuple[str, ...]
    ) -> None:
        if not isinstance(value, dict):
            raise AssignmentError(path, f"expected an object, got {_describe(value)}")
        for key in value:
            if not isinstance(key, str):
                raise AssignmentError(path or ROOT, f"keys must be strings, got {_describe(key)}")
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise AssignmentError(self._join(path, key), f"unknown key{hint}")
        for key in required:
            if key not in value:
                raise AssignmentError(self._join(path, key), "is required")
        self.value: dict[str, object] = value
        self.path = path

    @staticmethod
    def _join(path: str, key: str) -> str:
        return f"{path}.{key}" if path else key

    def at(self, key: str) -> str:
        return self._join(self.path, key)

    def error(self, key: str, message: str) -> AssignmentError:
        return AssignmentError(self.at(key), message)

    def _get(self, key: str, expected: str, required: bool) -> object:
        value = self.value.get(key)
        if value is None and required:
            raise self.error(key, f"expected {expected}, got null")
        return value

    def integer(
        self, key: str, *, minimum: int | None = None, required: bool = False
    ) -> int | None:
        value = self._get(key, "an integer", required)
        if value is None:
            return None
        if not _is_int(value):
            raise self.error(key, f"expected an integer, got {_describe(value)}")
        assert isinstance(value, int)
        if minimum is not None and value < minimum:
            raise self.error(key, f"must be at least {minimum}, got {value}")
        # Ids and counts are stored as SQLite INTEGER and sent over D-Bus as int64.
        if not -(2**63) <= value < 2**63:
            raise self.error(key, f"must fit in 64 bits, got {value}")
        return value

    def number(self, key: str, *, positive: bool = False, required: bool = False) -> float | None:
        value = self._get(key, "a number", required)
        if value is None:
            return None
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise self.error(key, f"expected a number, got {_describe(value)}")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise self.error(key, f"must be a finite number, got {_describe(value)}")
        if positive and number <= 0:
            raise self.error(key, f"must be greater than 0, got {_describe(value)}")
        return number

    def string(
        self, key: str, *, check: Callable[[str], str | None] | None = None, required: bool = False
    ) -> str | None:
        value = self._get(key, "a string", required)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.error(key, f"expected a string, got {_describe(value)}")
        problem = check(value) if check is not None else None
        if problem:
            raise self.error(key, problem)
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.value.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {_describe(value)}")
        return value

    def items(self, key: str, read: Callable[[object, str], T]) -> list[T]:
        value = self.value.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.error(key, f"expected a list, got {_describe(value)}")
        return [read(item, f"{self.at(key)}[{i}]") for i, item in enumerate(value)]


# --- field checks (return a problem, or None) -----------------------------------------------


def _user_name(value: str) -> str | None:
    # It may become the task's User=: anything path-like or blank is refused outright.
    if (
        not value
        or value in (".", "..")
        or value.startswith("-")
        or any(c in "/:" or c.isspace() or not c.isprintable() for c in value)
    ):
        return f"must be a user name, got {_describe(value)}"
    return None


def _jobtype_name(value: str) -> str | None:
    # Spliced into GET /jobtypes/<name>/versions/<n> and used as a cache file name.
    if not value or "/" in value or value in (".", "..") or not value.isprintable():
        return f"must be a job type name, got {_describe(value)}"
    return None


# Nesting allowed inside job.data. Job types read a few flat keys; the limit keeps the copy
# (and every later walk over the data) far from Python's recursion limit, whatever arrives.
MAX_DATA_DEPTH = 32


def _json_copy(value: object, path: str, depth: int = 0) -> Any:
    """A deep copy of a JSON value; refuses what JSON cannot carry (it is stored as JSON)."""
    if value is None or isinstance(value, bool | str) or _is_int(value):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise AssignmentError(path, f"must be a finite number, got {_describe(value)}")
        return value
    if isinstance(value, list | dict) and depth > MAX_DATA_DEPTH:
        raise AssignmentError(path, f"nested deeper than {MAX_DATA_DEPTH} levels")
    if isinstance(value, list):
        return [_json_copy(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise AssignmentError(path, f"keys must be strings, got {_describe(k)}")
            out[k] = _json_copy(v, f"{path}.{k}", depth + 1)
        return out
    raise AssignmentError(path, f"expected a JSON value, got {_describe(value)}")


def _data(job: _Object) -> dict[str, Any]:
    value = job.value.get("data")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise job.error("data", f"expected an object, got {_describe(value)}")
    copied: dict[str, Any] = _json_copy(value, job.at("data"))
    return copied


def _environ(job: _Object) -> dict[str, str]:
    value = job.value.get("environ")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise job.error("environ", f"expected an object, got {_describe(value)}")
    out: dict[str, str] = {}
    for name, text in value.items():
        path = f"{job.at('environ')}.{name}"
        # execve() cannot carry these: '=' splits the entry, NUL ends it.
        if not isinstance(name, str) or not name or "=" in name or "\0" in name:
            raise AssignmentError(job.at("environ"), f"invalid variable name {_describe(name)}")
        if not isinstance(text, str):
            raise AssignmentError(path, f"expected a string, got {_describe(text)}")
        if "\0" in text:
            raise AssignmentError(path, "must not contain NUL characters")
        out[name] = text
    return out


def _tag(value: object, path: str) -> str:
    if not isinstance(value, str):
        raise AssignmentError(path, f"expected a string, got {_describe(value)}")
    return value


def _notified_user(value: object, path: str) -> dict[str, Any]:
    # PyFarm's NOTIFIED_USERS_SCHEMA, defaults filled in as it did.
    user = _Object(value, path, _NOTIFIED_USER_KEYS, ("username",))
    return {
        "username": user.string("username", required=True),
        "on_success": user.boolean("on_success", True),
        "on_failure": user.boolean("on_failure", True),
        "on_deletion": user.boolean("on_deletion", False),
    }


# --- the assignment ---------------------------------------------------------------------------


def _parse_job(value: object) -> Job:
    job = _Object(value, "job", _JOB_KEYS, ("id", "by"))
    job_id = job.integer("id", minimum=0, required=True)
    by = job.number("by", positive=True, required=True)
    assert job_id is not None and by is not None
    ram = job.integer("ram", minimum=1)
    ram_max = job.integer("ram_max", minimum=1)
    if ram is not None and ram_max is not None and ram_max < ram:
        raise job.error("ram_max", f"must be at least job.ram ({ram}), got {ram_max}")
    return Job(
        id=job_id,
        by=by,
        title=job.string("title"),
        user=job.string("user", check=_user_name),
        ram=ram,
        cpus=job.number("cpus", positive=True),
        ram_warning=job.integer("ram_warning", minimum=1),
        ram_max=ram_max,
        batch=job.integer("batch", minimum=1),
        data=_data(job),
        environ=_environ(job),
        notified_users=job.items("notified_users", _notified_user),
        priority=job.integer("priority"),
        job_group_id=job.integer("job_group_id", minimum=0),
        job_group=job.string("job_group"),
        notes=job.string("notes"),
        tags=job.items("tags", _tag),
        num_tiles=job.integer("num_tiles", minimum=1),
        agent_id=job.integer("agent_id", minimum=0),
    )


def _parse_jobtype(value: object) -> JobTypeRef:
    jobtype = _Object(value, "jobtype", _JOBTYPE_KEYS, _JOBTYPE_KEYS)
    name = jobtype.string("name", check=_jobtype_name, required=True)
    version = jobtype.integer("version", minimum=0, required=True)
    assert name is not None and version is not None
    return JobTypeRef(name=name, version=version)


def _parse_task(value: object, path: str, num_tiles: int | None) -> Task:
    task = _Object(value, path, _TASK_KEYS, ("id", "frame"))
    task_id = task.integer("id", minimum=0, required=True)
    frame = task.number("frame", required=True)
    tile = task.integer("tile", minimum=0)
    if tile is not None and num_tiles is not None and tile >= num_tiles:
        raise task.error("tile", f"must be less than job.num_tiles ({num_tiles}), got {tile}")
    # PyFarm defaults a missing attempt to 0; a null from the master means the same.
    attempt = task.integer("attempt", minimum=0)
    assert task_id is not None and frame is not None
    return Task(id=task_id, frame=frame, tile=tile, attempt=attempt or 0)


def _parse_tasks(value: object, num_tiles: int | None) -> tuple[Task, ...]:
    if not isinstance(value, list):
        raise AssignmentError("tasks", f"expected a list, got {_describe(value)}")
    if not value:
        raise AssignmentError("tasks", "must not be empty")
    tasks: list[Task] = []
    seen: dict[int, int] = {}
    for i, item in enumerate(value):
        task = _parse_task(item, f"tasks[{i}]", num_tiles)
        if task.id in seen:
            raise AssignmentError(
                f"tasks[{i}].id", f"duplicate task id {task.id} (also tasks[{seen[task.id]}])"
            )
        seen[task.id] = i
        tasks.append(task)
    return tuple(tasks)


def parse_assignment(obj: object, assignment_id: str | None = None) -> Assignment:
    """Validate a decoded `POST /assign` body; raises AssignmentError naming the bad field.

    The assignment's id is `assignment_id` when given (e.g. re-reading a stored one), else a
    new uuid4: PyFarm's agent chooses it and returns it to the master.
    """
    top = _Object(obj, "", _TOP_KEYS, _TOP_KEYS) if isinstance(obj, dict) else None
    if top is None:
        raise AssignmentError(ROOT, f"expected an object, got {_describe(obj)}")
    job = _parse_job(top.value["job"])
    jobtype = _parse_jobtype(top.value["jobtype"])
    tasks = _parse_tasks(top.value["tasks"], job.num_tiles)
    return Assignment(
        id=assignment_id if assignment_id is not None else str(uuid.uuid4()),
        job=job,
        jobtype=jobtype,
        tasks=tasks,
    )


def assignment_to_json(a: Assignment) -> dict[str, Any]:
    """The assignment as the master's JSON (without our id); `parse_assignment` reads it back.

    Unset optional job fields are left out rather than sent as null: PyFarm's own schema
    refuses null for most of them.
    """
    job: dict[str, Any] = {
        "id": a.job.id,
        "by": a.job.by,
        "title": a.job.title,
        "user": a.job.user,
        "ram": a.job.ram,
        "cpus": a.job.cpus,
        "ram_warning": a.job.ram_warning,
        "ram_max": a.job.ram_max,
        "batch": a.job.batch,
        "data": json.loads(json.dumps(a.job.data)),
        "environ": dict(a.job.environ),
        "notified_users": json.loads(json.dumps(a.job.notified_users)),
        "priority": a.job.priority,
        "job_group_id": a.job.job_group_id,
        "job_group": a.job.job_group,
        "notes": a.job.notes,
        "tags": list(a.job.tags),
        "num_tiles": a.job.num_tiles,
        "agent_id": a.job.agent_id,
    }
    return {
        "job": {k: v for k, v in job.items() if v is not None},
        "jobtype": {"name": a.jobtype.name, "version": a.jobtype.version},
        "tasks": [
            {"id": t.id, "frame": t.frame, "tile": t.tile, "attempt": t.attempt} for t in a.tasks
        ],
    }


def load_assignment_file(path: str | Path) -> object:
    """Read an assignment written by hand or saved from the wire: JSON or YAML.

    Returns the decoded object for `parse_assignment`. Errors are AssignmentError with the
    file as `field` and, for syntax errors, `line`/`column` set.
    """
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise AssignmentError(name, "not UTF-8 text") from None
    except OSError as e:
        raise AssignmentError(name, f"cannot read: {e.strerror}") from None
    return parse_assignment_text(text, name)


def parse_assignment_text(text: str, name: str = "<stdin>") -> object:
    """Decode an assignment's text (JSON or YAML); `name` is what errors call it."""
    # JSON first: PyYAML (YAML 1.1) rejects valid JSON such as tab indentation or "1e3".
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        problem = e.problem or e.context or "syntax error"
        if e.problem and e.context:
            problem = f"{e.problem} ({e.context})"
        if mark is None:
            raise AssignmentError(name, f"invalid YAML: {problem}") from None
        raise AssignmentError(
            name, f"invalid YAML: {problem}", line=mark.line + 1, column=mark.column + 1
        ) from None
    except yaml.YAMLError as e:
        raise AssignmentError(name, f"invalid YAML: {e}") from None
