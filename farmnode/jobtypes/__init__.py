"""Job types: how an assignment becomes one command line, and how that command's output is read.

A job type is a `farmnode.jobtypes.base.JobType` subclass registered under the entry-point group
``farmnode.jobtypes`` (see `farmnode.jobtypes.registry`). The agent builds one instance per
assignment, spawns the process described by `JobType.get_command_data()` inside the
assignment's scope, feeds every output line to `JobType.handle_line()` and asks
`JobType.is_successful()` when the process has ended. Job types never spawn, wait for or signal
processes themselves, and never talk to systemd, journald or the master: task state and progress
go through the `TaskReporter` the agent hands in.

Modules: base (the contract), registry (entry-point lookup), command, fakerender, blender (the
shipped job types), fakerender_cmd (the ``farmnode-fakerender`` test renderer; standard
library only, so it starts fast), remote and remote_host (job types downloaded from the
master: cached, and run inside the task's scope as its user, never in the agent), pyfarm
(PyFarm's ``pyfarm.jobtypes…`` import paths for such job types, used by remote_host only).

May import: farmnode.tasks (model, schema), farmnode.config and farmnode.pathmap only. This
``__init__`` deliberately imports nothing, because the ``farmnode-fakerender`` console script
imports the package on every start.
"""
