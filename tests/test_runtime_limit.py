"""task_max_runtime on the host: the run's own timer against a scope manager that only
records the stop (the system tier kills a real scope: tests/system/test_limits.py, and
freezes one past its limit: tests/system/test_workstation.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from pathlib import Path

from farmnode.agent.runner import AssignmentRun
from farmnode.config import Config
from farmnode.tasks.model import Assignment, Job, JobTypeRef, Task

LIMIT = 0.3


class Scopes:
    def __init__(self) -> None:
        self.stopped = asyncio.Event()

    async def stop_scope(self, unit: str) -> bool:
        self.stopped.set()
        return True


def make_run(tmp_path: Path, scopes: Scopes) -> AssignmentRun:
    a = Assignment(str(uuid.uuid4()), Job(id=1, by=1), JobTypeRef("command", 1),
                   (Task(42, 1.0),))
    config = dataclasses.replace(Config(), agent_runtime_dir=str(tmp_path),
                                 task_max_runtime=LIMIT)
    return AssignmentRun(a, config, scopes,  # type: ignore[arg-type]
                         lambda *_: None, lambda *_: None, lambda *_: None)


class Seen(logging.Handler):
    """Sets an event when the runner logs a message containing `text`."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text, self.event = text, asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()


def test_the_clock_counts_from_the_start_less_every_pause(tmp_path: Path) -> None:
    run = make_run(tmp_path, Scopes())
    run.started_at = 1000.0
    run.pause_clock(1010.0)
    assert run.ran_for(1020.0) == 10.0
    run.pause_clock(1015.0)  # paused again while paused: the first pause counts
    run.resume_clock(1030.0)
    assert run.ran_for(1040.0) == 20.0
    run.resume_clock(1050.0)  # not paused: nothing
    assert run.paused_for == 20.0


def test_a_run_paused_past_its_limit_is_not_killed_until_it_has_run_that_long(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        scopes = Scopes()
        run = make_run(tmp_path, scopes)
        seen = Seen("would have ended while it is paused")
        logger = logging.getLogger("farmnode.agent.runner")
        level = logger.level
        logger.addHandler(seen)
        logger.setLevel(logging.INFO)
        try:
            run._arm_timeout()
            run.pause_clock(run.started_at or 0.0)
            await asyncio.wait_for(seen.event.wait(), 10)
            assert run.timed_out is None and not scopes.stopped.is_set()
            loop = asyncio.get_running_loop()
            resumed = loop.time()
            run.resume_clock(time.time())
            await asyncio.wait_for(scopes.stopped.wait(), 10)
            # the whole limit ran after the resume: the pause gave none of it away
            assert loop.time() - resumed >= LIMIT * 0.9
            assert run.timed_out is not None and run.timed_out.startswith("timeout")
        finally:
            logger.removeHandler(seen)
            logger.setLevel(level)

    asyncio.run(scenario())


def test_a_run_that_ends_while_paused_is_not_armed_again_by_a_late_resume(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        run = make_run(tmp_path, Scopes())
        run._arm_timeout()
        run.pause_clock(1.0)
        run._disarm_timeout()  # the run concluded while paused
        run.resume_clock(2.0)
        assert run._timer is None

    asyncio.run(scenario())


def test_no_limit_no_timer(tmp_path: Path) -> None:
    async def scenario() -> None:
        run = make_run(tmp_path, Scopes())
        run.config = dataclasses.replace(run.config, task_max_runtime=None)
        run._arm_timeout()
        assert run._timer is None and run.started_at is None

    asyncio.run(scenario())
