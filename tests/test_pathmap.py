"""Site path mapping: the rules' syntax and refusals, where they apply (the job's data, job
types' map_path, job types from the master in their in-scope host), and the config key."""

from __future__ import annotations

import os
import pwd
import subprocess
from pathlib import Path
from typing import Any

import pytest

from farmnode.config import ConfigError, load_config
from farmnode.jobtypes.base import JobType
from farmnode.jobtypes.blender import BlenderJobType
from farmnode.jobtypes.remote import cache_store, remote_jobtype_class
from farmnode.pathmap import map_data, map_path, parse_rules
from farmnode.tasks.model import Assignment, TaskState
from farmnode.tasks.schema import parse_assignment

SITE = ["Z:\\ => /mnt/projects", "//filer/proj => /mnt/filer",
        "/Volumes/projects/shots => /mnt/shots", "/Volumes/projects => /mnt/projects-mac"]


class Recorder:
    def set_task_state(self, task_id: int, state: TaskState, reason: str | None = None) -> None:
        pass

    def set_task_progress(self, task_id: int, progress: float) -> None:
        pass


def assignment(jobtype: str, data: dict[str, Any]) -> Assignment:
    me = pwd.getpwuid(os.getuid()).pw_name
    return parse_assignment({"job": {"id": 7, "by": 1, "data": data, "user": me},
                             "jobtype": {"name": jobtype, "version": 1},
                             "tasks": [{"id": 70, "frame": 1}]}, "a-7")


@pytest.mark.parametrize(("path", "mapped"), [
    ("Z:\\shots\\010\\beauty.exr", "/mnt/projects/shots/010/beauty.exr"),
    ("z:/shots/010", "/mnt/projects/shots/010"),  # drive letters and slashes as Windows has them
    ("Z:\\", "/mnt/projects/"),  # a trailing separator stays: an output prefix keeps it
    ("\\\\FILER\\Proj\\lib\\tex.png", "/mnt/filer/lib/tex.png"),  # UNC, any case
    ("/Volumes/projects/shots/a.blend", "/mnt/shots/a.blend"),  # the longest source wins
    ("/Volumes/projects/assets", "/mnt/projects-mac/assets"),
    ("/Volumes/projects", "/mnt/projects-mac"),
    ("/Volumes/projectsX/a", "/Volumes/projectsX/a"),  # a source is a whole leading part
    ("/volumes/projects/a", "/volumes/projects/a"),  # POSIX paths keep their case
    ("/mnt/projects/shots/a", "/mnt/projects/shots/a"),  # mapped once is mapped for good
    ("relative/path", "relative/path"),
])
def test_rules_map_a_path(path: str, mapped: str) -> None:
    assert map_path(path, parse_rules(SITE)) == mapped


def test_rules_apply_to_every_string_of_the_job_data_and_nothing_else() -> None:
    rules = parse_rules(SITE)
    data = {"scene": "Z:\\s\\a.blend", "layers": ["//filer/proj/x", "beauty"], "frames": 4,
            "nested": {"out": "/Volumes/projects/o", "Z:\\key": True}}
    assert map_data(data, rules) == {
        "scene": "/mnt/projects/s/a.blend", "layers": ["/mnt/filer/x", "beauty"], "frames": 4,
        "nested": {"out": "/mnt/projects-mac/o", "Z:\\key": True}}
    assert data["scene"] == "Z:\\s\\a.blend"  # a copy: the stored assignment keeps its own


@pytest.mark.parametrize(("rules", "message"), [
    (["Z:\\ /mnt/p"], "each rule must be SOURCE => TARGET, got 'Z:\\\\ /mnt/p'"),
    (["Z:\\ => "], "both sides of => must be a path"),
    (["Z:\\ => mnt/p"], "must be an absolute path on this node"),
    (["/ => /mnt/p"], "the whole file system"),
    (["Z:\\a => /mnt/a", "z:/a/ => /mnt/b"], "two rules for 'z:/a/': '/mnt/a' and '/mnt/b'"),
    (["/mnt => /mnt/projects"], "the target '/mnt/projects' would be mapped again by '/mnt'"),
    (["Z:\\ => /a", "/a => /b"], "the target '/a' would be mapped again by '/a' => '/b'"),
])
def test_bad_rules_are_refused_by_name(rules: list[str], message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_rules(rules)
    assert message in str(info.value)


def test_a_rule_that_does_not_parse_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "farmnode.yaml"
    path.write_text("master: m\njobtype_path_map:\n  - 'Z:\\ => /mnt/projects'\n"
                    "  - 'Y:\\ -> /mnt/y'\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert str(info.value).startswith(f"{path}:2: jobtype_path_map: "), str(info.value)
    assert "each rule must be SOURCE => TARGET, got 'Y:\\\\ -> /mnt/y'" in str(info.value)


def test_the_config_key_holds_the_rules(tmp_path: Path) -> None:
    path = tmp_path / "farmnode.yaml"
    path.write_text("jobtype_path_map: ['Z:\\ => /mnt/projects', '//filer/p => /mnt/p']\n")
    value = load_config(path, environ={}).jobtype_path_map
    assert parse_rules(value.split(",")) == parse_rules(["Z:\\ => /mnt/projects",
                                                         "//filer/p => /mnt/p"])


def test_a_shipped_job_type_sees_mapped_data_and_maps_what_it_builds() -> None:
    rules = parse_rules(SITE)
    a = assignment("blender", {"file": "Z:\\shots\\010.blend", "output": "//filer/proj/out/"})
    cmd = BlenderJobType(a, Recorder(), path_map=rules).get_command_data()
    assert "/mnt/projects/shots/010.blend" in cmd.arguments
    assert any(arg.startswith("/mnt/filer/out/") for arg in cmd.arguments), cmd.arguments
    jt: JobType = BlenderJobType(a, Recorder(), path_map=rules)
    assert jt.map_path("Z:\\lib\\$FARMNODE_JOB") == "/mnt/projects/lib/7"
    # Without rules nothing is rewritten.
    assert "Z:\\shots\\010.blend" in BlenderJobType(a, Recorder()).get_command_data().arguments


NATIVE = '''
from farmnode.jobtypes.base import JobType

class Paths(JobType):
    name = "paths"

    def get_command_data(self):
        return self.make_command_data("/bin/echo", [self.job.data["scene"],
                                                    self.map_path("//filer/proj/tex")])
'''

PYFARM = '''
from pyfarm.jobtypes.core.jobtype import JobType

class Paths(JobType):
    def get_command_data(self):
        data = self.assignment["job"]["data"]
        return self.COMMAND_DATA("/bin/echo", data["scene"], self.map_path("//filer/proj/tex"),
                                 user=data["user"])
'''


@pytest.mark.parametrize("code", [NATIVE, PYFARM], ids=["native", "pyfarm"])
def test_job_types_from_the_master_map_in_their_host(tmp_path: Path, code: str) -> None:
    # The host runs in the task's scope, in a process of its own: the rules travel with it.
    path = cache_store(tmp_path, "paths", 1, "Paths", code)
    me = pwd.getpwuid(os.getuid()).pw_name
    a = assignment("paths", {"scene": "Z:\\shots\\a.blend", "user": me})
    jt = remote_jobtype_class(path, "Paths")(a, Recorder(), path_map=parse_rules(SITE))
    cmd = jt.get_command_data()
    proc = subprocess.run([cmd.command, *cmd.arguments], capture_output=True, text=True,
                          timeout=60, env=cmd.env)
    assert proc.returncode == 0, proc.stderr
    assert "/mnt/projects/shots/a.blend /mnt/filer/tex" in proc.stdout, proc.stdout
