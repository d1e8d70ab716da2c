"""Warm per-job processes against a process per task (the `warm` step of `make bench`).

    python3 bench/warm.py [--reps N] [--import-cost S] [--round-trips N]    # prints JSON

A task needs a module that costs S seconds to import (a time.sleep at import: the same on a
loaded machine, like a scene load that waits on a file server). Cold: each task is a new
interpreter that imports it and runs the frame (`python3 -c`), as a `command` task would.
Warm: the job's host and interpreter (farmnode.warm) imported it once in the setup; each task
is the client process a task's scope runs (`python3 -I -S client.py`), served by that
interpreter. Both are timed as the task's process, spawn to exit, interleaved; the first warm
task (which pays the setup) is reported apart. The round trip is one command sent and its
result back (send → result), from a client in this process, and per command within a request
of many. Scope creation and journald are the same for both paths and not part of either
figure (the latency step measures them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if __package__ in (None, ""):
    sys.path.insert(0, str(HERE.parent))

from farmnode.warm import client, wire  # noqa: E402
from farmnode.warm.jobtype import CLIENT_PATH, EXECUTOR_PATH  # noqa: E402

FRAME = "print('frame', frame, slowmod.work(frame))"


def _start_host(folder: Path, module_dir: Path) -> tuple[subprocess.Popen[bytes], Path]:
    sock = folder / "socket"
    gate_r, gate_w = os.pipe()
    ready_r, ready_w = os.pipe()
    host = subprocess.Popen([sys.executable, "-I", "-m", "farmnode.warm.host"], stdin=gate_r,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            pass_fds=(ready_w,), cwd=str(HERE.parent))
    os.close(gate_r)
    os.close(ready_w)
    spec = {"argv": [sys.executable, "-I", EXECUTOR_PATH], "env": {"PATH": "/usr/bin:/bin"},
            "cwd": None, "uid": os.geteuid(), "gid": os.getegid(), "groups": [],
            "socket": str(sock), "idle_timeout": 600, "ready_fd": ready_w, "teardown": [],
            "setup": [f"import sys; sys.path.insert(0, {str(module_dir)!r}); import slowmod"]}
    os.write(gate_w, json.dumps(spec).encode())
    os.close(gate_w)
    with os.fdopen(ready_r, "rb") as ready:
        line = ready.readline().decode()
    if not line.startswith("ok"):
        raise RuntimeError(f"the warm host did not start: {line!r}")
    return host, sock


def _timed(argv: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{argv[:3]} failed ({r.returncode}): {r.stderr.decode()[-500:]}")
    return elapsed


def measure(reps: int, import_cost: float, round_trips: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fn-bench-warm-") as tmp:
        folder = Path(tmp)
        (folder / "slowmod.py").write_text(
            f"import time\ntime.sleep({import_cost!r})\n\ndef work(frame):\n    return frame * 2\n")
        host, sock = _start_host(folder, folder)
        try:
            env = {"PATH": "/usr/bin:/bin", wire.SOCKET_ENV: str(sock)}

            def warm_argv(frame: int) -> list[str]:
                req = {"op": "run", "tasks": [frame], "commands": [FRAME],
                       "items": [{"label": str(frame), "vars": {"frame": frame}}]}
                return [sys.executable, "-I", "-S", CLIENT_PATH, json.dumps(req)]

            def cold_argv(frame: int) -> list[str]:
                return [sys.executable, "-I", "-c",
                        f"import sys; sys.path.insert(0, {tmp!r}); import slowmod; "
                        f"frame = {frame}; {FRAME}"]

            first_warm = _timed(warm_argv(0), env)
            cold, warm = [], []
            for frame in range(1, reps + 1):
                cold.append(_timed(cold_argv(frame), env))
                warm.append(_timed(warm_argv(frame), env))
            one = {"op": "run", "tasks": [1], "commands": ["x = frame"],
                   "items": [{"vars": {"frame": 1}}]}
            with open(os.devnull, "wb") as null:
                trips = []
                for _ in range(round_trips):
                    t0 = time.perf_counter()
                    code, reason = client.run(str(sock), json.dumps(one), null.fileno(),
                                              null.fileno())
                    trips.append(time.perf_counter() - t0)
                    assert code == 0, reason
                many = {**one, "commands": ["x = frame"] * 100}
                t0 = time.perf_counter()
                code, reason = client.run(str(sock), json.dumps(many), null.fileno(),
                                          null.fileno())
                per_command = (time.perf_counter() - t0) / 100
                assert code == 0, reason
        finally:
            host.kill()
            host.wait()
    return {"import_cost_s": import_cost, "reps": reps, "cold_s": cold, "warm_s": warm,
            "first_warm_s": first_warm, "round_trip_s": trips,
            "per_command_in_request_s": per_command,
            "ratio": statistics.median(cold) / statistics.median(warm)}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--import-cost", type=float, default=1.0)
    p.add_argument("--round-trips", type=int, default=200)
    args = p.parse_args(argv)
    print(json.dumps(measure(args.reps, args.import_cost, args.round_trips)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
