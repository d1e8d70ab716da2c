"""Job types: registry, command templating, fakerender (run for real), Blender output parsing."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import pytest

from farmnode.jobtypes import fakerender as fakerender_mod
from farmnode.jobtypes import registry
from farmnode.jobtypes.base import (
    PRIORITY_ERR,
    PRIORITY_INFO,
    PRIORITY_WARNING,
    CommandData,
    ExitStatus,
    JobType,
    Stream,
    format_frame,
)
from farmnode.jobtypes.blender import BlenderJobType
from farmnode.jobtypes.command import CommandJobType
from farmnode.jobtypes.fakerender import FakeRenderJobType
from farmnode.tasks.model import Assignment, Job, JobTypeRef, Task, TaskState

DATA = Path(__file__).parent / "data"


# -- helpers ------------------------------------------------------------------------------------


class Recorder:
    """A TaskReporter that remembers every call."""

    def __init__(self) -> None:
        self.states: list[tuple[int, TaskState, str | None]] = []
        self.progress: list[tuple[int, float]] = []

    def set_task_state(self, task_id: int, state: TaskState, reason: str | None = None) -> None:
        self.states.append((task_id, state, reason))

    def set_task_progress(self, task_id: int, progress: float) -> None:
        self.progress.append((task_id, progress))

    def final_state(self, task_id: int) -> TaskState | None:
        found = [s for t, s, _ in self.states if t == task_id]
        return found[-1] if found else None

    def progress_of(self, task_id: int) -> list[float]:
        return [p for t, p in self.progress if t == task_id]


def assignment(
    frames: list[float],
    *,
    jobtype: str = "command",
    data: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
    by: float = 1.0,
    tiles: int | None = None,
    cpus: float | None = None,
) -> Assignment:
    tasks: list[Task] = []
    for i, frame in enumerate(frames):
        if tiles is None:
            tasks.append(Task(id=100 + i, frame=frame))
        else:
            tasks += [Task(id=100 + i * tiles + t, frame=frame, tile=t) for t in range(tiles)]
    job = Job(id=7, by=by, data=data or {}, environ=environ or {}, cpus=cpus)
    return Assignment(
        id="3b0c4f0e-0000-4000-8000-000000000001",
        job=job,
        jobtype=JobTypeRef(name=jobtype, version=1),
        tasks=tuple(tasks),
    )


def feed(jt: JobType, stream: Stream, text: str) -> list[str]:
    logged = []
    for line in text.splitlines():
        out = jt.handle_line(stream, line)
        if out is not None:
            logged.append(out)
    return logged


def run(cmd: CommandData, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(cmd.argv),
        env=cmd.env,
        cwd=cmd.cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# -- base ---------------------------------------------------------------------------------------


def test_format_frame() -> None:
    assert format_frame(1.0) == "1"
    assert format_frame(-3.0) == "-3"
    assert format_frame(1.5) == "1.5"


def test_command_data_validation() -> None:
    cd = CommandData("prog", ("a", "b"), env={"K": "V"})
    assert cd.argv == ("prog", "a", "b")
    with pytest.raises(ValueError, match="non-empty"):
        CommandData("")
    with pytest.raises(ValueError, match="NUL"):
        CommandData("prog", ("a\0b",))
    with pytest.raises(ValueError, match="NUL"):
        CommandData("prog", env={"K": "V\0"})
    with pytest.raises(ValueError, match="NUL"):
        CommandData("prog", cwd="/tmp\0x")
    with pytest.raises(ValueError, match="'='"):
        CommandData("prog", env={"A=B": "V"})
    # A list is an easy slip; it is coerced so the instance stays immutable.
    assert CommandData("prog", ["x"]).arguments == ("x",)  # type: ignore[arg-type]


def test_exit_status() -> None:
    assert ExitStatus(code=0).describe() == "success"
    assert ExitStatus(code=3).describe() == "exit code 3"
    assert ExitStatus(signal=signal.SIGSEGV).describe() == "killed by signal SIGSEGV"
    assert ExitStatus.from_returncode(-9).describe() == "killed by signal SIGKILL"
    assert ExitStatus.from_returncode(2) == ExitStatus(code=2)
    with pytest.raises(ValueError):
        ExitStatus()
    with pytest.raises(ValueError):
        ExitStatus(code=1, signal=9)


def test_stream_numbering() -> None:
    assert int(Stream.STDOUT) == 0
    assert int(Stream.STDERR) == 1


def test_default_environment_and_job_environ_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENT_SECRET", "must-not-leak")
    a = assignment([1, 2, 3], data={"command": ["true"]}, environ={"LANG": "de_DE.UTF-8"})
    cmd = CommandJobType(a, Recorder()).get_command_data()
    assert cmd.env["PATH"] == "/usr/local/bin:/usr/bin:/bin"
    assert cmd.env["LANG"] == "de_DE.UTF-8"
    assert cmd.env["FARMNODE_JOB"] == "7"
    assert cmd.env["FARMNODE_ASSIGNMENT"] == a.id
    assert cmd.env["FARMNODE_FRAMES"] == "1 2 3"
    assert "AGENT_SECRET" not in cmd.env
    assert cmd.user is None


def test_default_user_sets_home() -> None:
    a = assignment([1], data={"command": ["true"]})
    cmd = CommandJobType(a, Recorder(), default_user="root").get_command_data()
    assert cmd.user == "root"
    assert cmd.env["HOME"] == "/root"
    assert cmd.env["USER"] == "root"


def test_expandvars_and_map_path() -> None:
    a = assignment([1], environ={"ROOT": "/srv/proj", "HOME": "/home/artist"})
    jt = CommandJobType(a, Recorder())
    assert jt.expandvars("$ROOT/a") == "/srv/proj/a"
    assert jt.expandvars("${ROOT}x") == "/srv/projx"
    assert jt.expandvars("$FARMNODE_JOB") == "7"
    assert jt.expandvars("$NOPE/a") == "$NOPE/a"  # unknown stays, like os.path.expandvars
    # The given environment comes first, then the job's.
    assert jt.expandvars("$ROOT", {"ROOT": "/mnt"}) == "/mnt"
    assert jt.map_path("~/scenes/$ROOT") == "/home/artist/scenes//srv/proj"
    assert jt.map_path("$ROOT/shot.blend") == "/srv/proj/shot.blend"

    off = CommandJobType(a, Recorder(), expandvars=False)
    assert off.expandvars("$ROOT/a") == "$ROOT/a"
    assert off.map_path("$ROOT/a") == "$ROOT/a"


def test_frame_helpers() -> None:
    jt = CommandJobType(assignment([5, 1, 3], tiles=2), Recorder())
    assert (jt.start, jt.end, jt.by) == (1, 5, 2)
    assert [t.tile for t in jt.tasks_for_frame(3.0)] == [0, 1]
    assert jt.tasks_for_frame(2) == []
    holes = CommandJobType(assignment([1, 2, 4]), Recorder())
    assert not holes.is_evenly_spaced
    with pytest.raises(ValueError, match="not evenly spaced"):
        _ = holes.by
    single = CommandJobType(assignment([4], by=5), Recorder())
    assert single.by == 5


def test_task_reporting_checks_clamps_and_dedupes() -> None:
    rec = Recorder()
    jt = CommandJobType(assignment([1, 2]), rec)
    with pytest.raises(ValueError, match="not part of assignment"):
        jt.set_task_state(999, TaskState.RUNNING)
    with pytest.raises(ValueError, match="not part of assignment"):
        jt.set_task_progress(999, 0.5)
    jt.set_task_state(100, TaskState.RUNNING)
    jt.set_task_state(100, TaskState.RUNNING)
    jt.set_task_progress(100, 1.7)
    jt.set_task_progress(100, 1.0)
    jt.set_task_progress(101, -3)
    jt.set_task_state(100, TaskState.DONE, "saved")
    jt.set_task_progress(100, 0.3)  # late output must not move a finished task
    assert rec.states == [(100, TaskState.RUNNING, None), (100, TaskState.DONE, "saved")]
    assert rec.progress == [(100, 1.0), (101, 0.0)]
    assert jt.task_states == {100: TaskState.DONE}
    with pytest.raises(ValueError, match="NaN"):
        jt.set_task_progress(101, float("nan"))


class _Custom(JobType):
    name = "custom"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[str] = []

    def get_command_data(self) -> CommandData:
        return self.make_command_data("true", [])

    def preprocess_stdout_line(self, line: str) -> str | None:
        return None if line.startswith("noise") else line.strip()

    def process_stdout_line(self, line: str) -> None:
        self.seen.append(line)

    def format_stdout_line(self, line: str) -> str:
        return f"[out] {line}"


def test_handle_line_pipeline() -> None:
    jt = _Custom(assignment([1]), Recorder())
    assert jt.handle_line(Stream.STDOUT, "noise 1") is None
    assert jt.handle_line(Stream.STDOUT, "  hello ") == "[out] hello"
    # stderr defaults to processing like stdout (PyFarm) without stdout's formatting
    assert jt.handle_line(Stream.STDERR, "oops") == "oops"
    assert jt.seen == ["hello", "oops"]  # processing sees the preprocessed, unformatted line
    assert jt.line_priority(Stream.STDOUT, "x") == PRIORITY_INFO
    assert jt.line_priority(Stream.STDERR, "x") == PRIORITY_WARNING
    assert jt.stop_signal == signal.SIGTERM
    assert jt.is_successful(ExitStatus(code=0))
    assert not jt.is_successful(ExitStatus(signal=9))


def test_assignment_without_tasks_is_refused() -> None:
    a = assignment([1])
    empty = Assignment(id=a.id, job=a.job, jobtype=a.jobtype, tasks=())
    with pytest.raises(ValueError, match="no tasks"):
        CommandJobType(empty, Recorder())


# -- registry -----------------------------------------------------------------------------------


def test_registry_finds_all_three() -> None:
    assert {"command", "fakerender", "blender"} <= set(registry.available_jobtypes())
    assert registry.load_jobtype("command", 1) is CommandJobType
    assert registry.load_jobtype("fakerender", 1) is FakeRenderJobType
    assert registry.load_jobtype("blender", 3) is BlenderJobType
    for name in ("command", "fakerender", "blender"):
        assert registry.load_jobtype(name, 1).name == name


def test_registry_unknown_name() -> None:
    with pytest.raises(registry.UnknownJobType) as info:
        registry.load_jobtype("maya", 1)
    assert isinstance(info.value, LookupError)
    message = str(info.value)
    assert "'maya'" in message
    assert "blender" in message and "command" in message and "fakerender" in message


def test_registry_refuses_non_jobtype(monkeypatch: pytest.MonkeyPatch) -> None:
    bogus = [
        EntryPoint(name="notaclass", value="os.path:join", group=registry.GROUP),
        EntryPoint(name="abstract", value="farmnode.jobtypes.base:JobType", group=registry.GROUP),
        EntryPoint(name="broken", value="farmnode.no_such_module:X", group=registry.GROUP),
    ]
    monkeypatch.setattr(registry, "entry_points", lambda group: bogus)
    with pytest.raises(registry.JobTypeLoadError, match="not a subclass"):
        registry.load_jobtype("notaclass", 1)
    with pytest.raises(registry.JobTypeLoadError, match="abstract"):
        registry.load_jobtype("abstract", 1)
    with pytest.raises(registry.JobTypeLoadError, match="failed to load"):
        registry.load_jobtype("broken", 1)


def test_registry_supported_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(CommandJobType, "supported_versions", frozenset({1, 2}))
    assert registry.load_jobtype("command", 2) is CommandJobType
    with pytest.raises(registry.UnknownJobType, match="does not support version 3"):
        registry.load_jobtype("command", 3)


# -- command ------------------------------------------------------------------------------------


def _command(argv: list[str], frames: list[float] | None = None, **kw: Any) -> CommandData:
    data = {"command": argv, **kw}
    return CommandJobType(assignment(frames or [12], data=data), Recorder()).get_command_data()


def test_command_templating() -> None:
    cmd = _command(["render", "{frame}", "f{frame:04d}", "--job={job}", "{assignment}", "{{x}}"])
    assert cmd.argv == (
        "render",
        "12",
        "f0012",
        "--job=7",
        "3b0c4f0e-0000-4000-8000-000000000001",
        "{x}",
    )
    batch = _command(["r", "-s", "{start}", "-e", "{end}", "-b", "{by}"], frames=[1, 3, 5])
    assert batch.arguments == ("-s", "1", "-e", "5", "-b", "2")
    frac = _command(["r", "{frame}", "{frame:.2f}"], frames=[1.5])
    assert frac.arguments == ("1.5", "1.50")
    a = assignment([3], tiles=1, data={"command": ["r", "tile{tile}"]})
    assert CommandJobType(a, Recorder()).get_command_data().arguments == ("tile0",)


@pytest.mark.parametrize(
    ("arg", "needle"),
    [
        ("{frame.__class__}", "{frame.__class__}"),
        ("{frame.__class__.__mro__}", "{frame.__class__.__mro__}"),
        ("{frame[0]}", "{frame[0]}"),
        ("{0}", "{0}"),
        ("{}", "{}"),
        ("{frame!r}", "{frame!r}"),
        ("{frame:{start}}", "{frame:{start}}"),
        ("{frame:999999999d}", "{frame:999999999d}"),
        ("{nope}", "{nope}"),
        ("{frame", "job.data.command[1]"),
        ("}", "job.data.command[1]"),
    ],
)
def test_command_refuses_format_tricks(arg: str, needle: str) -> None:
    with pytest.raises(ValueError) as info:
        _command(["prog", arg])
    assert needle in str(info.value)
    assert "job.data.command[1]" in str(info.value)


def test_command_frame_needs_one_frame_and_tile_needs_tiles() -> None:
    with pytest.raises(ValueError, match=r"\{frame\} needs an assignment of one frame"):
        _command(["r", "{frame}"], frames=[1, 2])
    with pytest.raises(ValueError, match=r"\{tile\}"):
        _command(["r", "{tile}"])
    with pytest.raises(ValueError, match="not evenly spaced"):
        _command(["r", "{by}"], frames=[1, 2, 4])


def test_command_no_shell_env_cwd_and_expansion() -> None:
    cmd = _command(
        ["$TOOLS/render", "$(rm -rf /)", "a;b", "$SCENE/{frame}.blend"],
        cwd="$SCENE",
        env={"SCENE": "/srv/s", "TOOLS": "/opt/tools"},
    )
    # Variables from job.data.env expand (they sit over the job env); shell syntax is inert.
    assert cmd.argv == ("/opt/tools/render", "$(rm -rf /)", "a;b", "/srv/s/12.blend")
    assert cmd.cwd == "/srv/s"
    assert cmd.env["SCENE"] == "/srv/s"


def test_command_data_validation_messages() -> None:
    bad: list[tuple[dict[str, Any], str]] = [
        ({}, "job.data.command is required"),
        ({"command": "echo hi"}, "job.data.command must be a list"),
        ({"command": []}, "job.data.command must start"),
        ({"command": ["x", 3]}, "job.data.command must be a list of strings"),
        ({"command": ["x"], "cwd": 5}, "job.data.cwd"),
        ({"command": ["x"], "env": {"A": 1}}, "job.data.env"),
        ({"command": ["x"], "success_codes": [True]}, "job.data.success_codes"),
        ({"command": ["x"], "success_codes": []}, "job.data.success_codes"),
        ({"command": ["x"], "shell": True}, "job.data.shell"),
        ({"command": ["x\0"]}, "NUL"),
    ]
    for data, needle in bad:
        with pytest.raises(ValueError) as info:
            CommandJobType(assignment([1], data=data), Recorder()).get_command_data()
        assert needle in str(info.value), (data, str(info.value))


def test_command_success_codes() -> None:
    jt = CommandJobType(
        assignment([1], data={"command": ["x"], "success_codes": [0, 2]}), Recorder()
    )
    assert jt.is_successful(ExitStatus(code=2))
    assert not jt.is_successful(ExitStatus(code=1))
    assert not jt.is_successful(ExitStatus(signal=signal.SIGTERM))


def test_command_runs_for_real() -> None:
    a = assignment(
        [4],
        data={
            "command": [
                sys.executable,
                "-c",
                "import os,sys; print(sys.argv[1], os.environ['X'])",
                "{frame}",
            ],
            "env": {"X": "y"},
        },
    )
    jt = CommandJobType(a, Recorder())
    proc = run(jt.get_command_data())
    assert proc.stdout == "4 y\n"
    assert jt.is_successful(ExitStatus.from_returncode(proc.returncode))


# -- fakerender ---------------------------------------------------------------------------------


def test_fakerender_command_line() -> None:
    data = {
        "ram": 50,
        "duration": 0.5,
        "return_code": [0, 3],
        "duration_jitter": 0.1,
        "ram_jitter": 5,
        "spew": False,
        "segfault": True,
        "lines": 5,
        "seed": 42,
        "error_lines": True,
    }
    jt = FakeRenderJobType(assignment([10, 12, 14], jobtype="fakerender", data=data), Recorder())
    cmd = jt.get_command_data()
    assert Path(cmd.command).name in ("farmnode-fakerender", Path(sys.executable).name)
    args = list(cmd.arguments)
    assert args[args.index("-s") : args.index("-s") + 6] == ["-s", "10", "-e", "14", "-b", "2"]
    joined = " ".join(args)
    for part in (
        "--ram 50",
        "--duration 0.5",
        "--return-code 0 --return-code 3",
        "--duration-jitter 0.1",
        "--ram-jitter 5",
        "--segfault",
        "--lines 5",
        "--seed 42",
        "--error-lines",
    ):
        assert part in joined
    assert "--spew" not in args


def test_fakerender_prefers_script_beside_interpreter(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert fakerender_mod.fakerender_command() == [
        str(Path(sys.executable).parent / "farmnode-fakerender")
    ]
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert fakerender_mod.fakerender_command() == [
        str(tmp_path / "python"),
        "-m",
        "farmnode.jobtypes.fakerender_cmd",
    ]


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"frames": 3}, "job.data.frames"),
        ({"ram": -1}, "job.data.ram"),
        ({"ram": True}, "job.data.ram"),
        ({"duration": "1"}, "job.data.duration"),
        ({"return_code": []}, "job.data.return_code"),
        ({"return_code": 300}, "job.data.return_code"),
        ({"spew": 1}, "job.data.spew"),
        ({"seed": 1.5}, "job.data.seed"),
    ],
)
def test_fakerender_bad_data(data: dict[str, Any], needle: str) -> None:
    jt = FakeRenderJobType(assignment([1], jobtype="fakerender", data=data), Recorder())
    with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
        jt.get_command_data()


def _run_fakerender(
    frames: list[float], data: dict[str, Any], tiles: int | None = None
) -> tuple[FakeRenderJobType, Recorder, subprocess.CompletedProcess[str], list[str]]:
    rec = Recorder()
    a = assignment(frames, jobtype="fakerender", data=data, tiles=tiles)
    jt = FakeRenderJobType(a, rec)
    proc = run(jt.get_command_data())
    logged = feed(jt, Stream.STDOUT, proc.stdout) + feed(jt, Stream.STDERR, proc.stderr)
    return jt, rec, proc, logged


def test_fakerender_real_run_all_done() -> None:
    jt, rec, proc, logged = _run_fakerender(
        [1, 2, 3], {"duration": 0.05, "lines": 5, "error_lines": True}
    )
    assert proc.returncode == 0, proc.stderr
    status = ExitStatus.from_returncode(proc.returncode)
    assert jt.is_successful(status)
    for task in jt.tasks:
        # DONE comes from the exit status (the agent), not from the output
        assert rec.final_state(task.id) == TaskState.RUNNING
        assert rec.progress_of(task.id) == [0.0, 0.25, 0.5, 0.75, 1.0]
    for frame in (1, 2, 3):
        assert [ln for ln in logged if ln.startswith(f"line {frame}:")] == [
            f"line {frame}:{k}" for k in range(1, 6)
        ]
    err = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert err and all(jt.line_priority(Stream.STDERR, ln) == PRIORITY_ERR for ln in err)
    warn = [ln for ln in proc.stderr.splitlines() if "warning:" in ln]
    assert warn and all(jt.line_priority(Stream.STDERR, ln) == PRIORITY_WARNING for ln in warn)
    assert jt.line_priority(Stream.STDOUT, "fakerender: frame 1 done") == PRIORITY_INFO


def test_fakerender_tiles_all_updated() -> None:
    jt, rec, proc, _ = _run_fakerender([1], {}, tiles=3)
    assert proc.returncode == 0
    assert len(jt.tasks) == 3
    assert all(rec.final_state(t.id) == TaskState.RUNNING for t in jt.tasks)
    assert all(rec.progress_of(t.id)[-1] == 1.0 for t in jt.tasks)


def test_fakerender_return_code() -> None:
    jt, _rec, proc, _ = _run_fakerender([1, 2], {"return_code": 3})
    assert proc.returncode == 3
    status = ExitStatus.from_returncode(proc.returncode)
    assert not jt.is_successful(status)
    assert status.describe() == "exit code 3"


def _seed_that_segfaults() -> int:
    # fakerender's documented draw order: the first value from Random(seed) decides the crash.
    return next(s for s in range(1000) if random.Random(s).random() < 0.25)


def test_fakerender_segfault() -> None:
    jt, rec, proc, _ = _run_fakerender(
        [1, 2, 3], {"segfault": True, "seed": _seed_that_segfaults(), "duration": 0.04}
    )
    assert proc.returncode == -signal.SIGSEGV
    status = ExitStatus.from_returncode(proc.returncode)
    assert status.describe() == "killed by signal SIGSEGV"
    assert not jt.is_successful(status)
    assert rec.final_state(100) == TaskState.RUNNING
    assert rec.progress_of(100) == [0.0, 0.25, 0.5]
    assert rec.final_state(101) is None


def test_fakerender_segfault_seed_that_does_not() -> None:
    seed = next(s for s in range(1000) if random.Random(s).random() >= 0.25)
    _, _, proc, _ = _run_fakerender([1], {"segfault": True, "seed": seed})
    assert proc.returncode == 0


def test_fakerender_really_uses_ram() -> None:
    jt = FakeRenderJobType(assignment([1], jobtype="fakerender", data={"ram": 50}), Recorder())
    cmd = jt.get_command_data()
    # A fresh interpreter whose only child is fakerender, so RUSAGE_CHILDREN's peak is its own.
    probe = (
        "import resource, subprocess, sys;"
        "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL);"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, *cmd.argv],
        env=cmd.env,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    peak_kib = int(out.stdout)
    assert peak_kib >= 50 * 1024


def test_fakerender_cli_rejects_bad_range() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "farmnode.jobtypes.fakerender_cmd", "-s", "5", "-e", "1"],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "--end" in proc.stderr


def test_fakerender_cli_spew() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "farmnode.jobtypes.fakerender_cmd",
            "-s",
            "1",
            "--spew",
            "--duration",
            "0.02",
            "--seed",
            "1",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert sum(1 for ln in proc.stdout.splitlines() if ln.startswith("spew 1:")) > 100
    assert proc.stdout.rstrip().endswith("fakerender: exiting with code 0")


# -- blender ------------------------------------------------------------------------------------


def _blender(
    frames: list[float], data: dict[str, Any] | None = None, **kw: Any
) -> tuple[BlenderJobType, Recorder]:
    rec = Recorder()
    d = {"file": "/srv/shot.blend", **(data or {})}
    return BlenderJobType(assignment(frames, jobtype="blender", data=d, **kw), rec), rec


def test_blender_command_line_order() -> None:
    jt, _ = _blender(
        [10, 12, 14],
        {
            "blender": "/opt/blender/blender",
            "output": "$OUT/f_####",
            "format": "OPEN_EXR",
            "engine": "CYCLES",
            "scene": "Shot",
            "threads": 8,
            "args": ["--factory-startup", "--", "--my-script-arg"],
        },
        environ={"OUT": "/render/out"},
    )
    cmd = jt.get_command_data()
    assert cmd.argv == (
        "/opt/blender/blender",
        "-b",
        "/srv/shot.blend",
        "-S",
        "Shot",
        "-E",
        "CYCLES",
        "-F",
        "OPEN_EXR",
        "-o",
        "/render/out/f_####",
        "-t",
        "8",
        "--factory-startup",
        "-s",
        "10",
        "-e",
        "14",
        "-j",
        "2",
        "-a",
        "--",
        "--my-script-arg",
    )


def test_blender_minimal_threads_from_cpus_and_holes() -> None:
    jt, _ = _blender([7])
    assert jt.get_command_data().argv == (
        "blender",
        "-b",
        "/srv/shot.blend",
        "-s",
        "7",
        "-e",
        "7",
        "-j",
        "1",
        "-a",
    )
    jt, _ = _blender([1, 2, 3], cpus=3.5)
    assert list(jt.get_command_data().arguments[2:4]) == ["-t", "4"]
    jt, _ = _blender([1, 2, 4, 5])
    assert jt.get_command_data().arguments[-2:] == ("-f", "1,2,4,5")


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"file": None}, "job.data.file is required"),
        ({"file": "--python-expr=x"}, "job.data.file"),
        ({"engine": "cycles; rm"}, "job.data.engine"),
        ({"format": "png"}, "job.data.format"),
        ({"threads": "8"}, "job.data.threads"),
        ({"args": "--foo"}, "job.data.args"),
        ({"outptu": "/x"}, "job.data.outptu"),
    ],
)
def test_blender_bad_data(data: dict[str, Any], needle: str) -> None:
    jt, _ = _blender([1], data)
    with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
        jt.get_command_data()


def test_blender_fractional_frames_refused() -> None:
    jt, _ = _blender([1.5])
    with pytest.raises(ValueError, match="whole frames"):
        jt.get_command_data()


def test_blender_cycles_3x_log() -> None:
    jt, rec = _blender([1, 2, 3])
    logged = feed(jt, Stream.STDOUT, (DATA / "blender_cycles_3x.log").read_text())
    assert len(logged) == len((DATA / "blender_cycles_3x.log").read_text().splitlines())
    for task in jt.tasks:
        assert rec.final_state(task.id) == TaskState.DONE
        progress = rec.progress_of(task.id)
        assert progress[0] == 0.0
        assert progress[1] == pytest.approx(1 / 16)
        assert progress[-1] == 1.0
        assert progress == sorted(progress)
    # RUNNING and DONE are each reported once per task despite ~50 Fra: lines per frame.
    assert [s for t, s, _ in rec.states if t == 100] == [TaskState.RUNNING, TaskState.DONE]
    assert jt.is_successful(ExitStatus(code=0))


def test_blender_eevee_log() -> None:
    jt, rec = _blender([10, 12, 14])
    assert jt.get_command_data().arguments[-7:] == ("-s", "10", "-e", "14", "-j", "2", "-a")
    feed(jt, Stream.STDOUT, (DATA / "blender_eevee_293.log").read_text())
    for task in jt.tasks:
        assert rec.final_state(task.id) == TaskState.DONE
        assert rec.progress_of(task.id)[:2] == [pytest.approx(1 / 16), pytest.approx(2 / 16)]


def test_blender_cycles_279_tiles_log() -> None:
    jt, rec = _blender([5, 6])
    feed(jt, Stream.STDOUT, (DATA / "blender_cycles_279.log").read_text())
    assert rec.progress_of(100) == [pytest.approx(p / 135) for p in (1, 2, 34, 68, 101)] + [1.0]
    assert all(rec.final_state(t.id) == TaskState.DONE for t in jt.tasks)


def test_blender_progress_line_variants() -> None:
    jt, rec = _blender([1])
    prefix = "Fra:1 Mem:38.69M (0.00M, Peak 38.96M) | Time:00:00.19 | "
    cases = [
        (
            "Mem:0.00M, Peak:0.00M | Scene, View Layer | Rendered 12/135 Tiles, Sample 20/128",
            12 / 135,
        ),
        ("Mem:0.00M, Peak:0.00M | Scene, View Layer | Path Tracing Sample 3/16", 3 / 16),
        ("Rendering 5 / 64 samples", 5 / 64),
        ("Remaining:00:04.56 | Mem:0.00M, Peak:0.00M | Scene, ViewLayer | Sample 12/128", 12 / 128),
    ]
    for rest, expected in cases:
        jt.handle_line(Stream.STDOUT, prefix + rest)
        assert rec.progress_of(100)[-1] == pytest.approx(expected)
    assert jt.current_frame == 1
    jt.handle_line(Stream.STDOUT, "Fra:2 Mem:1M | Sample 1/2")  # not our frame: ignored
    assert rec.progress_of(100)[-1] == pytest.approx(12 / 128)


def test_blender_movie_append_and_skipped_frames() -> None:
    jt, rec = _blender([1, 2, 3, 4])
    feed(
        jt,
        Stream.STDOUT,
        "\n".join(
            [
                'skipping existing frame "/tmp/render/0001.png"',
                "Fra:2 Mem:10M (Peak 10M) | Time:00:00.10 | Rendering 8 / 8 samples",
                "Append frame 2",
                " Time: 00:00.12 (Saving: 00:00.00)",
                'skipping existing frame "/tmp/render/0003.png"',
                "Fra:4 Mem:10M (Peak 10M) | Time:00:00.10 | Rendering 4 / 8 samples",
            ]
        ),
    )
    assert [rec.final_state(t) for t in (100, 101, 102, 103)] == [
        TaskState.DONE,
        TaskState.DONE,
        TaskState.DONE,
        TaskState.RUNNING,
    ]
    # Blender exited 0 but frame 4 was never written: not a success.
    assert not jt.is_successful(ExitStatus(code=0))


def test_blender_error_log_priorities_and_failure() -> None:
    jt, rec = _blender([1])
    lines = (DATA / "blender_errors.log").read_text().splitlines()
    priorities = {ln: jt.line_priority(Stream.STDOUT, ln) for ln in lines if ln}
    assert priorities[lines[2]] == PRIORITY_ERR  # Error: Cannot read file
    assert priorities["Traceback (most recent call last):"] == PRIORITY_ERR
    assert priorities[next(ln for ln in lines if ln.startswith("Error: Python"))] == PRIORITY_ERR
    assert priorities[next(ln for ln in lines if ln.startswith("ERROR (bke"))] == PRIORITY_ERR
    assert priorities[next(ln for ln in lines if ln.startswith("Warning:"))] == PRIORITY_WARNING
    assert priorities[next(ln for ln in lines if ln.startswith("WARN ("))] == PRIORITY_WARNING
    assert priorities["Blender quit"] == PRIORITY_INFO
    assert jt.line_priority(Stream.STDERR, "Blender quit") == PRIORITY_WARNING
    feed(jt, Stream.STDOUT, "\n".join(lines))
    assert rec.states == []
    assert not jt.is_successful(ExitStatus(code=0))  # Blender exits 0 after a failed load
