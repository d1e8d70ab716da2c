"""Fleet control's fan-out: `farmnode -H` on k of N booted nodes, against one node and
against the same nodes one after another, with a bare `ssh host true` as the reference
measured in the same run.

    sudo .venv/bin/python bench/fleet.py [N]     # N nodes (default 8), prints JSON

The nodes are tests/system/test_fleet_control.py's (booted containers with sshd, each in
its own network namespace), so every figure includes sshd's session set-up on the node,
which on this machine shares the caller's CPUs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO / "tools"), str(REPO)]

from tests.system.test_fleet_control import Fleet, fleet_of  # noqa: E402

REPS = 5


def timed(f: Fleet, argv: list[str]) -> tuple[float, dict[str, Any]]:
    t0 = time.monotonic()
    r = subprocess.run(argv, env=f.env, capture_output=True, text=True, timeout=300, cwd=REPO)
    wall = time.monotonic() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{argv}: {r.returncode} {r.stdout[-500:]} {r.stderr[-500:]}")
    last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else "{}"
    return wall, json.loads(last) if last.startswith("{") else {}


def status(f: Fleet, ips: list[str]) -> tuple[float, dict[str, Any]]:
    return timed(f, [sys.executable, "-m", "farmnode.cli.main", "--json", "-H", ",".join(ips),
                     "status"])


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    out: dict[str, Any] = {"nodes": n, "reps": REPS}
    with fleet_of(n) as f:
        status(f, f.ips)  # warm: every node's sshd and agent have answered once
        ssh = min(timed(f, ["ssh", f.ips[0], "true"])[0] for _ in range(REPS))
        out["ssh_true_s"] = round(ssh, 3)
        ks = sorted({1, 2, 4, n} & set(range(1, n + 1)))
        for k in ks:
            walls, inner, slowest = [], [], []
            for _ in range(REPS):
                wall, res = status(f, f.ips[:k])
                walls.append(wall)
                inner.append(res["summary"]["seconds"])
                slowest.append(max(v["seconds"] for v in res["summary"]["nodes"].values()))
            out[f"parallel_{k}"] = {"wall_s": round(min(walls), 3),
                                    "fanout_s": round(min(inner), 3),
                                    "slowest_node_s": round(min(slowest), 3)}
        serial = []
        for _ in range(3):
            serial.append(sum(status(f, [ip])[0] for ip in f.ips))
        out[f"serial_{n}_wall_s"] = round(min(serial), 3)
    one, many = out["parallel_1"]["fanout_s"], out[f"parallel_{n}"]["fanout_s"]
    out["ratio_n_vs_1"] = round(many / one, 2)
    out["ratio_n_vs_serial"] = round(out[f"parallel_{n}"]["wall_s"] / out[f"serial_{n}_wall_s"],
                                     2)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
