"""What a run is set up with before its shim starts: the name and limits of its scope, and
the account its task runs as (or why it cannot run).

Plain functions of the assignment, the job type's command and the configuration; the run
(farmnode.agent.runner), admission and recovery use them. It may import farmnode.agent's
accounts, farmnode.config, farmnode.jobtypes.base, farmnode.systemd.scope and
farmnode.tasks.model.
"""

from __future__ import annotations

from farmnode.agent import accounts
from farmnode.config import Config
from farmnode.jobtypes.base import CommandData
from farmnode.systemd.scope import ScopeLimits
from farmnode.tasks.model import Assignment

MB = 1024 * 1024


def scope_unit_name(assignment: Assignment) -> str:
    # Named after the first task so `journalctl -u farmnode-task-<id>.scope` works for the
    # common batch-of-one; every line also carries FARMNODE_TASK for each task of a batch
    # (farmnode.systemd.journal).
    return f"farmnode-task-{assignment.tasks[0].id}.scope"


def limits_for(assignment: Assignment, config: Config) -> ScopeLimits:
    job = assignment.job
    memory_max_mb: int | None
    if job.ram_max is not None:
        memory_max_mb = job.ram_max
    elif job.ram is not None:
        memory_max_mb = job.ram + config.task_ram_headroom
    else:
        memory_max_mb = config.task_default_ram_max
    memory_max = memory_max_mb * MB if memory_max_mb is not None else None
    return ScopeLimits(
        memory_max=memory_max,
        memory_high=int(memory_max * config.task_memory_high_ratio) if memory_max else None,
        memory_swap_max=config.task_swap_max * MB,
        cpu_quota_per_sec_usec=int(job.cpus * 1_000_000) if job.cpus else None,
        allowed_cpus=config.task_allowed_cpus,
        tasks_max=config.task_tasks_max,
        io_weight=config.task_io_weight,
    )


class TaskSetupError(Exception):
    """The task cannot start (bad user, job type error): fail its tasks with this reason."""


def task_user_rules(config: Config) -> accounts.TaskUserRules:
    return accounts.rules_for(config.task_min_uid, config.task_system_users)


def resolve_identity(command: CommandData, config: Config) -> accounts.Account:
    """The account the task runs as, or TaskSetupError naming the user and the rule."""
    try:
        account = accounts.lookup(command.user or config.task_default_user, command.group)
    except accounts.UnknownAccount as exc:
        raise TaskSetupError(str(exc)) from None
    refused = accounts.refusal(account, task_user_rules(config))
    if refused:
        raise TaskSetupError(refused)
    return account
