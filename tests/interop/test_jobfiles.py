"""A job file submitted on a node with a master goes to PyFarm's own master: it stores the
jobs with their dependencies as `parents`, and its scheduler runs them, in that order, on
our agent."""

from __future__ import annotations

import json
import time

from tests.interop.conftest import Farm, wait_for

FILE = """\
jobs:
{% for name, deps in [('sim', []), ('render', ['sim']), ('comp', ['render'])] %}
  - id: {{ name }}
    title: "interop {{ name }} {{ stamp }}"
    jobtype: command
    data: {command: [/bin/sh, -c, "echo {{ name }} {frame}; sleep 1"]}
    start: 1
    end: 2
    dependencies: {{ deps }}
{% endfor %}
"""


def test_job_file_reaches_the_master_with_parents_and_runs_in_order(farm: Farm) -> None:
    t0 = time.monotonic()
    farm.jobtype("command")
    farm.node.run(["tee", "/tmp/jobs.yaml"], input=FILE)
    r = farm.node.run(["farmnode", "--json", "submit", "/tmp/jobs.yaml", "-D",
                       f"stamp={t0:.0f}"])
    created = {j["name"]: j["master_job_id"] for j in json.loads(r.stdout)}
    assert set(created) == {"sim", "render", "comp"} and all(created.values()), r.stdout

    # The master's own records: the dependencies are its parents.
    def parents(name: str) -> list[int]:
        return sorted(p["id"] for p in farm.job(created[name])["parents"])

    assert parents("sim") == []
    assert parents("render") == [created["sim"]]
    assert parents("comp") == [created["render"]]

    for name in ("sim", "render", "comp"):
        job = farm.wait_job(created[name], timeout=120)
        assert job["state"] == "done", job
    # Its scheduler held each job until its parent was done: our agent ran them in order.
    tasks = farm.node_tasks()
    spans = {}
    for name, job_id in created.items():
        mine = [t for t in tasks if t["job_id"] == job_id]
        assert sorted(t["frame"] for t in mine) == [1.0, 2.0], mine
        assert all(t["state"] == "done" for t in mine), mine
        spans[name] = (min(t["started"] for t in mine), max(t["finished"] for t in mine))
    assert spans["sim"][1] <= spans["render"][0] and spans["render"][1] <= spans["comp"][0], \
        spans
    listed = {j["name"]: j for j in json.loads(farm.node.run(["farmnode", "--json",
                                                              "jobs"]).stdout)}
    assert {n: j["master_job_id"] for n, j in listed.items()} == created

    # A job type the master lacks is refused with the line, before anything is created.
    farm.node.run(["tee", "/tmp/bad.yaml"], input=FILE.replace("command", "nosuchtype"))
    r = farm.node.run(["farmnode", "submit", "/tmp/bad.yaml", "-D", "stamp=x"], check=False)
    assert r.returncode == 1 and "/tmp/bad.yaml:3: job 'sim': jobtype: the master has no " \
        "job type 'nosuchtype'" in r.stderr, r.stderr
    wait_for("no new job on the master", lambda: len(farm.master.get("/jobs/")) == 3)
    print(f"\njob file through the real master: {time.monotonic() - t0:.1f} s")
