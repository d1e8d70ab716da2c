"""Job type sources written as PyFarm's documentation tells authors to (PyFarm's import
paths, task dicts, the line hooks), for the system tests with the test master and the real one.
"""

PYFARM_RENDER = r'''
import os
import re

from pyfarm.core.enums import WorkState
from pyfarm.jobtypes.core.jobtype import JobType

PROGRESS = re.compile(r"^frame (\d+) at (\d+)%$")


class ShellRender(JobType):
    def get_command_data(self):
        frames = " ".join(str(int(t["frame"])) for t in self.assignment["tasks"])
        script = ("for f in %s; do for p in 10 60 100; do echo \"frame $f at $p%%\"; done; "
                  "done; echo \"$GREETING\" >&2" % frames)
        env = self.get_environment()
        env["GREETING"] = self.expandvars("hello from $USER")
        return self.COMMAND_DATA("/bin/sh", "-c", script, env=env, cwd=self.tempdir())

    def format_stdout_line(self, protocol, stdout):
        return "[uid %d] %s" % (os.getuid(), stdout)

    def process_stdout_line(self, protocol, stdout):
        match = PROGRESS.search(stdout.split("] ", 1)[-1])
        if match is None:
            return
        for task in self.assignment["tasks"]:
            if int(task["frame"]) == int(match.group(1)):
                self.set_task_progress(task, int(match.group(2)) / 100.0)
                if match.group(2) == "100":
                    self.set_task_state(task, WorkState.DONE)
'''

PYFARM_PY2 = '''from pyfarm.jobtypes.core.jobtype import JobType


class Legacy(JobType):
    def get_command_data(self):
        print "assembling the command"
        return self.COMMAND_DATA("/bin/true")
'''

PYFARM_RAISES = '''from pyfarm.jobtypes.core.jobtype import JobType


class Strict(JobType):
    def get_command_data(self):
        raise ValueError("job data needs 'scene', got %r" % sorted(self.assignment["job"]["data"]))
'''
