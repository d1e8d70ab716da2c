"""`make demo`: a newcomer's first five minutes with farmnode, from its .deb.

Boots a disposable Debian 12 container (tools/container.py) that has neither farmnode nor this
source tree, installs the freshly built package with apt, starts the agent, assigns a 24-frame
fakerender job (8 assignments of 3 frames, as a master batches them) with the CLI, and draws a
live progress bar per task from the task objects' PropertiesChanged signals the CLI follows;
then one task's journal, `farmnode tasks` and a busctl call. The container is gone at the end.

    python3 tools/demo.py dist/farmnode_0.1.0-1_amd64.deb
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from container import Container, booted

FRAMES, BATCH = 24, 3
JOB = {"id": 42, "by": 1, "title": "demo shot 010", "user": "nobody", "ram": 64,
       "data": {"duration": 1.5, "duration_jitter": 0.5, "lines": 2}}
BAR = 30
TTY = sys.stdout.isatty()
BOLD, DIM, OFF = ("\033[1m", "\033[2m", "\033[0m") if TTY else ("", "", "")
COLOURS = {"queued": "\033[2m", "running": "\033[36m", "done": "\033[32m",
           "failed": "\033[31m", "cancelled": "\033[33m"} if TTY else {}


def say(text: str) -> None:
    print(f"\n{BOLD}{text}{OFF}", flush=True)


def shell(ct: Container, cmd: list[str], note: str = "", tail: int = 0) -> str:
    """Run a command in the container the way a person would type it, and show it."""
    print(f"{BOLD}$ {shlex.join(cmd)}{OFF}" + (f"   {DIM}# {note}{OFF}" if note else ""),
          flush=True)
    out = ct.run(cmd).stdout
    lines = out.rstrip("\n").splitlines()
    print("\n".join(lines[-tail:] if tail else lines), flush=True)
    return out


@dataclass
class Task:
    frame: int
    state: str = "queued"
    progress: float = 0.0

    def line(self, task_id: int) -> str:
        filled = round(self.progress * BAR)
        colour = COLOURS.get(self.state, "")
        bar = "█" * filled + "·" * (BAR - filled)
        return (f"  frame {self.frame:>2}  task {task_id}  {colour}{bar}{OFF if colour else ''}"
                f" {self.progress * 100:4.0f}%  {self.state:<9}")


class Board:
    """The progress bars, redrawn in place on each change (one line per change if stdout
    is not a terminal)."""

    def __init__(self, tasks: dict[int, Task]) -> None:
        self.tasks = tasks
        self.lock = threading.Lock()
        self.drawn = False

    def draw(self) -> None:
        if TTY and self.drawn:
            sys.stdout.write(f"\033[{len(self.tasks)}F")
        sys.stdout.write("".join(t.line(i) + "\033[K\n" if TTY else t.line(i) + "\n"
                                 for i, t in self.tasks.items()))
        sys.stdout.flush()
        self.drawn = True

    def update(self, task_id: int, state: str, progress: float) -> None:
        with self.lock:
            t = self.tasks[task_id]
            changed_state = t.state != state
            t.state, t.progress = state, progress
            if TTY:
                self.draw()
            elif changed_state:
                print(t.line(task_id), flush=True)


def follow(p: subprocess.Popen[str], board: Board) -> None:
    """`farmnode assign --wait` prints `task ID: STATE NN%` on each change of a task object."""
    assert p.stdout is not None
    for line in p.stdout:
        m = re.match(r"task (\d+): (\w+) (\d+)%", line)
        if m:
            board.update(int(m.group(1)), m.group(2), int(m.group(3)) / 100)


def free_port() -> int:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
        s.bind(("::", 0))
        return int(s.getsockname()[1])


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[1].endswith(".deb"):
        print(__doc__, file=sys.stderr)
        return 2
    deb = Path(argv[1]).resolve()
    say(f"farmnode demo: {deb.name} ({deb.stat().st_size / 1e6:.1f} MB) on a fresh Debian 12 "
        "node (a systemd-nspawn container)")
    with booted(f"farmnode-demo-{os.getpid()}", install=False,
                binds=[(deb.parent, "/pkgs")]) as ct:
        # The cached tree carries the test suite's dependency venv and accounts: this node
        # gets farmnode from the package alone. It shares the host's network, so the HTTP API
        # goes on a free port instead of 50000.
        ct.sh("rm -rf /opt/farmnode; userdel farmnode-api; groupdel farmnode; "
              "mkdir -p /etc/farmnode/conf.d; "
              f"echo 'agent_api_port: {free_port()}' > /etc/farmnode/conf.d/50-demo.yaml")
        t0 = time.monotonic()
        say("1. Install the package")
        shell(ct, ["apt-get", "install", "-y", "-q", f"/pkgs/{deb.name}"], tail=6)
        say("2. Start the agent (Type=notify: this returns once it is ready)")
        shell(ct, ["systemctl", "start", "farmnode"])
        shell(ct, ["systemctl", "status", "farmnode", "farmnode-api.socket", "--no-pager",
                   "-n0"])

        say(f"3. Assign a {FRAMES}-frame fakerender job: {FRAMES // BATCH} assignments of "
            f"{BATCH} frames, each in its own scope")
        tasks: dict[int, Task] = {}
        procs = []
        for first in range(1, FRAMES + 1, BATCH):
            frames = list(range(first, first + BATCH))
            a = {"job": JOB, "jobtype": {"name": "fakerender", "version": 1},
                 "tasks": [{"id": 100 + f, "frame": f} for f in frames]}
            tasks.update({100 + f: Task(frame=f) for f in frames})
            p = subprocess.Popen(ct.argv(["farmnode", "assign", "-", "--wait"]),
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert p.stdin is not None
            p.stdin.write(json.dumps(a))
            p.stdin.close()
            procs.append(p)
        print(f"{BOLD}$ farmnode assign shot010-frames-N.yaml --wait{OFF}   "
              f"{DIM}# x{len(procs)}, live from PropertiesChanged signals{OFF}", flush=True)
        board = Board(tasks)
        with board.lock:
            board.draw()
        threads = [threading.Thread(target=follow, args=(p, board)) for p in procs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        codes = [p.wait() for p in procs]
        first_done = time.monotonic() - t0
        if not TTY:
            board.draw()

        say("4. What systemd and the agent kept")
        shell(ct, ["farmnode", "tasks"])
        ct.run(["journalctl", "--sync"])
        shell(ct, ["journalctl", "-u", "farmnode-task-104.scope", "-o", "short-precise",
                   "--no-pager"], note="frames 4-6: the agent journals each line of the scope")
        shell(ct, ["busctl", "get-property", "org.farmnode.Agent1", "/org/farmnode/Agent1",
                   "org.farmnode.Agent1", "Version", "State", "FreeRAM", "RunningTasks"],
              note="the agent's typed properties")
        shell(ct, ["busctl", "get-property", "org.farmnode.Agent1",
                   "/org/farmnode/Agent1/task/104", "org.farmnode.Task1", "State", "ExitCode",
                   "Unit", "CPUUsageUSec"], note="one object per task")
        ok = all(c == 0 for c in codes)
        say(f"demo: {'every task done' if ok else f'some tasks failed ({codes})'}; "
            f"install to the last frame in {first_done:.0f} s. Next: `man farmnode`, "
            "`make check`. Tearing the container down.")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
