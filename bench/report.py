"""REPORT.md from bench/results.json: the table of figures vs targets, then the details.

Pure (no measuring): `python3 -m bench.report` re-renders REPORT.md from results.json, so the
analysis in NOTES.md can be edited without measuring again.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from bench.stats import Summary, percentile, ratio, ratios, verdict

HERE = Path(__file__).resolve().parent
MB = 1024
TIMES = "\u00d7"
DIRTY = " plus uncommitted changes to farmnode (those committed with this report)"


def _ms(values: list[float]) -> Summary:
    return Summary.of(values).scaled(1000)


def _throughput(results: dict[str, Any], mode: str, size: int) -> list[dict[str, Any]]:
    return [r for r in results["throughput"] if r["mode"] == mode and r["lines"] == size]


Row = tuple[str, str, str, str, str]


def rows(results: dict[str, Any]) -> list[Row]:
    """(figure, measured, floor / reference, target, verdict) for the summary table."""
    out: list[Row] = []
    for step, section in (("latency", _latency_rows), ("throughput", _throughput_rows),
                          ("footprint", _footprint_rows), ("scale", _scale_rows),
                          ("restart", _restart_rows), ("master", _master_rows),
                          ("big", _big_rows), ("warm", _warm_rows),
                          ("overhead", _overhead_rows)):
        got = results.get(step)
        if got is None:
            # a step newer than the whole run this file holds: nothing failed
            out.append((step, "not measured in this run", "", "", "—"))
        elif isinstance(got, dict) and "error" in got:
            out.append((step, f"the step failed: {got['error'][-300:]}", "", "", "**error**"))
        else:
            out += section(results)
    return out


def _latency_rows(results: dict[str, Any]) -> list[Row]:
    out: list[Row] = []
    lat = results["latency"]["samples"]
    floor = _ms(lat["floor"])
    for key, label, target in (("dbus_busctl", "Launch latency, D-Bus (busctl Assign)", 1.5),
                               ("dbus_inproc", "Launch latency, D-Bus (in-process client)", 1.5),
                               ("http_warm", "Launch latency, HTTP (warm)", 2.0),
                               ("http_first", "Launch latency, HTTP (first after the API "
                                "restarted behind its socket)", 2.0),
                               ("http_after_start", "Launch latency, HTTP (first assign after "
                                "systemctl start farmnode)", 2.0)):
        if key not in lat:
            continue
        s = _ms(lat[key])
        r = ratio(s.p50, floor.p50)
        out.append((label, f"p50 {s.p50:.1f} ms ({s.mmm()} ms)",
                    f"systemd-run --scope p50 {floor.p50:.1f} ms; **{r:.2f}{TIMES}**",
                    f"p50 ≤ {target:g}{TIMES} floor", verdict(r, target)))
    after = results["latency"].get("after_start")
    if after and after["first"] and after["warm"]:
        first, warm = _ms(after["first"]), _ms(after["warm"])
        r = ratio(first.p50, warm.p50)
        out.append(("First GET /api/v1/status after systemctl start farmnode (fresh "
                    "connection)", f"p50 {first.p50:.1f} ms ({first.mmm()} ms)",
                    f"warm GET, same rounds, p50 {warm.p50:.1f} ms; **{r:.2f}{TIMES}**",
                    f"p50 ≤ 2{TIMES} warm", verdict(r, 2.0)))
    return out


def _throughput_rows(results: dict[str, Any]) -> list[Row]:
    out: list[Row] = []
    plan = results["plan"]
    for mode, floor_mode, label in (("command", "floor", "Throughput, command job type (hooks on)"),
                                    ("blender", "floor_blender",
                                     "Throughput, blender job type (progress parsing)")):
        size = plan["big_lines"] or plan["small_lines"]
        runs, floors = _throughput(results, mode, size), _throughput(results, floor_mode, size)
        small = _throughput(results, mode, plan["small_lines"])
        small_floor = _throughput(results, floor_mode, plan["small_lines"])
        if not runs or not floors:
            continue
        r = ratio(runs[0]["lines_per_s"], floors[0]["lines_per_s"])
        per_round = ratios([x["lines_per_s"] for x in small],
                           [x["lines_per_s"] for x in small_floor])
        lost = sum(x["lines"] - x["journal_lines"] for x in _throughput_all(results, mode))
        identical = all(x["identical"] for x in _throughput_all(results, mode))
        cpu = 100 * runs[0]["agent_cpu_s"] / runs[0]["seconds"]
        out.append((f"{label}, {size:,} lines",
                    f"{runs[0]['lines_per_s']:,.0f} lines/s; agent CPU {cpu:.0f} %; "
                    f"{lost} lost{'' if identical else ' (CONTENT DIFFERS)'}",
                    f"systemd-cat {floors[0]['lines_per_s']:,.0f} lines/s; **{100 * r:.0f} %** "
                    f"(at {plan['small_lines']:,}: {Summary.of(per_round).mmm('{:.0%}')})",
                    "≥ 70 % of floor, 0 lost",
                    "met" if r >= 0.7 and lost == 0 and identical else "**missed**"))
    return out


def _footprint_rows(results: dict[str, Any]) -> list[Row]:
    out: list[Row] = []
    fp = results["footprint"]
    agent_idle = fp["idle"]["farmnode.service"]
    agent_busy = fp["busy"]["farmnode.service"]
    api_idle = fp["idle"]["farmnode-api.service"]
    rss = max(agent_idle["rss_kb"] + agent_busy["rss_kb"]) / MB
    out.append(("Agent RSS (idle / 50 quiet tasks)",
                f"{max(agent_idle['rss_kb']) / MB:.1f} / {max(agent_busy['rss_kb']) / MB:.1f} MB",
                f"API (gunicorn, {api_idle['pids']} processes) "
                f"{max(api_idle['rss_kb']) / MB:.1f} MB", "≤ 40 MB", verdict(rss, 40)))
    out.append(("Agent CPU idle (50 quiet tasks)",
                f"{agent_idle['cpu_percent']:.3f} % ({agent_busy['cpu_percent']:.2f} %)",
                f"API idle {api_idle['cpu_percent']:.3f} %", "idle ≤ 0.1 %",
                verdict(agent_idle["cpu_percent"], 0.1)))
    return out


def _scale_rows(results: dict[str, Any]) -> list[Row]:
    out: list[Row] = []
    sc = results["scale"]
    for key, label in (("dbus_busy", "GetStatus over D-Bus"), ("http_busy", "GET /api/v1/status")):
        s = _ms(sc[key])
        idle = _ms(sc[key.replace("busy", "idle")])
        fl = _ms(sc["floor_busy"])
        out.append((f"{label}, {sc['tasks']} tasks running",
                    f"p50 {s.p50:.1f} ms, p99 {s.p99:.1f} ms (idle: p50 {idle.p50:.1f}, "
                    f"p99 {idle.p99:.1f})",
                    f"systemd property Get p50 {fl.p50:.2f} ms, p99 {fl.p99:.2f} ms",
                    "p99 ≤ 50 ms", verdict(s.p99, 50)))
    out.append((f"Agent CPU, {sc['tasks']} tasks (1 line/s each)",
                f"{sc['agent_cpu_percent_quiet']:.1f} % ({sc['agent_cpu_percent_queried']:.0f} % "
                "while answering status queries back to back)",
                f"RSS {sc['agent_rss_kb'] / MB:.1f} MB", "—", "—"))
    return out


def _restart_rows(results: dict[str, Any]) -> list[Row]:
    out: list[Row] = []
    rs = results["restart"]
    s = Summary.of(rs["farmnode"])
    fl = Summary.of(rs["floor"])
    ok = all(c["new_pid"] and c["adopted"] and c["running"] == rs["tasks"] for c in rs["checks"])
    out.append((f"Restart with {rs['tasks']} running tasks → READY, all re-adopted",
                f"{s.mmm('{:.2f}')} s{'' if ok else ' (NOT ALL RE-ADOPTED)'}",
                f"Type=notify sh service {fl.p50 * 1000:.0f} ms", "≤ 2 s",
                "met" if s.max <= 2 and ok else "**missed**"))
    return out


def _master_rows(results: dict[str, Any]) -> list[Row]:
    out: list[Row] = []
    m = results["master"]
    per_hour = m["requests"] / m["hours"]
    kib = (m["bytes_sent"] + m["bytes_received"]) / m["hours"] / 1024
    out.append(("Master traffic, idle node-hour",
                f"{per_hour:.0f} requests, {kib:.1f} KiB "
                f"({m['bytes_sent'] / m['hours'] / 1024:.1f} KiB sent)",
                "PyFarm: 30 reannounces", "≤ PyFarm", verdict(per_hour, 30)))
    return out


def _big_rows(results: dict[str, Any]) -> list[Row]:
    b = results["big"]
    n = b["tasks"]
    ok = b["big_done"] == min(n, 1000)  # the listing keeps the last 1,000 finished
    r = ratio(b["big_worst_s"], b["one_worst_s"])
    return [
        (f"Worst event-loop stall, one {n:,}-task assignment (assign → all done)",
         f"{b['big_worst_s'] * 1000:.0f} ms{'' if ok else ' (NOT ALL DONE)'}",
         f"1-task assignment {b['one_worst_s'] * 1000:.0f} ms; **{r:.1f}{TIMES}**; "
         f"idle {b['idle_worst_s'] * 1000:.0f} ms",
         "≪ WatchdogSec 30 s (≤ 1 s)", "met" if b["big_worst_s"] <= 1 and ok else "**missed**"),
        (f"Assign call, {n:,} tasks", f"{b['big_assign_s'] * 1000:.0f} ms",
         f"1 task {b['one_assign_s'] * 1000:.0f} ms", "—", "—"),
        (f"kill -9 with {n:,} tasks running → READY / all concluded",
         f"{b['kill_ready_s']:.2f} s / {b['kill_concluded_s']:.2f} s (job: 3 s)",
         f"worst stall after READY {b['kill_worst_s'] * 1000:.0f} ms", "—", "—"),
    ]


def _warm_rows(results: dict[str, Any]) -> list[Row]:
    w = results["warm"]
    warm, cold = Summary.of(w["warm_s"]), Summary.of(w["cold_s"])
    r = ratio(cold.p50, warm.p50)
    trip = _ms(w["round_trip_s"])
    cost = w["import_cost_s"]
    return [
        (f"Per-task wall time, a task needing a {cost:g} s import: warm process (bench/warm.py)",
         f"{warm.scaled(1000).mmm('{:.1f}')} ms (first, with the setup: "
         f"{w['first_warm_s']:.2f} s)",
         f"cold, a process per task {cold.mmm('{:.2f}')} s; **{r:.0f}{TIMES}** faster",
         f"≥ 50{TIMES}", verdict(r, 50, higher_is_better=True)),
        ("Warm round trip, one command (send → result)",
         f"{trip.mmm('{:.2f}')} ms (p99 {trip.p99:.2f})",
         f"per command in a 100-command request {w['per_command_in_request_s'] * 1000:.2f} ms",
         "—", "—"),
    ]


def overhead_summary(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Per-task overhead (ms) pooled over the rounds of one master: every task counts once, so
    the mean is the rounds' total wall time beyond the tasks' run time over all their tasks."""
    samples = [x for r in runs for x in r["per_task_s"]]
    beyond = sum(r["wall_s"] - r["run_s"] * r["tasks"] for r in runs)
    return {"n": len(samples), "mean": 1000 * beyond / len(samples),
            "p50": 1000 * percentile(samples, 50), "p95": 1000 * percentile(samples, 95),
            "max": 1000 * max(samples),
            "dispatch_p50": 1000 * percentile([x for r in runs for x in r["dispatch_s"]], 50),
            "run_p50": 1000 * percentile([x for r in runs for x in r["run_extra_s"]], 50)}


def _overhead_rows(results: dict[str, Any]) -> list[Row]:
    o = results["overhead"]
    real, stub = overhead_summary(o["runs"]["real"]), overhead_summary(o["runs"]["stub"])
    r = ratio(real["mean"], stub["mean"])
    rounds = len(o["runs"]["real"])
    return [(f"Per-task overhead, {o['frames']} one-second tasks one at a time, PyFarm 0.8.6's "
             "master and scheduler (job wall time minus run time, master's clock)",
             f"mean {real['mean']:.0f} ms, p50 {real['p50']:.0f}, p95 {real['p95']:.0f} "
             f"({rounds} job{'s' if rounds != 1 else ''})",
             f"tests/master_stub.py (assign sent on `done`) mean {stub['mean']:.0f} ms, "
             f"p50 {stub['p50']:.0f}, p95 {stub['p95']:.0f}; **{r:.1f}{TIMES}**", "—", "—")]


def _overhead_details(o: dict[str, Any]) -> list[str]:
    out = ["", "### 7. Per-task overhead: PyFarm's master against the stub", "",
           f"{o['reps']} round(s), each one job of {o['frames']} tasks (`{' '.join(o['command'])}`"
           ", one task per assign) through PyFarm 0.8.6's master, then the same through the "
           "stub with this side sending the next assign as soon as the stub has the last "
           f"`done`. Clock: {o['clock']}. Per task: from the previous task's `done` (the first: "
           "from the submission) to its own, minus 1 s; `dispatch`: previous `done` → this "
           "task's `running`; `run`: `running` → `done` minus 1 s. The master took "
           f"{o['master_start_s']:.1f} s to start (redis, master, scheduler).", "",
           "| Master | tasks | mean ms | p50 | p95 | max | dispatch p50 | run p50 | "
           "job wall s (master's clock / host's) |", "|---|---|---|---|---|---|---|---|---|"]
    for key, label in (("real", "PyFarm 0.8.6"), ("stub", "stub")):
        s = overhead_summary(o["runs"][key])
        walls = ", ".join(f"{r['wall_s']:.2f} / {r['host_wall_s']:.2f}" for r in o["runs"][key])
        out.append(f"| {label} | {s['n']} | {s['mean']:.0f} | {s['p50']:.0f} | {s['p95']:.0f} "
                   f"| {s['max']:.0f} | {s['dispatch_p50']:.0f} | {s['run_p50']:.0f} | "
                   f"{walls} |")
    switches = [(r["switch_s"], r["ready_s"]) for k in ("real", "stub")
                for r in o["runs"][k] if "switch_s" in r]
    if switches:
        out += ["", "Before each job the agent was stopped, its state emptied and started "
                "pointed at that master: "
                + ", ".join(f"{a:.1f} s ({b:.1f} s to be online there)" for a, b in switches)
                + " (real rounds first)."]
    alone = o.get("measured_alone")
    if alone:
        out += ["", f"Measured on its own (`BENCH_ONLY=overhead`) on {alone['date']} at commit "
                f"{alone['commit']}{DIRTY if alone.get('dirty') else ''}, in "
                f"{alone['wall_s'] / 60:.1f} min."]
    return out


def _throughput_all(results: dict[str, Any], mode: str) -> list[dict[str, Any]]:
    return [r for r in results["throughput"] if r["mode"] == mode]


def table(results: dict[str, Any]) -> str:
    lines = ["| Figure | Measured | Floor / reference | Target | |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows(results)]
    return "\n".join(lines)


def _details(results: dict[str, Any]) -> str:
    out = ["## Figures in detail", ""]
    lat = results["latency"]
    out += ["### 1. Launch latency (ms; min / median / max; p99)", "",
            "| Path | n | min / median / max | p99 | ratio of medians | in its scope |",
            "|---|---|---|---|---|---|"]
    floor = _ms(lat["samples"]["floor"])
    for key, values in lat["samples"].items():
        s = _ms(values)
        r = ratio(s.p50, floor.p50)
        out.append(f"| {key} | {s.n} | {s.mmm()} | {s.p99:.1f} | {r:.2f}{TIMES} "
                   f"| {', '.join(lat['units'][key])} |")
    out += ["", "### 2. Output throughput", "",
            "| Writer | lines | lines/s | seconds | in journal | identical | agent CPU s | "
            "journald CPU s | agent restarted |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results["throughput"]:
        out.append(f"| {r['mode']} | {r['lines']:,} | {r['lines_per_s']:,.0f} | "
                   f"{r['seconds']:.1f} | {r['journal_lines']:,} | {r['identical']} | "
                   f"{r['agent_cpu_s']:.1f} | {r['journald_cpu_s']:.1f} | "
                   f"{'**yes**' if r.get('agent_restarted') else 'no'} |")
    fp = results["footprint"]
    out += ["", f"### 3. Footprint ({results['plan']['footprint_s']:g} s each)", "",
            "| Unit | state | RSS MB (min / median / max) | CPU % | processes |",
            "|---|---|---|---|---|"]
    for state in ("idle", "busy"):
        for unit, v in fp[state].items():
            s = Summary.of([k / MB for k in v["rss_kb"]])
            label = "idle" if state == "idle" else f"{fp['tasks']} quiet tasks"
            out.append(f"| {unit} | {label} | {s.mmm()} | {v['cpu_percent']:.3f} | "
                       f"{v['pids']} |")
    sc = results["scale"]
    out += ["", f"### 4. Scale: {sc['tasks']} concurrent tasks "
            f"({sc['running']} running when measured)", "",
            f"Assigning {sc['tasks']} took {sc['start']['assigned_s']:.1f} s, all running after "
            f"{sc['start']['running_s']:.1f} s; cancelling all and seeing them end "
            f"{sc['stop_all_s']:.1f} s.", "",
            "| Query | n | p50 ms | p99 ms | max ms |", "|---|---|---|---|---|"]
    for key in ("floor_idle", "dbus_idle", "http_idle", "floor_busy", "dbus_busy", "http_busy"):
        s = _ms(sc[key])
        out.append(f"| {key} | {s.n} | {s.p50:.2f} | {s.p99:.2f} | {s.max:.2f} |")
    rs = results["restart"]
    out += ["", "### 5. Restart", "",
            f"`systemctl restart farmnode` (returns at READY=1, sent after every inherited task "
            f"is attached again), {rs['tasks']} tasks running: "
            f"{Summary.of(rs['farmnode']).mmm('{:.3f}')} s (min / median / max, "
            f"n={len(rs['farmnode'])}); floor `systemctl restart` of a Type=notify shell "
            f"service: {Summary.of(rs['floor']).mmm('{:.3f}')} s. After each restart: "
            + ", ".join(f"{c['running']}/{rs['tasks']} running"
                        f"{'' if c['adopted'] and c['new_pid'] else ' (!)'}"
                        for c in rs["checks"]) + "."]
    m = results["master"]
    out += ["", "### 6. Master traffic", "",
            f"{m['hours']:g} node-hour(s) compressed {m['compression']:g}{TIMES} "
            f"({m['seconds']:.0f} s; every interval of the config divided by "
            f"{m['compression']:g}), counted after the first announce: {m['requests']} requests "
            f"({', '.join(f'{k}: {v}' for k, v in sorted(m['kinds'].items()))}), "
            f"{m['bytes_sent']:,} bytes sent and {m['bytes_received']:,} received over "
            f"{m['connections']} new TCP connection(s) (keep-alive)."]
    if "overhead" in results:
        out += _overhead_details(results["overhead"])
    return "\n".join(out)


def _safe_details(results: dict[str, Any]) -> str:
    failed = {k: v["error"] for k, v in results.items()
              if isinstance(v, dict) and "error" in v}
    if not failed:
        return _details(results)
    return "## Failed steps\n\n" + "\n".join(f"- **{k}**: `{v[-500:]}`"
                                               for k, v in failed.items())


def render(results: dict[str, Any]) -> str:
    plan, host, ct = results["plan"], results["host"], results["container"]
    notes = (HERE / "NOTES.md").read_text() if (HERE / "NOTES.md").exists() else ""
    kind = ("**full run**" if plan["name"] == "full"
            else "**quick run** (`BENCH_QUICK=1`: fewer repeats, no 10 M-line runs)")
    parts = [
        "# farmnode benchmarks", "",
        f"Generated by `make bench` ({kind}) on {host['date']} at commit {host['commit']}"
        f"{DIRTY if host.get('dirty') else ''}, "
        f"in {results['wall_s'] / 60:.1f} min. Every figure is measured in this run next to "
        "its floor — what systemd itself does for the same work — on the same machine, "
        "interleaved where repeats are taken; medians with min / max."
        + "".join(f" The {name} step was measured on its own (`BENCH_ONLY={name}`) on "
                  f"{v['measured_alone']['date']} at commit {v['measured_alone']['commit']}."
                  for name, v in results.items()
                  if isinstance(v, dict) and "measured_alone" in v), "",
        "## Figures vs targets", "", table(results), "",
        "## Environment", "",
        f"- Host: {host['host_cpu']}, {host['host_cpus']} CPUs, {host['host_mem_mb']:,} MB, "
        f"Linux {host['host_kernel']} (a VM whose PID 1 is not systemd)",
        f"- Container: {ct['os']}, {ct['systemd']}, {ct['python']} "
        "(systemd-nspawn, `--volatile=overlay`; tools/container.py); journal on the host's "
        "disk (ext4), persistent, no size cap",
        "- Host cgroups are v1 with a v2 `unified` tree: CPU figures are cgroup v2 "
        "`cpu.stat usage_usec` of the unit (every process it ever had), RSS is the sum of "
        "VmRSS of the unit's processes", "",
        notes.strip(), "",
        _safe_details(results), "",
        "## Reproduce", "",
        "```sh",
        "make bench                 # full run: writes bench/REPORT.md and bench/results.json",
        "BENCH_QUICK=1 make bench   # short run",
        "python3 -m bench.report    # REPORT.md again from results.json (after editing NOTES.md)",
        "```", "",
    ]
    return "\n".join(parts)


def main() -> int:
    results = json.loads((HERE / "results.json").read_text())
    (HERE / "REPORT.md").write_text(render(results))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
