"""PyFarm job types, as a PyFarm master stores them, run through the in-scope host unchanged.

Each source below is written the way PyFarm's documentation tells job type authors to write
them (``from pyfarm.jobtypes.core.jobtype import JobType``, ``self.COMMAND_DATA(...)``, the
``*_stdout_line`` hooks, ``set_task_progress``/``set_task_state`` with task dicts). The host
runs as a subprocess exactly as the agent starts it (the RemoteJobType's command line); its
records go through the agent-side decoder, and the reason the master would get is what
``failure_reason`` says.
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from farmnode.jobtypes.base import ExitStatus, Stream
from farmnode.jobtypes.remote import MARK, cache_store, remote_jobtype_class
from farmnode.tasks.model import TaskState
from farmnode.tasks.schema import parse_assignment

# The documented example of get_command_data (pyfarm.agent docs, JobType.get_command_data),
# with a Python 3 command and the job's own user in place of "bob".
HELLO = '''
from pyfarm.jobtypes.core.jobtype import JobType


class PythonHelloWorld(JobType):
    def get_command_data(self):
        data = self.assignment["job"]["data"]
        scratch = self.tempdir()
        return self.COMMAND_DATA(
            data["python"], "-c",
            "import os; print('hello world', os.environ['FOO'], os.getcwd()); "
            "print(os.environ['GREETING'])",
            env=dict(self.get_environment(), FOO="bar",
                     GREETING=self.expandvars("$FOO_FROM_JOB and ${HOME}")),
            cwd=scratch, user=data["user"])
'''

# A renderer wrapper: progress and per-frame states from the output, formatted log lines,
# node() facts and get_command_list, PyFarm's WorkState and logger.
RENDER = r'''
import re
import sys

from pyfarm.core.enums import WorkState
from pyfarm.jobtypes.core.jobtype import JobType
from pyfarm.agent.logger import getLogger

logger = getLogger("jobtypes.render")
FRAME = re.compile(r"^frame (\d+): (\d+)%$")


class FakeRender(JobType):
    def get_command_data(self):
        frames = [str(int(t["frame"])) for t in self.assignment["tasks"]]
        script = (
            "import sys\n"
            "for f in sys.argv[1:]:\n"
            "    for p in (0, 50, 100):\n"
            "        print('frame %s: %d%%' % (f, p), flush=True)\n"
            "    print('warning on ' + f, file=sys.stderr, flush=True)\n"
            "print('no newline at the end', end='')\n"
        )
        node = self.node()
        logger.info("rendering on %s with %s cpus", node["hostname"], node["cpus"])
        command = self.get_command_list([sys.executable, "-c", script] + frames)
        return self.COMMAND_DATA(command[0], *command[1:])

    def preprocess_stdout_line(self, protocol, stdout):
        return stdout.strip()

    def format_stdout_line(self, protocol, stdout):
        return "[render pid %s] %s" % (protocol.pid, stdout)

    def format_stderr_line(self, protocol, stderr):
        return "[render] " + stderr.upper()

    def process_stdout_line(self, protocol, stdout):
        match = FRAME.search(stdout.split("] ", 1)[-1])
        if not match:
            return
        frame, percent = int(match.group(1)), int(match.group(2))
        for task in self.assignment["tasks"]:
            if int(task["frame"]) == frame:
                self.set_task_progress(task, percent / 100.0)
                if percent == 100:
                    self.set_task_state(task, WorkState.DONE)

    def process_stderr_line(self, protocol, stderr):
        pass

    def is_successful(self, reason):
        return reason == 0 and len(self.finished_tasks) == len(self.assignment["tasks"])
'''

# Python 2 only: PyFarm's own job types were Python 2.
PY2 = '''
from pyfarm.jobtypes.core.jobtype import JobType


class Old(JobType):
    def get_command_data(self):
        print "building the command"
        return self.COMMAND_DATA("/bin/true")
'''

RAISES = '''
from pyfarm.jobtypes.core.jobtype import JobType


class Picky(JobType):
    def get_command_data(self):
        scene = self.assignment["job"]["data"].get("scene")
        if scene is None:
            raise ValueError("job data has no 'scene'")
        return self.COMMAND_DATA("/bin/true", scene)
'''


@dataclass
class Recorder:
    events: list[tuple[str, int, Any, Any]] = field(default_factory=list)

    def set_task_state(self, task_id: int, state: TaskState, reason: str | None = None) -> None:
        self.events.append(("state", task_id, state, reason))

    def set_task_progress(self, task_id: int, progress: float) -> None:
        self.events.append(("progress", task_id, progress, None))


@dataclass
class Run:
    rc: int
    logged: list[tuple[int, str, int]]  # (stream, text, priority) as the agent journals them
    reason: str | None  # the failure reason the master would get; None: success
    events: list[tuple[str, int, Any, Any]]
    stdout: str
    stderr: str


def run(tmp_path: Path, name: str, classname: str, code: str,
        data: dict[str, Any] | None = None, frames: tuple[int, ...] = (1,),
        environ: dict[str, str] | None = None) -> Run:
    path = cache_store(tmp_path / "cache", name, 1, classname, code)
    me = pwd.getpwuid(os.getuid()).pw_name
    a = parse_assignment({"job": {"id": 7, "by": 1, "data": data or {}, "user": me,
                                  "environ": environ or {}},
                          "jobtype": {"name": name, "version": 1},
                          "tasks": [{"id": 100 + f, "frame": f} for f in frames]}, "a-7")
    rec = Recorder()
    jt = remote_jobtype_class(path, classname)(a, rec)
    jt.node = {"hostname": "node1.farm.example", "cpus": 4, "master_api": "http://m/api/v1"}
    cmd = jt.get_command_data()
    proc = subprocess.run([cmd.command, *cmd.arguments], capture_output=True, text=True,
                          timeout=60, env=cmd.env)
    logged: list[tuple[int, str, int]] = []
    # Lines as the agent splits them (on newlines only: str.splitlines also splits on \x1e).
    for stream, text in ((Stream.STDOUT, proc.stdout), (Stream.STDERR, proc.stderr)):
        for line in text.rstrip("\n").split("\n") if text else []:
            out = jt.handle_line(stream, line)
            if out is not None:
                logged.append((int(stream), out, jt.line_priority(stream, line)))
    status = ExitStatus.from_returncode(proc.returncode)
    reason = None if jt.is_successful(status) else jt.failure_reason(status)
    return Run(proc.returncode, logged, reason, rec.events, proc.stdout, proc.stderr)


def test_the_documented_example_runs_with_the_jobs_environment(tmp_path: Path) -> None:
    me = pwd.getpwuid(os.getuid()).pw_name
    r = run(tmp_path, "hello", "PythonHelloWorld", HELLO,
            data={"python": sys.executable, "user": me}, environ={"FOO_FROM_JOB": "from job"})
    assert r.rc == 0 and r.reason is None, (r.stdout, r.stderr)
    lines = [text for stream, text, _ in r.logged if stream == 0]
    assert len(lines) == 2, r.logged
    hello, cwd = lines[0].rsplit(" ", 1)
    assert hello == "hello world bar"
    # the documented tempdir(): created for the job type, removed when it has finished
    assert Path(cwd).name.startswith("farmnode-jobtype-") and not Path(cwd).exists()
    assert lines[1] == f"from job and {pwd.getpwnam(me).pw_dir}"


def test_hooks_progress_states_and_node_facts(tmp_path: Path) -> None:
    r = run(tmp_path, "fakerender", "FakeRender", RENDER, frames=(1, 2))
    assert r.rc == 0 and r.reason is None, (r.stdout, r.stderr)
    out = [text for stream, text, _ in r.logged if stream == 0]
    # format_stdout_line saw the preprocessed line and the protocol's pid
    assert all(line.startswith("[render pid ") for line in out), out
    pids = {line.split()[2].rstrip("]") for line in out}
    assert len(pids) == 1 and pids.pop().isdigit()
    assert [line.split("] ", 1)[1] for line in out] == [
        "frame 1: 0%", "frame 1: 50%", "frame 1: 100%",
        "frame 2: 0%", "frame 2: 50%", "frame 2: 100%", "no newline at the end"]
    err = [(text, prio) for stream, text, prio in r.logged if stream == 1]
    # getLogger's record comes first, as an info line; stderr lines are formatted warnings
    assert err[0] == ("jobtypes.render: rendering on node1.farm.example with 4 cpus", 6)
    assert err[1:] == [("[render] WARNING ON 1", 4), ("[render] WARNING ON 2", 4)]
    assert [e for e in r.events if e[1] == 101] == [
        ("progress", 101, 0.0, None), ("progress", 101, 0.5, None),
        ("progress", 101, 1.0, None), ("state", 101, TaskState.DONE, None)]
    assert ("state", 102, TaskState.DONE, None) in r.events


def test_python2_source_fails_with_file_and_line(tmp_path: Path) -> None:
    r = run(tmp_path, "old", "Old", PY2)
    assert r.rc != 0
    path = next((tmp_path / "cache" / "old" / "1").glob("*.py"))
    line = PY2.split("\n").index('        print "building the command"') + 1
    assert r.reason is not None
    assert r.reason.startswith(f"job type 'old' v1 is not valid Python 3: {path}, line {line}: ")
    assert "Missing parentheses in call to 'print'" in r.reason
    # the task's log has the compiler's own account, and the reason as an error line
    assert "SyntaxError" in r.stderr
    assert (0, f"job type failed: {r.reason}", 3) in r.logged
    assert not [e for e in r.events if e[0] == "state"]  # the agent fails the tasks


def test_an_exception_in_get_command_data_reaches_the_master(tmp_path: Path) -> None:
    r = run(tmp_path, "picky", "Picky", RAISES)
    path = next((tmp_path / "cache" / "picky" / "1").glob("*.py"))
    line = next(i for i, text in enumerate(RAISES.split("\n"), 1) if "raise ValueError" in text)
    assert r.rc == 1
    assert r.reason == (f"job type 'picky' v1: ValueError: job data has no 'scene' "
                        f"(in get_command_data, {path}, line {line})")
    assert "Traceback (most recent call last)" in r.stderr
    # with the data it wants, the same job type runs
    assert run(tmp_path, "picky", "Picky", RAISES, data={"scene": "x"}).reason is None


def test_a_nonzero_exit_and_other_refusals_say_why(tmp_path: Path) -> None:
    exits = '''
from pyfarm.jobtypes.core.jobtype import JobType

class Exits(JobType):
    def get_command_data(self):
        return self.COMMAND_DATA("/bin/sh", "-c", "exit 3")
'''
    r = run(tmp_path, "exits", "Exits", exits)
    assert (r.rc, r.reason) == (3, "exit code 3")
    other_user = exits.replace('"/bin/sh", "-c", "exit 3"', '"/bin/true", user="nobody"')
    r = run(tmp_path, "other", "Exits", other_user)
    assert r.reason is not None and "CommandData user 'nobody' is not the job's user" in r.reason
    missing = "from pyfarm.agent.sysinfo import cpu\n" + exits
    r = run(tmp_path, "missing", "Exits", missing)
    assert r.reason is not None
    assert "ModuleNotFoundError: No module named 'pyfarm.agent.sysinfo'" in r.reason
    assert ", line 1)" in r.reason and "pyfarm.jobtypes.core.jobtype" in r.reason
    r = run(tmp_path, "noclass", "Missing", exits)
    assert r.reason == ("job type 'noclass' v1: "
                        f"{next((tmp_path / 'cache' / 'noclass' / '1').glob('*.py'))} defines "
                        "no class 'Missing' (the master's classname; classes there: Exits)")


def test_a_failed_line_hook_loses_that_line_only(tmp_path: Path) -> None:
    code = '''
from pyfarm.jobtypes.core.jobtype import JobType

class Fragile(JobType):
    def get_command_data(self):
        return self.COMMAND_DATA("/bin/sh", "-c", "echo one; echo two")

    def process_stdout_line(self, protocol, stdout):
        if stdout == "one":
            raise KeyError("boom")
'''
    r = run(tmp_path, "fragile", "Fragile", code)
    assert r.rc == 0 and r.reason is None
    assert [t for s, t, _ in r.logged if s == 0] == ["one", "two"]
    assert [t for s, t, _ in r.logged if s == 1] == [
        "job type line hook failed: KeyError: 'boom' (line: 'one')"]


def test_records_stay_below_the_agents_line_limit(tmp_path: Path) -> None:
    code = '''
from pyfarm.jobtypes.core.jobtype import JobType

class Long(JobType):
    def get_command_data(self):
        return self.COMMAND_DATA("/bin/sh", "-c", "head -c 40000 /dev/zero | tr '\\\\0' 'x'")
'''
    r = run(tmp_path, "long", "Long", code)
    assert r.reason is None, r.stderr
    records = [line for line in r.stdout.split("\n") if line.startswith(MARK)
               and "line" in json.loads(line[1:])]
    assert all(len(line.encode()) <= 16 * 1024 for line in records)
    assert "".join(t for s, t, _ in r.logged if s == 0) == "x" * 40000
    assert all(json.loads(line[1:])["line"].strip("x") == "" for line in records)


# ---- the agent's side: finding the job type, and the reason at the end ----------------------

def agent_run(tmp_path: Path, name: str, **settings: Any) -> tuple[Any, list[tuple[Any, ...]]]:
    import dataclasses

    from farmnode.agent.runner import AssignmentRun
    from farmnode.config import Config

    a = parse_assignment({"job": {"id": 7, "by": 1}, "jobtype": {"name": name, "version": 2},
                          "tasks": [{"id": 5, "frame": 1}]}, "a-9")
    config = dataclasses.replace(Config(), agent_runtime_dir=str(tmp_path),
                                 jobtype_cache_directory=str(tmp_path / "cache"), **settings)
    reports: list[tuple[Any, ...]] = []
    run = AssignmentRun(a, config, None,  # type: ignore[arg-type]
                        lambda _a, changes: reports.extend(
                            (c.task_id, c.state, c.reason) for c in changes),
                        lambda *_: None, lambda *_: None)
    return run, reports


def test_downloads_are_on_by_default() -> None:
    from farmnode.config import Config

    assert Config().jobtype_enable_download is True


def test_an_unknown_job_type_says_why_it_was_not_found(tmp_path: Path) -> None:
    import asyncio

    run, reports = agent_run(tmp_path, "maya")

    async def refused(name: str, version: int) -> str:
        return f"the master did not serve it (GET /jobtypes/{name}/versions/{version}: 404)"

    run.fetch_jobtype = refused
    asyncio.run(run._start())
    ((task, state, reason),) = reports
    assert (task, state) == (5, TaskState.FAILED)
    assert reason.startswith("job type 'maya': unknown job type 'maya' (version 2), none "
                             "installed or downloaded: the master did not serve it (GET "
                             "/jobtypes/maya/versions/2: 404)")
    run, reports = agent_run(tmp_path, "maya", jobtype_enable_download=False)
    run.fetch_jobtype = refused
    asyncio.run(run._start())
    assert "downloading job types from the master is off (jobtype_enable_download)" in \
        reports[0][2]


def test_the_hosts_reason_is_the_tasks_reason(tmp_path: Path) -> None:
    cache_store(tmp_path / "cache", "maya", 2, "Maya", RAISES)
    run, reports = agent_run(tmp_path, "maya")
    jt = run._load_jobtype()
    assert jt.node == {}  # no facts source here; the core hands them in
    jt.handle_line(Stream.STDOUT, MARK + json.dumps({"error": "job type 'maya' v2: ValueError"}))
    run._conclude({"exit_code": 1})
    assert reports == [(5, TaskState.FAILED, "job type 'maya' v2: ValueError")]


class FakeLink:
    def __init__(self, answer: dict[str, Any] | str) -> None:
        self.answer = answer

    async def fetch_jobtype(self, name: str, version: int) -> dict[str, Any] | str:
        return self.answer


def test_the_core_caches_what_the_master_serves(tmp_path: Path) -> None:
    import asyncio
    import dataclasses

    from farmnode.agent.core import Agent
    from farmnode.config import Config
    from farmnode.jobtypes.remote import cache_latest
    from farmnode.tasks.store import Store

    config = dataclasses.replace(Config(), jobtype_cache_directory=str(tmp_path / "cache"))
    agent = Agent(config, Store(tmp_path / "db"), scopes=None)  # type: ignore[arg-type]
    # the master's record as GET /jobtypes/<name>/versions/<v> sends it; PyFarm's master may
    # hold no classname, and then the job type's name is the class
    agent.master_link = FakeLink({"name": "Picky", "version": 1, "classname": None,  # type: ignore[assignment]
                                  "code": RAISES, "max_batch": 1, "batch_contiguous": True,
                                  "software_requirements": []})
    assert asyncio.run(agent._fetch_jobtype("Picky", 1)) is None
    hit = cache_latest(tmp_path / "cache", "Picky", 1)
    assert hit is not None and hit[1] == "Picky" and hit[0].read_text() == RAISES
    agent.master_link = FakeLink("GET /jobtypes/Nope/versions/1: 404 not found")  # type: ignore[assignment]
    assert asyncio.run(agent._fetch_jobtype("Nope", 1)) == (
        "the master did not serve it (GET /jobtypes/Nope/versions/1: 404 not found)")
    agent.master_link = FakeLink({"name": "Empty", "version": 1})  # type: ignore[assignment]
    assert asyncio.run(agent._fetch_jobtype("Empty", 1)) == "the master's record of it has no code"
    facts = agent.node_facts()
    assert facts["id"] == agent.agent_id and facts["cpus"] >= 1 and facts["ram"] >= 1


def test_is_successful_takes_what_pyfarm_passed() -> None:
    from farmnode.jobtypes.pyfarm.jobtypes.core.jobtype import ExitReason, JobType

    jt = JobType({"job": {"id": 1}, "jobtype": {"name": "x", "version": 1}, "tasks": []})
    assert jt.is_successful(ExitReason(0)) and not jt.is_successful(ExitReason(2))
    killed = ExitReason(-9)
    assert not jt.is_successful(killed) and (killed.exitCode, killed.signal) == (None, 9)
    assert killed.describe() == "killed by signal SIGKILL"
    assert jt.is_successful(0) and not jt.is_successful(1)

    class Terminated:  # a Twisted ProcessTerminated, inside a Failure
        exitCode = 0

    class Wrapped:
        value = Terminated()

    assert jt.is_successful(Wrapped())


def test_a_huge_reason_still_reaches_the_agent(tmp_path: Path) -> None:
    code = RAISES.replace("\"job data has no 'scene'\"", "'x' * 100000")
    r = run(tmp_path, "huge", "Picky", code)
    assert r.reason is not None and r.reason.startswith("job type 'huge' v1: ValueError: xxx")
    assert r.reason.endswith(" [...]") and len(r.reason) < 5000


def test_the_helpers_behave_as_documented(monkeypatch: Any) -> None:
    import pytest

    from farmnode.jobtypes import pyfarm
    from farmnode.jobtypes.pyfarm.jobtypes.core import jobtype as pf
    from farmnode.jobtypes.pyfarm.jobtypes.core.process import ReplaceEnvironment

    events: list[tuple[Any, ...]] = []

    class Sink:
        def line(self, stream: int, text: str, priority: int) -> None:
            events.append(("line", stream, text, priority))

        def state(self, task_id: int, state: str, reason: str | None) -> None:
            events.append(("state", task_id, state, reason))

        def progress(self, task_id: int, progress: float) -> None:
            events.append(("progress", task_id, progress))

    monkeypatch.setattr(pf, "_sink", Sink())
    monkeypatch.setitem(pf._node, "hostname", "n1")
    monkeypatch.setattr(os, "environ", {"HOME": "/home/j", "SHOT": "010", "PATH": "/bin"})
    task = {"id": 3, "frame": 1.0}
    jt = pf.JobType({"job": {"id": 1, "data": {}}, "jobtype": {"name": "x", "version": 1},
                     "tasks": [task]})
    assert jt.expandvars("$SHOT/${SHOT}/$NOPE") == "010/010/$NOPE"
    assert jt.expandvars("$SHOT", {"SHOT": "020"}) == "020"
    assert jt.expandvars("$SHOT", expand=False) == "$SHOT"
    assert jt.map_path("~/shots/$SHOT") == "/home/j/shots/010"
    assert jt.get_command_list(["render", 1, "$SHOT"]) == ("render", "1", "010")
    assert jt.node()["hostname"] == "n1" and jt.node()["operating_system"] == "linux"
    assert jt.assignments() == [task]
    cmd = jt.COMMAND_DATA("/bin/echo", 1, 2.5, cwd="/tmp")
    cmd.validate()
    assert cmd.arguments == ("1", "2.5")
    cmd.set_default_environment({"A": "1"})
    cmd.set_default_environment({"B": "2"})
    assert cmd.env == {"A": "1"}
    with pytest.raises(ValueError, match="unexpected keyword"):
        jt.COMMAND_DATA("/bin/echo", shell=True)
    with pytest.raises(TypeError, match="argument 0"):
        jt.COMMAND_DATA("/bin/echo", None).validate()
    jt.set_task_progress(task, 1.5)
    jt.set_task_state(task, "FAILED", error=RuntimeError("disk full"))
    assert jt.failed_tasks == {3} and jt.get_local_task_state(3) == "failed"
    with pytest.raises(pf.JobTypeError, match="task 4 is not part"):
        jt.set_task_state({"id": 4}, "done")
    with pytest.raises(pf.JobTypeError, match="task state 'paused'"):
        jt.set_task_state(task, "paused")
    assert events == [("progress", 3, 1.0), ("state", 3, "failed", "RuntimeError: disk full")]
    env: dict[str, str] = {"KEEP": "1"}
    with ReplaceEnvironment({"ONLY": "2"}, env):
        assert env == {"ONLY": "2"}
    assert env == {"KEEP": "1"}
    import importlib

    for name in pyfarm.provided():
        monkeypatch.delitem(sys.modules, name, raising=False)
    pyfarm.install()
    assert importlib.import_module("pyfarm.jobtypes.core.jobtype") is pf
    assert importlib.import_module("pyfarm.core.enums").WorkState.DONE == "done"
