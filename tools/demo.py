"""`make demo`: a real agent under a real systemd running a real multi-frame job.

Boots a disposable container (tools/container.py), installs farmnode from this checkout,
starts farmnode.service, assigns a 12-frame fakerender job (batches of 3 frames) through the
CLI and shows each task's progress as TaskChanged signals arrive, then one task's journal,
the scopes systemd kept, and a busctl call. Everything is gone at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

from container import booted


def main() -> int:
    with booted(f"farmnode-demo-{os.getpid()}") as ct:
        ct.run(["systemctl", "start", "farmnode.service"])
        print("$ systemctl status farmnode --no-pager")
        print(ct.run(["systemctl", "status", "farmnode", "--no-pager", "-n0"], check=False).stdout)
        procs = []
        for batch in range(4):
            frames = [batch * 3 + k for k in range(1, 4)]
            a = {
                "job": {"id": 42, "by": 1, "title": "demo shot 010", "user": "jobuser",
                        "ram": 64, "data": {"duration": 1.5, "lines": 3}},
                "jobtype": {"name": "fakerender", "version": 1},
                "tasks": [{"id": 100 + f, "frame": f} for f in frames],
            }
            print(f"$ farmnode assign - --wait   # frames {frames}")
            p = subprocess.Popen(ct.argv(["farmnode", "assign", "-", "--wait"]),
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert p.stdin is not None
            p.stdin.write(json.dumps(a))
            p.stdin.close()
            procs.append(p)

        def relay(p: subprocess.Popen[str], tag: str) -> None:
            assert p.stdout is not None
            for line in p.stdout:
                print(f"[{tag}] {line}", end="", flush=True)

        threads = [threading.Thread(target=relay, args=(p, f"batch {i + 1}"))
                   for i, p in enumerate(procs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        codes = [p.wait() for p in procs]
        print("\n$ farmnode tasks")
        print(ct.run(["farmnode", "tasks"]).stdout)
        print("$ journalctl -u farmnode-task-104.scope -o cat   # one task's output")
        ct.run(["journalctl", "--sync"])
        print(ct.run(["journalctl", "-u", "farmnode-task-104.scope", "-o", "cat",
                      "--no-pager"]).stdout)
        print("$ busctl call org.farmnode.Agent1 /org/farmnode/Agent1 org.farmnode.Agent1 "
              "GetStatus")
        print(ct.run(["busctl", "call", "org.farmnode.Agent1", "/org/farmnode/Agent1",
                      "org.farmnode.Agent1", "GetStatus"]).stdout)
        ok = all(c == 0 for c in codes)
        print("demo:", "every task done" if ok else f"some tasks failed ({codes})")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
