"""Admission: the checks an assignment passes before its run starts (no overlap with a
running one, an account the rules allow, RAM and CPUs, GPUs), and the node's resource
figures they compare against.

It holds no state of its own: `Admission` is handed what the checks read (the configuration
as it is now, the GPU pool, the runs) and is made afresh for each assignment. It may import
farmnode.agent's accounts, gpus, runner and errors, farmnode.config and farmnode.tasks; never
farmnode.agent.core, which calls it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import psutil

from farmnode.agent import accounts
from farmnode.agent.errors import InvalidAssignment, NotEnoughResources, PartialOverlap
from farmnode.agent.gpus import FIELD as GPUS_FIELD
from farmnode.agent.gpus import GpuPool, GpuRequestError, requested
from farmnode.agent.runner import AssignmentRun
from farmnode.agent.runsetup import task_user_rules
from farmnode.config import Config
from farmnode.config.model import jobtype_counts
from farmnode.tasks.model import Assignment
from farmnode.tasks.schema import AssignmentError


def total_ram_mb(config: Config) -> int:
    if isinstance(config.agent_ram, int):
        return config.agent_ram
    return psutil.virtual_memory().total // (1024 * 1024)


def total_cpus(config: Config) -> float:
    if isinstance(config.agent_cpus, (int, float)):
        return float(config.agent_cpus)
    return float(len(os.sched_getaffinity(0)))


def free_ram_mb() -> int:
    return psutil.virtual_memory().available // (1024 * 1024)


def slice_memory_max_mb(config: Config) -> int:
    """What all tasks together may use: the node less the reserve for the OS and agent."""
    physical = psutil.virtual_memory().total // (1024 * 1024)
    return min(total_ram_mb(config), physical - config.node_reserve_ram)


def gpus_held(runs: Mapping[str, AssignmentRun]) -> dict[str, tuple[str, ...]]:
    return {aid: run.gpu_ids for aid, run in runs.items() if run.gpu_ids}


@dataclass(frozen=True)
class Admission:
    """What the checks read: the configuration, the node's GPUs, the runs of the agent."""

    config: Config
    gpu_pool: GpuPool
    runs: Mapping[str, AssignmentRun]

    def repeat_of(self, a: Assignment) -> str | None:
        """The id of the running assignment `a` repeats (PyFarm accepts an identical
        repeat); PartialOverlap when it shares only some tasks with one."""
        new_ids = set(a.task_ids)
        for run in self.runs.values():
            running_ids = set(run.assignment.task_ids)
            common = new_ids & running_ids
            if not common:
                continue
            if running_ids == new_ids and run.assignment.job.id == a.job.id:
                return run.assignment.id  # PyFarm: an identical repeat is accepted
            raise PartialOverlap(sorted(common))
        return None

    def check_unit_free(self, a: Assignment, unit: str) -> None:
        """Refuse an assignment whose scope a running one holds (same first task)."""
        if any(r.unit == unit for r in self.runs.values()):
            raise PartialOverlap([a.tasks[0].id])

    def check_resources(self, a: Assignment) -> None:
        ceiling = slice_memory_max_mb(self.config)
        if a.job.ram_max is not None and a.job.ram_max > ceiling:
            raise InvalidAssignment(AssignmentError(
                "job.ram_max", f"{a.job.ram_max} MB is more than this node gives tasks "
                f"({ceiling} MB: RAM less node_reserve_ram)"))
        if a.job.ram is not None:
            reserved = sum(r.assignment.job.ram or 0 for r in self.runs.values())
            available = min(free_ram_mb(), total_ram_mb(self.config) - reserved, ceiling)
            if a.job.ram > available:
                # PyFarm's answer (the master reads agent_ram/requires_ram), naming the field
                raise NotEnoughResources("ram", available, a.job.ram)
        if a.job.cpus is not None and a.job.cpus > total_cpus(self.config):
            raise NotEnoughResources("cpus", total_cpus(self.config), a.job.cpus)

    def pick_gpus(self, a: Assignment) -> tuple[str, ...]:
        """The GPUs the assignment gets; refuses one that can never fit here (400 naming the
        field) and one that does not fit now (PyFarm's "Not enough" answer: the master's
        scheduler offers the work again later)."""
        try:
            count = requested(a, jobtype_counts(self.config.task_gpus))
        except GpuRequestError as exc:
            raise InvalidAssignment(AssignmentError(GPUS_FIELD, str(exc))) from None
        if count == 0:
            return ()
        total = len(self.gpu_pool.gpus)
        if count > total:
            raise InvalidAssignment(AssignmentError(
                GPUS_FIELD, f"asks for {count} GPUs; this node has {total}"
                + (f" ({', '.join(g.fullname for g in self.gpu_pool.gpus)})" if total else "")))
        free = self.gpu_pool.free(i for ids in gpus_held(self.runs).values() for i in ids)
        if count > len(free):
            raise NotEnoughResources("gpus", len(free), count, GPUS_FIELD)
        return tuple(g.ident for g in free[:count])

    def check_user(self, a: Assignment) -> None:
        """Refuse now (4xx) an assignment whose account the rule forbids; the run checks the
        account the job type finally picks again."""
        name = a.job.user or self.config.task_default_user
        try:
            account = accounts.lookup(name)
        except accounts.UnknownAccount:
            return  # the run fails its tasks saying so (NSS may know the user by then)
        refused = accounts.refusal(account, task_user_rules(self.config))
        if refused:
            raise InvalidAssignment(AssignmentError(
                "job.user", refused if a.job.user else f"{refused} (task_default_user)"))
