"""Reading a job file: Jinja, then YAML, then every field checked, then the dependencies.

Every refusal is a JobFileError naming the file, the source line (as written, before Jinja)
and the field, e.g. `jobs.yaml:12: jobs[1].ram: expected an integer, got 'lots'`; a cycle
names the jobs in it, an unknown dependency the job that names it.

The job file format (keys of each job):

    id            a name, unique in the file (letters, digits, '_', '-', '.')
    title         free text
    jobtype       a job type name; jobtype_version (default 1)
    data          the job type's data (an object)
    start end by  the frame range (by defaults to 1); batch: frames per assignment
    ram ram_max   MB; cpus
    environment   {NAME: value}
    user          the account the job runs as
    dependencies  ids of jobs of this file that must be done first
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import yaml

from farmnode.describe import describe
from farmnode.jobfile.model import FrameRange, JobFile, JobSpec
from farmnode.jobfile.render import Rendered, RenderError, render
from farmnode.tasks.schema import AssignmentError, parse_assignment

MAX_JOBS = 10_000
MAX_FRAMES = 100_000  # per job: each is a task row on the node or the master
# Values in the whole file with YAML aliases expanded: a few aliases nested can stand for
# billions of values, and every later walk (checks, JSON) would expand them.
MAX_VALUES = 1_000_000
_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_JOB_KEYS = ("id", "title", "jobtype", "jobtype_version", "data", "start", "end", "by",
             "batch", "ram", "ram_max", "cpus", "environment", "user", "dependencies")
_REQUIRED = ("id", "jobtype", "start", "end")
# Where the assignment's field names differ from the file's.
_ASSIGNMENT_FIELDS = {"job.environ": "environment", "job.data": "data", "job.user": "user",
                      "job.ram": "ram", "job.ram_max": "ram_max", "job.cpus": "cpus",
                      "job.title": "title", "jobtype.name": "jobtype",
                      "jobtype.version": "jobtype_version", "job.by": "by"}


class JobFileError(ValueError):
    """A refused job file: `line` is the source line, `field` e.g. "jobs[2].ram"."""

    def __init__(self, name: str, line: int | None, field: str | None, message: str) -> None:
        super().__init__(name, line, field, message)
        self.name, self.line, self.field, self.message = name, line, field, message

    def __str__(self) -> str:
        where = self.name + (f":{self.line}" if self.line is not None else "")
        return f"{where}: {self.field}: {self.message}" if self.field else \
            f"{where}: {self.message}"


def _describe(value: object) -> str:
    return describe(value, "an object")  # as the assignment schema says it


class _Reader:
    def __init__(self, rendered: Rendered, name: str) -> None:
        self.rendered = rendered
        self.name = name
        self._constructor = yaml.SafeLoader("")

    def line(self, node: yaml.Node) -> int | None:
        return self.rendered.source_line(node.start_mark.line)

    def error(self, line: int | None, field: str | None, message: str) -> JobFileError:
        return JobFileError(self.name, line, field, message)

    def value(self, node: yaml.Node) -> Any:
        try:
            return self._constructor.construct_object(node, deep=True)
        except yaml.constructor.ConstructorError as exc:
            mark = exc.problem_mark or node.start_mark
            raise self.error(self.rendered.source_line(mark.line), None,
                             f"invalid YAML: {exc.problem}") from None

    def mapping(self, node: yaml.Node, field: str) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        if not isinstance(node, yaml.MappingNode):
            raise self.error(self.line(node), field or None,
                             f"expected an object, got {_describe(self.value(node))}")
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            key = self.value(key_node)
            path = f"{field}.{key}" if field else str(key)
            if not isinstance(key, str):
                raise self.error(self.line(key_node), field or None,
                                 f"keys must be strings, got {_describe(key)}")
            if key in out:
                raise self.error(self.line(key_node), path,
                                 f"given twice (also line {self.line(out[key][0])})")
            out[key] = (key_node, value_node)
        return out


def _checked(reader: _Reader, fields: Mapping[str, tuple[yaml.Node, yaml.Node]],
             path: str) -> Callable[..., Any]:
    """A reader of one job's fields by name, with type checks naming the field and line."""

    def get(key: str, kind: str, *, minimum: float | None = None,
            check: Callable[[Any], str | None] | None = None) -> Any:
        if key not in fields:
            return None
        key_node, value_node = fields[key]
        line = reader.line(key_node)
        value = reader.value(value_node)
        where = f"{path}.{key}"
        if value is None:
            return None
        ok = {
            "int": isinstance(value, int) and not isinstance(value, bool),
            "number": isinstance(value, int | float) and not isinstance(value, bool),
            "str": isinstance(value, str),
            "object": isinstance(value, dict),
            "list": isinstance(value, list),
        }[kind]
        if not ok:
            expected = {"int": "an integer", "number": "a number", "str": "a string",
                        "object": "an object", "list": "a list"}[kind]
            raise reader.error(line, where, f"expected {expected}, got {_describe(value)}")
        if minimum is not None and value < minimum:
            raise reader.error(line, where, f"must be at least {minimum:g}, got {value}")
        problem = check(value) if check else None
        if problem:
            raise reader.error(line, where, problem)
        return value

    return get


def _job(reader: _Reader, node: yaml.Node, index: int, jobtypes: Sequence[str] | None,
         jobtype_note: str) -> JobSpec:
    path = f"jobs[{index}]"
    fields = reader.mapping(node, path)
    job_line = reader.line(node)
    for key, (key_node, _value) in fields.items():
        if key not in _JOB_KEYS:
            close = difflib.get_close_matches(key, _JOB_KEYS, n=1)
            raise reader.error(reader.line(key_node), f"{path}.{key}", "unknown field" + (
                f" (did you mean {close[0]!r}?)" if close else ""))
    for key in _REQUIRED:
        if key not in fields:
            raise reader.error(job_line, f"{path}.{key}", "is required")
    get = _checked(reader, fields, path)

    def line_of(key: str) -> int | None:
        return reader.line(fields[key][0]) if key in fields else job_line

    job_id = get("id", "str", check=lambda v: None if _ID.fullmatch(v) else
                 f"must be a name of letters, digits, '_', '-' or '.', got {_describe(v)}")
    if job_id is None:
        raise reader.error(line_of("id"), f"{path}.id", "is required")
    jobtype = get("jobtype", "str")
    if jobtype is None:
        raise reader.error(line_of("jobtype"), f"{path}.jobtype", "is required")
    if jobtypes is not None and jobtype not in jobtypes:
        close = difflib.get_close_matches(jobtype, jobtypes, n=1)
        raise reader.error(line_of("jobtype"), f"{path}.jobtype",
                           f"unknown job type {jobtype!r}"
                           + (f" (did you mean {close[0]!r}?)" if close else "")
                           + f"; {jobtype_note}: {', '.join(jobtypes) or 'none'}")
    start, end = get("start", "number"), get("end", "number")
    if start is None or end is None:
        key = "start" if start is None else "end"
        raise reader.error(line_of(key), f"{path}.{key}", "expected a number, got null")
    if end < start:
        raise reader.error(line_of("end"), f"{path}.end",
                           f"must be at least start ({start:g}), got {end:g}")
    by = get("by", "number", check=lambda v: None if v > 0 else
             f"must be greater than 0, got {v:g}")
    batch = get("batch", "int", minimum=1)
    frames = FrameRange(float(start), float(end), float(by or 1), int(batch or 1))
    if (end - start) / frames.by + 1 > MAX_FRAMES:
        raise reader.error(line_of("end"), f"{path}.end",
                           f"more than {MAX_FRAMES} frames from {start:g} to {end:g} by "
                           f"{frames.by:g}")
    deps = get("dependencies", "list") or []
    for i, dep in enumerate(deps):
        if not isinstance(dep, str):
            raise reader.error(line_of("dependencies"), f"{path}.dependencies[{i}]",
                               f"expected a job id, got {_describe(dep)}")
    ram, ram_max = get("ram", "int", minimum=1), get("ram_max", "int", minimum=1)
    spec = JobSpec(
        id=job_id, title=get("title", "str"), jobtype=jobtype,
        jobtype_version=get("jobtype_version", "int", minimum=0) or 1,
        data=get("data", "object") or {}, frames=frames, ram=ram, ram_max=ram_max,
        cpus=get("cpus", "number"), environment=get("environment", "object") or {},
        user=get("user", "str"), dependencies=tuple(deps), line=job_line or 1)
    # Everything else an assignment checks (ram_max below ram, environment names, data
    # that JSON cannot carry, user names) is checked by the code that checks assignments.
    try:
        parse_assignment(as_assignment(spec, 0, [(0, frames.start)]))
    except AssignmentError as exc:
        found = next(((k, v) for k, v in _ASSIGNMENT_FIELDS.items()
                      if exc.field == k or exc.field.startswith(k + ".")), None)
        if found is None:
            raise reader.error(job_line, path, f"{exc.field}: {exc.message}") from None
        theirs, ours = found
        raise reader.error(line_of(ours), f"{path}.{ours}{exc.field[len(theirs):]}",
                           exc.message) from None
    return spec


def as_assignment(spec: JobSpec, job_id: int, tasks: Sequence[tuple[int, float]]
                  ) -> dict[str, Any]:
    """The PyFarm assignment (as the master sends it) of some of the job's frames."""
    job: dict[str, Any] = {"id": job_id, "by": spec.frames.by, "data": spec.data,
                           "environ": spec.environment, "batch": spec.frames.batch}
    for key, value in (("title", spec.title or spec.id), ("user", spec.user),
                       ("ram", spec.ram), ("ram_max", spec.ram_max), ("cpus", spec.cpus)):
        if value is not None:
            job[key] = value
    return {"job": job, "jobtype": {"name": spec.jobtype, "version": spec.jobtype_version},
            "tasks": [{"id": task_id, "frame": frame} for task_id, frame in tasks]}


def _ordered(reader: _Reader, jobs: list[JobSpec]) -> tuple[JobSpec, ...]:
    """The jobs with each after its dependencies (file order otherwise); refuses unknown
    dependencies and cycles, naming the jobs."""
    by_id: dict[str, JobSpec] = {}
    for j in jobs:
        if j.id in by_id:
            raise reader.error(j.line, f"jobs[{jobs.index(j)}].id",
                               f"job id {j.id!r} is used twice (also line "
                               f"{by_id[j.id].line})")
        by_id[j.id] = j
    for i, j in enumerate(jobs):
        for dep in j.dependencies:
            if dep not in by_id:
                close = difflib.get_close_matches(dep, list(by_id), n=1)
                raise reader.error(j.line, f"jobs[{i}].dependencies",
                                   f"job {j.id!r} depends on {dep!r}, which is not a job of "
                                   "this file" + (f" (did you mean {close[0]!r}?)"
                                                  if close else ""))
            if dep == j.id:
                raise reader.error(j.line, f"jobs[{i}].dependencies",
                                   f"job {j.id!r} depends on itself")
    order: list[JobSpec] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: placed
    for root in jobs:
        if root.id in state:
            continue
        path: list[str] = []
        stack: list[tuple[str, int]] = [(root.id, 0)]
        while stack:
            jid, i = stack.pop()
            deps = by_id[jid].dependencies
            if i == 0:
                state[jid] = 1
                path.append(jid)
            if i < len(deps):
                stack.append((jid, i + 1))
                dep = deps[i]
                if state.get(dep) == 1:
                    cycle = [*path[path.index(dep):], dep]
                    raise reader.error(by_id[dep].line, None,
                                       "dependency cycle: " + " -> ".join(cycle))
                if dep not in state:
                    stack.append((dep, 0))
                continue
            state[jid] = 2
            path.pop()
            order.append(by_id[jid])
    return tuple(order)


def _bounded(reader: _Reader, root: yaml.Node) -> None:
    """Refuse a document that expands (aliases followed) to more than MAX_VALUES values."""
    stack, count = [root], 0
    while stack:
        node = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise reader.error(reader.line(node), None, f"more than {MAX_VALUES} values with "
                               "its aliases expanded")
        if isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            stack.extend(v for pair in node.value for v in pair)


def parse_rendered(rendered: Rendered, name: str, jobtypes: Sequence[str] | None = None,
                   jobtype_note: str = "job types of this node") -> JobFile:
    """Validate the YAML of a rendered job file; `jobtypes`: the names a job may use (None:
    any, e.g. a master that is asked itself)."""
    reader = _Reader(rendered, name)
    try:
        root = yaml.compose(rendered.text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "syntax error"
        raise reader.error(rendered.source_line(mark.line) if mark else None, None,
                           f"invalid YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise reader.error(None, None, f"invalid YAML: {exc}") from None
    if root is None:
        raise reader.error(None, None, "empty file: expected 'jobs:' with a list of jobs")
    _bounded(reader, root)
    top = reader.mapping(root, "")
    for key, (key_node, _value) in top.items():
        if key != "jobs":
            raise reader.error(reader.line(key_node), key, "unknown key (expected 'jobs')")
    if "jobs" not in top:
        raise reader.error(reader.line(root), "jobs", "is required")
    key_node, seq = top["jobs"]
    if not isinstance(seq, yaml.SequenceNode):
        raise reader.error(reader.line(key_node), "jobs", "expected a list of jobs, got "
                           + _describe(reader.value(seq)))
    if not seq.value:
        raise reader.error(reader.line(key_node), "jobs", "must not be empty")
    if len(seq.value) > MAX_JOBS:
        raise reader.error(reader.line(key_node), "jobs", f"more than {MAX_JOBS} jobs")
    jobs = [_job(reader, node, i, jobtypes, jobtype_note) for i, node in enumerate(seq.value)]
    return JobFile(name, _ordered(reader, jobs))


def load(source: str, name: str, variables: Mapping[str, object] | None = None,
         jobtypes: Sequence[str] | None = None) -> JobFile:
    """Render and validate a job file's text; raises JobFileError."""
    try:
        rendered = render(source, name, variables)
    except RenderError as exc:
        raise JobFileError(exc.name, exc.line, None, exc.message) from None
    return parse_rendered(rendered, name, jobtypes)
