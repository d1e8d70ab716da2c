"""What the agent's SubmitJobs and ListJobs D-Bus methods do.

The caller (`farmnode submit`) renders the Jinja itself — the template is the user's, and
runs with the user's rights and CPU — and sends the YAML with, per line, the source line it
came from. Here, at the agent's edge, the YAML is validated whole: with no master the jobs go
to the node's own queue, with one they are created on the master.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from farmnode.jobfile.master import MasterRefused, submit
from farmnode.jobfile.model import JobFile
from farmnode.jobfile.parse import JobFileError, parse_rendered
from farmnode.jobfile.queue import JobQueue, JobStore, listing
from farmnode.jobfile.render import Rendered

if TYPE_CHECKING:
    from farmnode.agent.core import Agent

log = logging.getLogger(__name__)

MAX_TEXT = 16 * 1024 * 1024
MAX_NAME = 4096
MAX_SUBMISSION = 128


class JobFiles:
    def __init__(self, agent: Agent, store: JobStore, master_api: str | None) -> None:
        self.agent = agent
        self.store = store
        self.master_api = master_api
        self.queue = JobQueue(agent, store) if master_api is None else None

    def start(self) -> None:
        if self.queue is not None:
            self.queue.start()

    def stop(self) -> None:
        if self.queue is not None:
            self.queue.stop()
        self.store.close()

    async def submit(self, name: str, text: str, source_lines: Sequence[int],
                     submission: str = "") -> list[dict[str, Any]]:
        """Validate and queue (or send to the master) a rendered job file; returns the jobs
        as `farmnode jobs` lists them. A submission token already stored returns its jobs
        and stores nothing. Raises JobFileError, MasterRefused, ValueError."""
        from farmnode.agent.core import InvalidArgument, NotAccepting
        from farmnode.jobtypes.registry import available_jobtypes

        if len(name) > MAX_NAME or not name.isprintable():
            raise InvalidArgument("job file name: must be printable, at most "
                                  f"{MAX_NAME} characters")
        if len(submission) > MAX_SUBMISSION or not submission.isprintable():
            raise InvalidArgument("submission token: must be printable, at most "
                                  f"{MAX_SUBMISSION} characters")
        if submission and (known := self.store.submitted(submission)) is not None:
            log.info("job file %s: submission %s is stored already (a retry); its %d job(s) "
                     "are not stored again", name, submission, len(known))
            return [j for j in self.listing() if j["id"] in known]
        if len(text) > MAX_TEXT:
            raise InvalidArgument(f"{name}: more than {MAX_TEXT} characters")
        lines = tuple(source_lines)
        if len(lines) != text.count("\n") + 1 or any(n < 1 for n in lines):
            lines = tuple(range(1, text.count("\n") + 2))  # the caller sent no usable map
        rendered = Rendered(text, lines)
        try:
            # In a thread: a large file takes a while, and the agent's loop serves its tasks.
            if self.master_api is None:
                jobfile = await asyncio.to_thread(parse_rendered, rendered, name,
                                                  available_jobtypes())
                ids = self.queue.submit(jobfile, submission) if self.queue else []
            else:  # the master says which job types it has
                jobfile = await asyncio.to_thread(parse_rendered, rendered, name)
                ids = await self._to_master(jobfile, submission)
        except JobFileError as exc:
            raise InvalidArgument(str(exc)) from None
        except MasterRefused as exc:
            raise NotAccepting(str(exc)) from None
        return [j for j in self.listing() if j["id"] in ids]

    async def _to_master(self, jobfile: JobFile, submission: str) -> list[int]:
        from farmnode.master.http import MasterHTTP

        assert self.master_api is not None
        # Short: the caller waits on D-Bus (25 s by default) for the whole file.
        http = MasterHTTP(self.master_api, timeout=10)
        try:
            done = await submit(jobfile, lambda m, p, b: http.request(m, p, b))
        except MasterRefused as exc:
            if exc.created:  # what the master holds now is on record here too
                partial = JobFile(jobfile.name, tuple(
                    j for j in jobfile.jobs if j.id in exc.created))
                self.store.add_file(partial, exc.created, submission)
                raise MasterRefused(f"{exc}; created before that: " + ", ".join(
                    f"{k} (master job {v})" for k, v in exc.created.items()),
                    exc.created) from None
            raise
        finally:
            http.close()
        return self.store.add_file(jobfile, done.created, submission)

    def listing(self) -> list[dict[str, Any]]:
        return listing(self.store)
