"""Warm per-job processes: one persistent interpreter per job on this node, reused by the
job's assignments (Qube's PyCmdDispatcher, PyFarm's spawn_persistent_process).

wire: the framings between the parts; executor: runs commands inside the interpreter;
host: owns the interpreter in the job's warm scope; client: a task's command, talks to the
host from the task's scope; manager: the agent's side (start, reuse, stop); jobtype: the
job type contract for job types that want one.
"""
