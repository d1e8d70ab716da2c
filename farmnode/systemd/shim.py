"""The first process of every task scope: waits at the gate, then runs the job and records its end.

The agent starts this shim, moves it into a new scope with StartTransientUnit, and only when
systemd has confirmed the scope (JobRemoved) writes the job's spec to the gate pipe,
so no process of the job ever runs outside its scope. The gate is the shim's stdin; the job
gets /dev/null instead. The shim stays as the job's parent
inside the scope, ignoring the stop signals meant for the job, so that it can record the
job's exit status in a file the agent reads — the agent may not be the one waiting when the
job ends ([2]: restarts). Standard library only: this starts once per task and must be cheap.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

GATE_FD = 0
SHIELDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


def _write_status(path: str, record: dict[str, object]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


def _exec_job(spec: dict[str, Any], err_fd: int) -> None:
    """In the forked child: drop privileges, enter cwd, exec. Never returns."""
    stage = "setup"
    try:
        for sig in SHIELDED:
            signal.signal(sig, signal.SIG_DFL)
        stage = "set groups"
        os.setgroups([int(g) for g in spec["groups"]])
        stage = "set gid"
        os.setgid(int(spec["gid"]))
        stage = "set uid"
        os.setuid(int(spec["uid"]))
        cwd = spec.get("cwd")
        if cwd:
            stage = f"chdir {cwd}"
            os.chdir(str(cwd))
        argv = [str(a) for a in spec["argv"]]
        env = {str(k): str(v) for k, v in spec["env"].items()}
        stage = f"exec {argv[0]}"
        os.execvpe(argv[0], argv, env)
    except BaseException as exc:
        msg = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        os.write(err_fd, f"{stage}: {msg}".encode())
    os._exit(127)


def main() -> int:
    data = _read_all(GATE_FD)
    if not data:
        # The agent closed the gate without a spec: the scope could not be created.
        return 125
    spec = json.loads(data)
    devnull = os.open(os.devnull, os.O_RDONLY)  # fd 0 is free again: this lands there
    if devnull != 0:
        os.dup2(devnull, 0)
        os.close(devnull)
    os.set_inheritable(0, True)
    status_path = str(spec["status_path"])
    for sig in SHIELDED:
        signal.signal(sig, signal.SIG_IGN)
    err_r, err_w = os.pipe()  # close-on-exec: EOF without data means exec succeeded
    pid = os.fork()
    if pid == 0:
        os.close(err_r)
        _exec_job(spec, err_w)
    os.close(err_w)
    error = _read_all(err_r).decode(errors="replace")
    _, wstatus = os.waitpid(pid, 0)
    record: dict[str, object] = {"pid": pid}
    if error:
        record["error"] = error
    if os.WIFSIGNALED(wstatus):
        record["signal"] = os.WTERMSIG(wstatus)
        record["core_dumped"] = os.WCOREDUMP(wstatus)
        code = 128 + os.WTERMSIG(wstatus)
    else:
        record["exit_code"] = os.WEXITSTATUS(wstatus)
        code = os.WEXITSTATUS(wstatus)
    _write_status(status_path, record)
    return code


if __name__ == "__main__":
    sys.exit(main())
