"""Warm per-job processes, host side: the real host, executor and client talking over their
real pipes and socket (no systemd: the scope and journald parts are the system tier's)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from farmnode.jobtypes.base import ExitStatus, Stream
from farmnode.jobtypes.python import PythonJobType
from farmnode.tasks.schema import parse_assignment
from farmnode.warm import client, wire
from farmnode.warm.jobtype import CLIENT_PATH, EXECUTOR_PATH

REPO = Path(__file__).resolve().parent.parent


class Host:
    def __init__(self, tmp: Path, **spec: Any) -> None:
        self.socket = tmp / "socket"
        self.log = tmp / "host.log"
        gate_r, gate_w = os.pipe()
        ready_r, ready_w = os.pipe()
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-I", "-m", "farmnode.warm.host"],
                                         stdin=gate_r, stdout=log, stderr=subprocess.STDOUT,
                                         pass_fds=(ready_w,), cwd=REPO)
        os.close(gate_r)
        os.close(ready_w)
        full = {"argv": [sys.executable, "-I", EXECUTOR_PATH], "env": {"PATH": "/usr/bin:/bin"},
                "cwd": None, "uid": os.geteuid(), "gid": os.getegid(), "groups": [],
                "socket": str(self.socket), "setup": [], "teardown": [], "idle_timeout": 60,
                "ready_fd": ready_w, **spec}
        os.write(gate_w, json.dumps(full).encode())
        os.close(gate_w)
        with os.fdopen(ready_r, "rb") as ready:
            self.ready = ready.readline().decode().strip()

    def task(self, commands: list[str], frames: tuple[float, ...] = (1,),
            ) -> tuple[int, str, bytes, bytes]:
        """(status, reason, stdout, stderr) of one task's request."""
        req = {"op": "run", "tasks": [1], "commands": commands,
               "items": [{"label": str(f), "vars": {"frame": f}} for f in frames]}
        # Files, not pipes: nothing reads a pipe while the client runs.
        with open(self.socket.parent / "out", "w+b") as o, \
                open(self.socket.parent / "err", "w+b") as e:
            code, reason = client.run(str(self.socket), json.dumps(req), o.fileno(),
                                      e.fileno())
            o.seek(0)
            e.seek(0)
            return code, reason, o.read(), e.read()

    def pid(self) -> int:
        code, reason, out, _ = self.task(["import os; print(os.getpid())"])
        assert code == 0, reason
        return int(out.splitlines()[-1])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Callable[..., Host]]:
    made: list[Host] = []

    def make(**spec: Any) -> Host:
        h = Host(tmp_path, **spec)
        made.append(h)
        assert h.ready.startswith("ok"), h.ready
        return h

    yield make
    for h in made:
        h.close()


def test_one_process_serves_every_request_with_its_namespace_and_setup_once(
        host: Callable[..., Host]) -> None:
    h = host(setup=["import sys; setups = globals().get('setups', 0) + 1",
                    "print('setup ran')"])
    first = h.task(["import os; n = globals().get('n', 0) + 1",
                   "print(os.getpid(), n, frame, setups)",
                   "import sys; print('to stderr', file=sys.stderr)"], frames=(1, 2))
    second = h.task(["n += 1; print(os.getpid(), n, frame, setups)"], frames=(3,))
    assert first[:2] == (0, "") and second[:2] == (0, "")
    pid = h.ready.split()[1]
    # The setup's output belongs to the first task; each stream lands on its own fd.
    assert first[2].decode().splitlines() == ["setup ran", f"{pid} 1 1 1", f"{pid} 2 2 1"]
    assert first[3] == b"to stderr\nto stderr\n"
    assert second[2].decode() == f"{pid} 3 3 1\n"


def test_a_failure_comes_back_with_its_traceback_never_from_the_output(
        host: Callable[..., Host]) -> None:
    h = host()
    # Output that looks like a failure is only output.
    fake = h.task(["print('Traceback (most recent call last):'); print('Error: 1')"])
    assert fake[:2] == (0, "")
    code, reason, out, err = h.task(["print('before')",
                                    "def f():\n    raise ValueError('boom')\nf()",
                                    "print('never')"], frames=(7,))
    assert code == wire.EXIT_COMMAND_FAILED
    assert reason == "command 2 of frame 7 raised ValueError: boom"
    assert out == b"before\n"
    text = err.decode()
    assert text.startswith("Traceback (most recent call last):\n")
    assert 'File "<command' in text and "in f\n" in text and text.endswith("ValueError: boom\n")
    assert "executor.py" not in text  # the trace starts at the command
    assert h.task(["print('still here')"])[2] == b"still here\n"


def test_output_reaches_the_task_before_its_result(host: Callable[..., Host]) -> None:
    h = host()
    # More than a pipe and a socket buffer hold: the host must read while the command runs.
    code, reason, out, _ = h.task(["import sys\nfor i in range(20000): print('line', i)\n"
                                  "raise KeyError(i)"])
    assert (code, reason) == (1, "command 1 of frame 1 raised KeyError: 19999")
    lines = out.decode().splitlines()
    assert len(lines) == 20000 and lines[-1] == "line 19999"


def test_death_mid_command_fails_that_task_and_the_next_gets_a_fresh_process(
        host: Callable[..., Host]) -> None:
    h = host(setup=["print('setup')"])
    first = h.pid()
    code, reason, out, _ = h.task(["print('dying'); import os, sys; sys.stdout.flush(); "
                                  "os.kill(os.getpid(), 9)"], frames=(4,))
    assert code == wire.EXIT_UNAVAILABLE
    assert reason == (f"the job's warm process (pid {first}) died while running command 1 of "
                      "frame 4: killed by SIGKILL")
    assert out == b"dying\n"
    code, _, out, _ = h.task(["import os; print(os.getpid())"])
    assert code == 0 and out.decode().splitlines()[0] == "setup"  # the setup runs again
    assert int(out.decode().splitlines()[1]) != first
    # A command that closes the back-channel leaves no way to hear outcomes: stopped too.
    code, reason, _, _ = h.task(["import os, time; os.closerange(3, 1024); time.sleep(60)"])
    assert code == wire.EXIT_UNAVAILABLE
    assert reason.endswith("its back-channel was closed, so it was stopped (killed by SIGKILL)")
    # An interpreter that leaves by itself (sys.exit) is a death too.
    code, reason, _, _ = h.task(["raise SystemExit(3)"])
    assert code == wire.EXIT_UNAVAILABLE and reason.endswith("command 1 of frame 1: exit code 3")


def test_a_client_that_leaves_mid_command_has_the_interpreter_stopped(
        host: Callable[..., Host], tmp_path: Path) -> None:
    h = host()
    first = h.pid()
    req = {"op": "run", "tasks": [1], "commands": ["print('started', flush=True)",
                                                   "import time; time.sleep(60)"],
           "items": [{"vars": {}}]}
    task = subprocess.Popen([sys.executable, "-I", "-S", CLIENT_PATH, json.dumps(req)],
                            env={wire.SOCKET_ENV: str(h.socket)}, stdout=subprocess.PIPE)
    assert task.stdout is not None and task.stdout.readline() == b"started\n"
    task.send_signal(signal.SIGTERM)  # a cancel
    task.wait()
    # Stopped, not left to finish its 60 s command: the log says why it went (below).
    second = h.pid()
    assert second != first
    with pytest.raises(ProcessLookupError):
        os.kill(first, 0)
    assert "the task's client left while command 2 ran (cancelled)" in h.log.read_text()


def test_idle_host_runs_the_teardown_and_leaves(host: Callable[..., Host],
                                                tmp_path: Path) -> None:
    h = host(idle_timeout=0.5, setup=["x = 41"],
             teardown=["print('teardown', x + 1)", "raise RuntimeError('late')",
                       "print('after it')"])
    assert h.task(["print(x)"])[2] == b"41\n"
    assert h.proc.wait(timeout=20) == 0
    log = h.log.read_text()
    # Teardown output is the host's own (no task is served); a failing command does not end it.
    assert "teardown 42\n" in log and "RuntimeError: late" in log and "after it\n" in log
    assert not h.socket.exists()
    code, reason, _, _ = h.task(["print(1)"])
    assert code == wire.EXIT_UNAVAILABLE and "not there" in reason


def test_a_host_that_never_ran_its_setup_skips_the_teardown(host: Callable[..., Host]) -> None:
    h = host(idle_timeout=0.2, teardown=["print('teardown')"])
    assert h.proc.wait(timeout=20) == 0
    assert "teardown" not in h.log.read_text()


def test_stop_serves_the_queue_then_leaves_and_hold_is_refused_meanwhile(
        host: Callable[..., Host]) -> None:
    h = host(teardown=["print('teardown')"])
    assert h.pid()
    assert client.run(str(h.socket), '{"op": "hold"}') == (0, "")
    assert client.run(str(h.socket), '{"op": "stop", "teardown": true}') == (0, "")
    assert h.proc.wait(timeout=20) == 0
    assert "teardown\n" in h.log.read_text()


def test_a_failed_setup_fails_the_task_and_the_next_task_tries_again(
        host: Callable[..., Host], tmp_path: Path) -> None:
    flag = tmp_path / "flag"
    h = host(setup=[f"import os\nif not os.path.exists({str(flag)!r}): raise OSError('no scene')"])
    code, reason, _, err = h.task(["print('frame')"])
    assert code == wire.EXIT_COMMAND_FAILED
    assert reason == "setup command 1 raised OSError: no scene"
    assert b"OSError: no scene" in err
    flag.touch()
    assert h.task(["print('frame')"])[:3] == (0, "", b"frame\n")


def test_bad_requests_are_refused_by_name_and_the_host_serves_on(
        host: Callable[..., Host]) -> None:
    h = host()
    for req, why in (({"op": "dance"}, "unknown op 'dance'"),
                     ({"op": "run", "commands": "print(1)", "items": []},
                      "commands must be a list of strings"),
                     ({"op": "run", "commands": [], "items": [{"vars": []}]},
                      "items[].vars must be an object")):
        assert client.run(str(h.socket), json.dumps(req)) == (1, f"bad request: {why}")
    import socket

    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(str(h.socket))
    s.send(b"\xff not json")
    assert s.recv(65536).startswith(wire.DONE + b"1bad request: ")
    s.close()
    assert h.pid()


def test_a_host_that_cannot_start_its_interpreter_says_why(tmp_path: Path) -> None:
    h = Host(tmp_path, argv=["/nonexistent/python"])
    try:
        assert h.ready == "error: No such file or directory"
        assert h.proc.wait(timeout=20) == 1
    finally:
        h.close()


# ---- the python job type ---------------------------------------------------------------

def _python(data: dict[str, Any], frames: tuple[int, ...] = (1, 2)) -> PythonJobType:
    a = parse_assignment({"job": {"id": 5, "by": 1, "data": data},
                          "jobtype": {"name": "python", "version": 1},
                          "tasks": [{"id": 50 + f, "frame": f} for f in frames]})
    return PythonJobType(a, _Reporter())


class _Reporter:
    def set_task_state(self, *args: Any) -> None: ...

    def set_task_progress(self, *args: Any) -> None: ...


def test_python_jobtype_runs_the_client_with_one_item_per_frame() -> None:
    jt = _python({"commands": "render(frame)", "setup": ["import json"], "last_frame": 2,
                  "interpreter": ["python3", "-X", "dev"], "idle_timeout": 30})
    cmd = jt.get_command_data()
    assert cmd.argv[:4] == (sys.executable, "-I", "-S", CLIENT_PATH)
    req = json.loads(cmd.argv[4])
    assert req["commands"] == ["render(frame)"]
    assert [i["vars"]["frame"] for i in req["items"]] == [1.0, 2.0]
    assert [i["vars"]["task"] for i in req["items"]] == [51, 52]
    warm = jt.warm_process()
    assert warm.argv == ("python3", "-X", "dev", EXECUTOR_PATH)
    assert warm.setup == ("import json",) and warm.idle_timeout == 30
    assert warm.holds_last_frame(jt.frames) and not warm.holds_last_frame([1.0])


@pytest.mark.parametrize(("data", "error"), [
    ({}, "job.data.commands: required"),
    ({"commands": [1]}, "job.data.commands: must be a string or a list of strings"),
    ({"commands": "x = (", }, "job.data.commands[0]: line 1: '(' was never closed"),
    ({"commands": "x", "setup": "def"}, "job.data.setup[0]: line 1: invalid syntax"),
    ({"commands": "x", "interpreter": []}, "job.data.interpreter: must be a program"),
    ({"commands": "x", "idle_timeout": 0}, "job.data.idle_timeout: must be a positive"),
    ({"commands": "x", "last_frame": "end"}, "job.data.last_frame: must be a number"),
    ({"commands": "x", "cwd": "rel"}, "job.data.cwd: must be an absolute path"),
    ({"commands": "x", "scene": "/a"}, "job.data.scene: unknown key"),
    ({"commands": "x = 1\n" * 30000}, "job.data: one assignment's commands take"),
])
def test_python_jobtype_refuses_bad_data_by_key(data: dict[str, Any], error: str) -> None:
    with pytest.raises(ValueError, match="^" + error.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        _python(data).get_command_data()


def test_python_jobtype_takes_the_clients_record_as_the_reason() -> None:
    jt = _python({"commands": "x"})
    line = client.record("command 1 of frame 2 raised KeyError: 'x'").decode().rstrip("\n")
    assert jt.handle_line(Stream.STDERR, line) == \
        "farmnode-warm: command 1 of frame 2 raised KeyError: 'x'"
    assert jt.line_priority(Stream.STDERR, line) == 3
    assert jt.handle_line(Stream.STDERR, "KeyError: 'x'") == "KeyError: 'x'"
    assert jt.line_priority(Stream.STDERR, "KeyError: 'x'") == 4
    assert jt.failure_reason(ExitStatus(code=1)) == "command 1 of frame 2 raised KeyError: 'x'"
    assert _python({"commands": "x"}).failure_reason(ExitStatus(code=1)) == "exit code 1"


# ---- PyFarm's job-level hooks, mapped onto the warm process ------------------------------

PYFARM_PERSISTENT = '''
import os
from pyfarm.jobtypes.core.jobtype import JobType, CommandData

class Persistent(JobType):
    @classmethod
    def prepare_for_job(cls, job):
        print("prepare_for_job", job, os.getpid())
        return {"scene": "loaded once", "pid": os.getpid()}

    @classmethod
    def cleanup_after_job(cls, persistent_data):
        print("cleanup_after_job", persistent_data["scene"])

    def get_command_data(self):
        server = self.spawn_persistent_process(
            self.assignment["job"]["id"], CommandData("/bin/sh", "-c", "read x; sleep 600"))
        return CommandData("/bin/sh", "-c",
                           f"echo data {self.persistent_job_data['scene']} server {server.pid}")
'''


def test_pyfarm_job_level_hooks_run_once_per_job_in_its_warm_process(
        host: Callable[..., Host], tmp_path: Path) -> None:
    from farmnode.jobtypes.remote import WarmRemoteJobType, cache_store, remote_jobtype_class

    path = cache_store(tmp_path / "cache", "persistent", 1, "Persistent", PYFARM_PERSISTENT)
    cls = remote_jobtype_class(path, "Persistent")
    assert issubclass(cls, WarmRemoteJobType)

    def assignment(task: int) -> Any:
        return parse_assignment({"job": {"id": 77, "by": 1},
                                 "jobtype": {"name": "persistent", "version": 1},
                                 "tasks": [{"id": task, "frame": task}]}, f"a-{task}")

    first = cls(assignment(1), _Reporter())
    warm = first.warm_process()
    h = host(argv=list(warm.argv), setup=list(warm.setup), teardown=list(warm.teardown),
             env={"PATH": "/usr/bin:/bin"})
    outs = []
    for task in (1, 2):
        jt = cls(assignment(task), _Reporter())
        request = json.loads(jt.get_command_data().argv[4])
        code, reason, out, err = h.task(request["commands"])
        assert (code, reason) == (0, ""), err
        # split on newlines only, as the agent does (str.splitlines also splits on \x1e)
        outs.append([jt.handle_line(Stream.STDOUT, line)
                     for line in out.decode().rstrip("\n").split("\n")])
    interp = h.ready.split()[1]
    assert outs[0][0] == f"prepare_for_job 77 {interp}"
    data = [line for lines in outs for line in lines if line and line.startswith("data")]
    # One prepare_for_job and one persistent process for both assignments.
    assert len(data) == 2 and data[0] == data[1]
    assert data[0].startswith("data loaded once server ")
    server = int(data[0].split()[-1])
    os.kill(server, 0)
    assert client.run(str(h.socket), '{"op": "stop"}') == (0, "")
    assert h.proc.wait(timeout=30) == 0
    assert "cleanup_after_job loaded once" in h.log.read_text()
    with pytest.raises(ProcessLookupError):
        for _ in range(100):  # the server is stopped by the teardown, reaped by its parent
            os.kill(server, 0)
            time.sleep(0.05)


def test_pyfarm_source_without_those_hooks_runs_as_before(tmp_path: Path) -> None:
    from farmnode.jobtypes.remote import (
        RemoteJobType,
        WarmRemoteJobType,
        cache_store,
        remote_jobtype_class,
        uses_persistent_hooks,
    )

    plain = PYFARM_PERSISTENT.split("class Persistent")[0] + (
        "class Plain(JobType):\n    def get_command_data(self):\n"
        "        return CommandData('/bin/true')\n")
    path = cache_store(tmp_path, "plain", 1, "Plain", plain)
    cls = remote_jobtype_class(path, "Plain")
    assert issubclass(cls, RemoteJobType) and not issubclass(cls, WarmRemoteJobType)
    broken = tmp_path / "broken.py"
    broken.write_text("def spawn_persistent_process(:\n")
    assert not uses_persistent_hooks(broken)  # the task's scope reports the syntax error


def test_stopping_the_agent_stops_every_jobs_warm_scope(tmp_path: Path) -> None:
    import asyncio
    import dataclasses

    from farmnode.config import Config
    from farmnode.warm import manager

    config = dataclasses.replace(Config(), agent_runtime_dir=str(tmp_path))
    for job in (3, 14):
        manager.socket_path(config, job).parent.mkdir(parents=True)
    (tmp_path / "warm" / "stray").mkdir()

    class Scopes:  # records the calls; the stop itself is systemd's (system tier)
        stopped: list[str] = []

        async def stop_scope(self, unit: str) -> bool:
            self.stopped.append(unit)
            return True

    scopes = Scopes()
    asyncio.run(manager.stop_all(scopes, config))  # type: ignore[arg-type]
    assert sorted(scopes.stopped) == ["farmnode-warm-job14.scope", "farmnode-warm-job3.scope"]
