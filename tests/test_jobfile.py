"""Job files: Jinja with source lines kept, every field checked, dependencies ordered, and
each refusal naming the file, the line as written and the field."""

from __future__ import annotations

import textwrap

import pytest

from farmnode.jobfile.parse import JobFileError, as_assignment, load
from farmnode.jobfile.render import MAX_OUTPUT, render
from farmnode.tasks.schema import parse_assignment

JOBTYPES = ["command", "fakerender"]


def refused(text: str, name: str = "jobs.yaml", **variables: object) -> JobFileError:
    with pytest.raises(JobFileError) as info:
        load(textwrap.dedent(text), name, variables, jobtypes=JOBTYPES)
    return info.value


def test_jinja_variables_and_macros_become_jobs_in_dependency_order() -> None:
    text = textwrap.dedent("""\
        {% set last = 6 %}
        {% macro shot(name, deps=[]) %}
          - id: {{ name }}
            title: "shot {{ name }}"
            jobtype: command
            data: {command: [/bin/echo, "{{ name }}", "{frame}"]}
            start: 1
            end: {{ last }}
            by: 2
            batch: 2
            ram: 64
            ram_max: 128
            cpus: 1
            environment: {SHOT: "{{ name }}"}
            dependencies: {{ deps }}
        {% endmacro %}
        jobs:
        {{ shot('comp', ['fg', 'bg']) }}
        {{ shot('fg') }}
        {{ shot('bg', ['fg']) }}
        """)
    f = load(text, "shots.yaml", jobtypes=JOBTYPES)
    assert [j.id for j in f.jobs] == ["fg", "bg", "comp"]
    comp = f.jobs[2]
    assert comp.title == "shot comp" and comp.dependencies == ("fg", "bg")
    assert comp.frames.frames() == [1.0, 3.0, 5.0]
    assert comp.frames.batches() == [[1.0, 3.0], [5.0]]
    assert (comp.ram, comp.ram_max, comp.cpus) == (64, 128, 1)
    assert comp.environment == {"SHOT": "comp"}
    assert comp.line == 3  # the macro's first job line, where the job is written
    # What the node assigns itself is an assignment the master could have sent.
    a = parse_assignment(as_assignment(comp, 7, [(100, 1.0), (101, 3.0)]))
    assert a.job.environ == {"SHOT": "comp"} and a.job.ram_max == 128
    assert [t.frame for t in a.tasks] == [1.0, 3.0] and a.jobtype.name == "command"


def test_command_line_variables_reach_the_template() -> None:
    text = "jobs:\n  - {id: a, jobtype: command, start: 1, end: {{ frames }}}\n"
    assert load(text, "v.yaml", {"frames": 3}, JOBTYPES).jobs[0].frames.end == 3


def test_output_lines_map_to_their_source_lines() -> None:
    r = render("{% for i in range(2) %}\na{{ i }}\n{% endfor %}\nb\n{# c\n #}\nd\n", "x")
    pairs = [(line, text) for line, text in zip(r.source_lines, r.text.split("\n"),
                                                 strict=True) if text]
    assert pairs == [(2, "a0"), (2, "a1"), (4, "b"), (7, "d")]


def test_dependency_cycle_names_the_jobs_in_it() -> None:
    err = refused("""\
        jobs:
          - {id: a, jobtype: command, start: 1, end: 1, dependencies: [c]}
          - {id: b, jobtype: command, start: 1, end: 1, dependencies: [a]}
          - {id: c, jobtype: command, start: 1, end: 1, dependencies: [b]}
          - {id: d, jobtype: command, start: 1, end: 1}
        """)
    assert "dependency cycle" in str(err)
    assert "a -> c -> b -> a" in str(err) and "d" not in err.message.split(":")[1]


def test_unknown_dependency_names_the_job_and_its_line() -> None:
    err = refused("""\
        jobs:
          - {id: a, jobtype: command, start: 1, end: 1}
          - id: b
            jobtype: command
            start: 1
            end: 1
            dependencies: [aa]
        """)
    assert str(err).startswith("jobs.yaml:3: jobs[1].dependencies: ")
    assert "'b' depends on 'aa'" in str(err) and "did you mean 'a'" in str(err)


def test_jinja_errors_name_the_file_and_line() -> None:
    err = refused("jobs:\n  - id: a\n    title: {{ missing }}\n")
    assert str(err) == "jobs.yaml:3: Jinja: 'missing' is undefined"
    err = refused("jobs:\n\n  {% for x in %}\n")
    assert str(err).startswith("jobs.yaml:3: Jinja syntax error")
    # The sandbox: no way from a job file to Python's internals, nor to other files.
    err = refused("jobs: {{ ''.__class__.__mro__ }}\n")
    assert str(err).startswith("jobs.yaml:1: Jinja:") and "unsafe" in str(err)
    err = refused("\n{% include '/etc/passwd' %}\n")
    assert str(err).startswith("jobs.yaml:2: Jinja:")


def test_a_template_that_renders_without_end_is_cut_off() -> None:
    err = refused("{% for i in range(100000) %}{% for j in range(100000) %}xxxxxxxxxx"
                  "{% endfor %}{% endfor %}")
    assert f"more than {MAX_OUTPUT}" in str(err)


def test_unknown_job_type_names_line_and_field() -> None:
    err = refused("""\
        jobs:
          - id: a
            jobtype: fakerendr
            start: 1
            end: 1
        """)
    assert str(err).startswith("jobs.yaml:3: jobs[0].jobtype: unknown job type 'fakerendr' "
                               "(did you mean 'fakerender'?)")


@pytest.mark.parametrize(("field", "value", "message"), [
    ("ram", "lots", "jobs[0].ram: expected an integer, got 'lots'"),
    ("cpus", "[1]", "jobs[0].cpus: expected a number, got a list"),
    ("by", "0", "jobs[0].by: must be greater than 0"),
    ("batch", "0", "jobs[0].batch: must be at least 1"),
    ("end", "0", "jobs[0].end: must be at least start (1)"),
    ("end", "1000000", "jobs[0].end: more than 100000 frames"),
    ("environment", "{A: 1}", "jobs[0].environment.A: expected a string, got 1"),
    ("environment", "{A: 2024-01-01}", "jobs[0].environment.A: expected a string, got a date"),
    ("environment", "{'A=B': x}", "jobs[0].environment: invalid variable name 'A=B'"),
    ("user", "'../root'", "jobs[0].user: must be a user name"),
    ("id", "'a b'", "jobs[0].id: must be a name of letters"),
    ("data", "[1]", "jobs[0].data: expected an object, got a list"),
    ("dependecies", "[x]", "jobs[0].dependecies: unknown field (did you mean 'dependencies'?)"),
])
def test_bad_field_names_line_and_field(field: str, value: str, message: str) -> None:
    text = "jobs:\n  - id: a\n    jobtype: command\n    start: 1\n\n    end: 1\n"
    if field in ("end", "id"):  # present already: changed where it is
        text = text.replace(f"{field}: {'1' if field == 'end' else 'a'}", f"{field}: {value}")
    else:
        text += f"    {field}: {value}\n"
    err = refused(text)
    line = {"end": 6, "id": 2}.get(field, 7)
    assert str(err).startswith(f"jobs.yaml:{line}: {message}"), str(err)


def test_ram_max_below_ram_is_refused_as_an_assignment_would_be() -> None:
    err = refused("jobs:\n  - {id: a, jobtype: command, start: 1, end: 1,\n"
                  "     ram: 100,\n     ram_max: 10}\n")
    assert str(err).startswith("jobs.yaml:4: jobs[0].ram_max: must be at least")


def test_file_shape_errors() -> None:
    assert str(refused("")) == "jobs.yaml: empty file: expected 'jobs:' with a list of jobs"
    assert str(refused("jobs: []\n")).startswith("jobs.yaml:1: jobs: must not be empty")
    assert str(refused("job: []\n")).startswith("jobs.yaml:1: job: unknown key")
    assert str(refused("jobs:\n  - id: a\n  - [\n")).startswith("jobs.yaml:")
    err = refused("jobs:\n  - {id: a, jobtype: command, start: 1, end: 1}\n"
                  "  - {id: a, jobtype: command, start: 1, end: 1}\n")
    assert str(err).startswith("jobs.yaml:3: jobs[1].id: job id 'a' is used twice (also line 2)")
    err = refused("jobs:\n  - {id: a, jobtype: command, start: 1, start: 2, end: 1}\n")
    assert "jobs[0].start: given twice" in str(err)
    err = refused("jobs:\n  - {id: a, jobtype: command, end: 1}\n")
    assert str(err) == "jobs.yaml:2: jobs[0].start: is required"


def test_master_submission_creates_parents_first_and_refuses_a_missing_job_type() -> None:
    import asyncio

    from farmnode.jobfile.master import MasterRefused, submit
    from farmnode.master.http import Response

    jf = load("jobs:\n  - {id: b, jobtype: command, start: 1, end: 4, batch: 2, cpus: 0.5,\n"
              "     dependencies: [a], environment: {X: y}}\n"
              "  - {id: a, jobtype: blender, start: 1, end: 1}\n", "m.yaml")
    calls: list[tuple[str, str, object]] = []
    known = {"command", "blender"}

    async def master(method: str, path: str, body: object) -> Response:
        # What PyFarm's master answers: 404 for a job type it lacks, the new job's id.
        calls.append((method, path, body))
        if method == "GET":
            return Response(200 if path.split("/")[2] in known else 404, {})
        if len(calls) == 4 and "refuse" in known:  # the second job
            return Response(400, {"error": "request contains field(s) that do not exist"})
        return Response(201, {"id": 40 + len(calls)})

    done = asyncio.run(submit(jf, master))
    posts = [(p, b) for m, p, b in calls if m == "POST"]
    assert [b["title"] for _p, b in posts] == ["a", "b"]  # type: ignore[index]
    assert done.created == {"a": 43, "b": 44}
    assert posts[1][1] == {"title": "b", "jobtype": "command", "jobtype_version": 1,
                           "start": 1.0, "end": 4.0, "by": 1.0, "batch": 2, "data": {},
                           "cpus": 1, "environ": {"X": "y"}, "parents": [{"id": 43}]}
    known.discard("blender")
    calls.clear()
    with pytest.raises(JobFileError) as err:
        asyncio.run(submit(jf, master))
    assert str(err.value) == ("m.yaml:4: job 'a': jobtype: the master has no job type "
                              "'blender' version 1")
    assert all(m == "GET" for m, _p, _b in calls)  # nothing was created
    known.update({"blender", "refuse"})
    calls.clear()
    with pytest.raises(MasterRefused) as refused_err:
        asyncio.run(submit(jf, master))
    assert refused_err.value.created == {"a": 43}
    assert "m.yaml:2: the master refused job 'b': 400" in str(refused_err.value)


def test_an_alias_bomb_is_refused_before_anything_expands_it() -> None:
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    text = "jobs:\n  - id: a\n    jobtype: command\n    start: 1\n    end: 1\n    data:\n"
    text += "".join(f"      {level}\n" for level in levels)
    err = refused(text)
    assert "more than 1000000 values with its aliases expanded" in str(err)
