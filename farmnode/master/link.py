"""The master sync loop: announce, reannounce, deliver the outbox, say offline at stop.

One coroutine does all sending, so requests leave one at a time and in a fixed order: a
reannounce first when one is due, then outbox reports (oldest first, which keeps every
task's reports in order). PyFarm's master fails every task it has sent us (`sent_to_agent`)
that a (re)announce does not list, so:

- `current_assignments` lists every active assignment and every finished one whose reports
  the master has not all answered: until then it may still think the task is ours.
- A finished assignment leaving the list is no reason to reannounce (PyFarm's agent does
  not either): that reannounce would race the scheduler's next assign, which it sends as
  soon as it hears `done`. It leaves with the next reannounce that is due anyway.
- The agent's state change at the end of a task (running → online) is reannounced before
  the task's `done` report goes, as PyFarm's agent does: the master hands out the next task
  only after `done`, so that reannounce cannot race it.
- While a (re)announce is out, its body may lack an assignment accepted meanwhile, and the
  master would fail that task when it reads the body: the agent refuses assigns (503, PyFarm's
  answer; the master re-sends the task when our reannounce shows it missing and unsent).

Delivery: a report leaves the outbox only after the master answered 2xx, or 4xx (the master
refused it and always will; PyFarm gives up on 4xx too) — so a crash or a restart at any
point re-sends at most the report that was in flight, and every report body is a state, not
a delta, so delivering it twice has the effect of delivering it once. 5xx and network errors
pause all sending for a jittered exponential backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any, Protocol

from farmnode import __version__
from farmnode.config import Config
from farmnode.master import protocol
from farmnode.master.http import MasterHTTP, Response, TransportError
from farmnode.master.timesync import time_offset
from farmnode.sysinfo import HostFacts, collect
from farmnode.tasks import tasklog
from farmnode.tasks.store import Store

log = logging.getLogger(__name__)

# Reports read from the outbox per SQLite query while draining it.
BATCH = 100


class AgentView(Protocol):
    """What the link reads from the agent core (farmnode.agent.core.Agent)."""

    @property
    def agent_id(self) -> str: ...

    @property
    def state(self) -> str: ...

    @property
    def task_listeners(self) -> list[Callable[[Any], None]]: ...

    @property
    def state_listeners(self) -> list[Callable[[Any], None]]: ...

    def free_ram_mb(self) -> int: ...

    def total_ram_mb(self) -> int: ...

    def total_cpus(self) -> float: ...


class _Retry(Exception):
    """The master is unreachable or failing (5xx, network): back off, then try again."""


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


def _body_text(resp: Response) -> str:
    # The master's whole answer, bounded: a hostile or broken master must not flood the log.
    return repr(resp.body)[:500]


def _valid_agent_id(body: object) -> str | None:
    """The agent id of an announce reply, canonical, or None unless it is a UUID (PyFarm's
    master keys agents by UUID)."""
    if not isinstance(body, dict):
        return None
    raw = body.get("id")
    if not isinstance(raw, str) or len(raw) > 64:
        return None
    try:
        return str(uuid.UUID(raw))
    except ValueError:
        return None


@dataclass
class LinkCounters:
    requests: int = 0
    reports_sent: int = 0
    reports_dropped: int = 0
    reannounces: int = 0


class MasterLink:
    def __init__(self, config: Config, store: Store, agent: AgentView, *,
                 facts: Callable[[], Awaitable[HostFacts]] = collect,
                 log_output: tasklog.OutputSource | None = None,
                 request_timeout: float = 30.0) -> None:
        if not config.master_api:
            raise ValueError("MasterLink needs master_api (no master: run standalone)")
        self.config = config
        self.store = store
        self.agent = agent
        self.http = MasterHTTP(config.master_api, timeout=request_timeout)
        self._facts = facts
        # The job's output for a task log (journald, from the agent); None: logs carry only
        # the agent's own lines.
        self._log_output = log_output
        # The id the master knows us by; PyFarm takes it from the announce reply.
        self.master_agent_id = agent.agent_id
        self.announced = False
        self.last_contact: float | None = None
        self.last_announce: float | None = None
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.counters = LinkCounters()
        self.time_offset = 0
        self._wake = asyncio.Event()
        self._send_lock = asyncio.Lock()
        self._force_reason: str | None = None
        self._announced_assignments: set[str] = set()
        self._ram_reported: int | None = None
        self._ram_reported_at = 0.0
        self._reannounced_at = 0.0  # last (re)announce answered, accepted or not
        self._failures = 0
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        # Set when a (re)announce body is built, cleared when the master has answered one:
        # an assign accepted in between might be missing from what the master reads.
        # A request with no answer (timeout, reset) may still reach the master later, so
        # only an answered one clears it.
        self._view_in_flight = False
        self._offline_told = False

    # ---- inputs (agent core listeners; the HTTP API for master contact) --------------------
    def start(self) -> None:
        self.agent.task_listeners.append(self._on_task)
        self.agent.state_listeners.append(self._on_state)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="master-link")

    def _on_task(self, change: Any) -> None:
        self._wake.set()
        if getattr(getattr(change, "state", None), "finished", False):
            # The core forgets a finished assignment a moment after its last task state (and
            # tells no one unless the agent's state changes): look again shortly.
            loop = asyncio.get_running_loop()
            for delay in (0.2, 1.0, 5.0):
                loop.call_later(delay, self._wake.set)

    def _on_state(self, state: Any) -> None:
        self.force_reannounce(f"state {state}")

    def force_reannounce(self, reason: str) -> None:
        self._force_reason = self._force_reason or reason
        self._wake.set()

    def note_master_contact(self) -> None:
        """The master called us (its User-Agent): it has heard from us recently enough."""
        self.last_contact = time.time()

    def assign_refusal(self) -> str | None:
        """Why an assign must be refused now (503), or None."""
        if self._view_in_flight:
            return "reannouncing to the master; try again"
        return None

    # ---- status (GetStatus) --------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        link = {
            "master": self.config.master_api,
            "agent_id": self.master_agent_id,
            "announced": self.announced,
            "last_contact": _iso(self.last_contact),
            "last_announce": _iso(self.last_announce),
            "queued_reports": self.store.pending_count(),
            "last_error": self.last_error,
            "last_error_at": _iso(self.last_error_at),
            "time_offset": self.time_offset,
            "requests": self.counters.requests,
            "reports_sent": self.counters.reports_sent,
            "reports_dropped": self.counters.reports_dropped,
        }
        # PyFarm's GET /status names these two at the top level.
        return {"master_link": link, "last_master_contact": link["last_contact"],
                "last_announce": link["last_announce"]}

    # ---- job types -------------------------------------------------------------------------
    async def fetch_jobtype(self, name: str, version: int) -> dict[str, Any] | str:
        """PyFarm's GET /jobtypes/<name>/versions/<version>: {name, version, classname,
        code, ...}, or why the master did not serve it (also kept as last_error)."""
        path = f"/jobtypes/{urllib.parse.quote(name, safe='')}/versions/{int(version)}"
        async with self._send_lock:
            self.counters.requests += 1
            try:
                resp = await self.http.request("GET", path)
            except TransportError as exc:
                self._error(f"GET {path}: {exc}")
                return f"GET {path}: {exc}"
        if resp.ok and isinstance(resp.body, dict):
            self.last_contact = time.time()
            return resp.body
        self._error(f"GET {path}: {resp.error_text()}")
        return f"GET {path}: {resp.error_text()}"

    # ---- sending ---------------------------------------------------------------------------
    async def _post(self, path: str, body: dict[str, Any], timeout: float | None = None,
                    ) -> Response:
        async with self._send_lock:
            self.counters.requests += 1
            try:
                resp = await self.http.request("POST", path, body, timeout=timeout)
            except TransportError as exc:
                self._error(f"POST {path}: {exc}")
                raise _Retry(str(exc)) from None
        if resp.ok:
            self.last_contact = time.time()
            self._failures = 0
        elif resp.status >= 500:
            self._error(f"POST {path}: {resp.error_text()}")
            raise _Retry(resp.error_text())
        return resp

    def _agent_path(self) -> str:
        return f"/agents/{urllib.parse.quote(self.master_agent_id, safe='')}"

    def _error(self, text: str) -> None:
        self.last_error, self.last_error_at = text, time.time()

    def _current_assignments(self) -> dict[str, Any]:
        """Active assignments, and finished ones whose reports are still queued."""
        listed = self.store.active_assignments()
        seen = {a.id for a in listed}
        for aid in self.store.assignments_with_pending_reports():
            if aid not in seen and (a := self.store.assignment(aid)) is not None:
                listed.append(a)
                seen.add(aid)
        out = {}
        for a in listed:
            states = {r.id: str(r.state) for r in self.store.tasks(a.id)}
            out[a.id] = protocol.assignment_json(a, states)
        return out

    async def _post_view(self, path: str, body: dict[str, Any]) -> Response:
        """POST a body carrying current_assignments, built just before with no await between;
        assigns are refused until the master has answered (see the module's docstring)."""
        self._view_in_flight = True
        # _Retry (no answer, or a 5xx, which may come after the master's handler had
        # committed) leaves the flag set: refused until a later one is answered.
        resp = await self._post(path, body)
        self._view_in_flight = False
        return resp

    async def _announce(self) -> None:
        facts = await self._facts()
        self._force_reason = None  # the announce carries everything
        assignments = self._current_assignments()
        body = protocol.announce_body(
            agent_id=self.agent.agent_id, facts=facts, version=__version__,
            port=self.config.agent_api_port, state=str(self.agent.state),
            ram=self.agent.total_ram_mb(), cpus=self.agent.total_cpus(),
            free_ram=self.agent.free_ram_mb(), time_offset=self.time_offset,
            current_assignments=assignments, remote_ip=self.config.agent_ip_remote,
            farm_name=self.config.farm_name,
            hostname=None if self.config.agent_hostname == "auto" else self.config.agent_hostname)
        resp = await self._post_view("/agents/", body)
        if not resp.ok:
            self._error(f"announce refused: {resp.error_text()}")
            log.error("the master refused our announce (%s); asking again in %gs",
                      resp.error_text(), self.config.agent_master_reannounce)
            return
        agent_id = _valid_agent_id(resp.body)
        if agent_id is None:
            # The id goes into every later URL: one we cannot parse is an announce that did
            # not happen. Say what the master sent and try again after a backoff, like a 5xx.
            body_text = repr(resp.body)[:500]
            self._error(f"announce answered {resp.status} without a valid agent id: "
                        f"{body_text}")
            log.error("the master answered our announce with %d but no valid agent id: %s",
                      resp.status, body_text)
            raise _Retry("announce reply without a valid agent id")
        self.master_agent_id = agent_id
        self.announced = True
        self.last_announce = time.time()
        self._after_announce(body["free_ram"], assignments)
        log.info("announced to %s as %s (%s)", self.config.master_api, self.master_agent_id,
                 "created" if resp.status == 201 else "updated")

    def _after_announce(self, free_ram: int, assignments: dict[str, Any]) -> None:
        self._reannounced_at = time.time()
        self._announced_assignments = set(assignments)
        self._ram_reported, self._ram_reported_at = free_ram, time.monotonic()

    async def _reannounce(self, reason: str) -> None:
        # Taken before the body is built: a change while the request is out forces another.
        forced, self._force_reason = self._force_reason, None
        assignments = self._current_assignments()
        body = protocol.reannounce_body(state=str(self.agent.state),
                                        free_ram=self.agent.free_ram_mb(),
                                        current_assignments=assignments)
        self.counters.reannounces += 1
        try:
            resp = await self._post_view(self._agent_path(), body)
        except _Retry:
            self._force_reason = self._force_reason or forced
            raise
        if resp.status == 404:
            log.warning("the master does not know agent %s: announcing again",
                        self.master_agent_id)
            self.announced = False
            await self._announce()
            return
        if not resp.ok:
            # A refused reannounce is not retried; the next one is due on schedule anyway.
            self._error(f"reannounce refused: {resp.error_text()}")
            log.error("the master refused our reannounce (%s): not retried",
                      resp.error_text())
        else:
            log.debug("reannounced (%s)", reason)
        self._after_announce(body["free_ram"], assignments)

    async def _drain(self, timeout: float | None = None, yield_to_reannounce: bool = False,
                     ) -> None:
        """Send every queued report, oldest first; raises _Retry when the master fails.
        `yield_to_reannounce`: return early once a reannounce is due, so a state change
        (e.g. running -> online at a task's end) reaches the master before the reports
        queued after it."""
        while True:
            reports = self.store.pending_reports(BATCH)
            if not reports:
                return
            for report in reports:
                if yield_to_reannounce and self._reannounce_reason() is not None:
                    return
                try:
                    req = protocol.report_request(report, self.master_agent_id)
                except (KeyError, TypeError, ValueError) as exc:
                    log.error("outbox %d (%s) cannot be sent (%s): dropped", report.seq,
                              report.kind, exc)
                    req = None
                resp = None
                if isinstance(req, protocol.LogUpload):
                    resp = await self._upload_log(req, timeout)
                elif req is not None:
                    resp = await self._post(req.path, req.body, timeout=timeout)
                if resp is None or req is None:
                    log.debug("outbox %d (%s): nothing to send", report.seq, report.kind)
                    self.store.ack_report(report.seq)
                    continue
                if resp.ok or (isinstance(req, protocol.Request) and resp.status in req.also_ok):
                    self.counters.reports_sent += 1
                else:
                    self.counters.reports_dropped += 1
                    self._error(f"report {report.seq} refused: {resp.error_text()}")
                    # The master will refuse it again: log what it said, drop it, go on.
                    what = (f"POST {req.path} {req.body}" if isinstance(req, protocol.Request)
                            else f"PUT {req.path}")
                    log.warning("the master refused report %d for task %s (%s): %d %s; "
                                "dropped", report.seq, report.task_id, what, resp.status,
                                _body_text(resp))
                self.store.ack_report(report.seq)

    # ---- task logs -------------------------------------------------------------------------
    async def _upload_log(self, req: protocol.LogUpload, timeout: float | None,
                          ) -> Response | None:
        """PUT an assignment's CSV, built from the record now (a retry builds it again, so a
        log uploaded after an outage or a restart is as complete as the record is). None
        when there is nothing to send (the record is gone)."""
        record = self.store.task_log(req.assignment_id)
        if record is None:
            return None
        spool = await asyncio.to_thread(self._spool_log, record)
        try:
            async with self._send_lock:
                self.counters.requests += 1
                try:
                    resp = await self.http.send_file("PUT", req.path, spool, "text/csv",
                                                     timeout=timeout)
                except TransportError as exc:
                    self._error(f"PUT {req.path}: {exc}")
                    raise _Retry(str(exc)) from None
        finally:
            spool.close()
        if resp.ok:
            self.last_contact = time.time()
            self._failures = 0
            log.info("uploaded task log %s", req.identifier)
        elif resp.status >= 500:
            self._error(f"PUT {req.path}: {resp.error_text()}")
            raise _Retry(resp.error_text())
        return resp

    def _spool_log(self, record: tasklog.TaskLogRecord) -> IO[bytes]:
        """The CSV in an unnamed temporary file (blocking: run in a thread): a log of any
        size costs the agent a bounded amount of memory, on the way out too."""
        output = self._log_output or (lambda _aid: ())
        max_bytes = self.config.task_log_max_size * 1024 * 1024
        spool = tempfile.TemporaryFile()  # noqa: SIM115 (closed by the caller)
        try:
            for row in tasklog.csv_rows(tasklog.build(record, output, max_bytes)):
                spool.write(row.encode("utf-8"))
            spool.flush()
            spool.seek(0)
        except BaseException:
            spool.close()
            raise
        return spool

    def _reannounce_reason(self) -> str | None:
        """Why a reannounce is due now; None if not (may note when to look again)."""
        if self._force_reason:
            return self._force_reason
        if {a.id for a in self.store.active_assignments()} - self._announced_assignments:
            # Only additions: see the module's docstring for why a removal waits.
            return "new assignment"
        if time.time() - self._heard() >= self.config.agent_master_reannounce:
            return "periodic"
        if self._ram_reported is not None:
            moved = abs(self.agent.free_ram_mb() - self._ram_reported)
            if (moved > self.config.agent_ram_report_delta
                    and time.monotonic() - self._ram_reported_at
                    >= self.config.agent_ram_max_report_frequency):
                return f"free RAM moved {moved} MB"
        return None

    def _heard(self) -> float:
        # PyFarm reannounces when the master has not heard from us for a while; a refused
        # reannounce counts as heard, or a master that refuses us would be asked in a loop.
        return max(self.last_contact or 0.0, self._reannounced_at)

    def _next_check(self) -> float:
        """Seconds until something may become due without a wake-up."""
        waits = [self.config.agent_ram_check_interval,
                 self._heard() + self.config.agent_master_reannounce - time.time()]
        if self._ram_reported is not None:
            waits.append(self._ram_reported_at + self.config.agent_ram_max_report_frequency
                         - time.monotonic())
        return max(0.05, min(waits))

    async def _sleep(self, seconds: float, wakeable: bool) -> None:
        if not wakeable:
            await asyncio.sleep(seconds)
            return
        try:
            async with asyncio.timeout(seconds):
                await self._wake.wait()
        except TimeoutError:
            pass

    async def _run(self) -> None:
        self.time_offset, source = await time_offset(self.config)
        log.info("master %s; time offset %ds (%s)", self.config.master_api, self.time_offset,
                 source)
        while not self._stopping:
            self._wake.clear()
            try:
                if not self.announced:
                    await self._announce()
                    if not self.announced:  # refused (4xx): ask again on schedule
                        await self._sleep(self.config.agent_master_reannounce, wakeable=False)
                        continue
                reason = self._reannounce_reason()
                if reason:
                    await self._reannounce(reason)
                    continue
                await self._drain(yield_to_reannounce=True)
                if self._reannounce_reason():
                    continue
            except _Retry as exc:
                self._failures += 1
                delay = protocol.backoff(self._failures, self.config.agent_http_retry_delay,
                                         self.config.agent_http_retry_max)
                log.warning("master unreachable (%s): %d report(s) queued, retry %d in %.1fs",
                            exc, self.store.pending_count(), self._failures, delay)
                # Not wakeable: new reports during an outage must not hammer the master.
                await self._sleep(delay, wakeable=False)
                continue
            await self._sleep(self._next_check(), wakeable=True)

    # ---- shutdown --------------------------------------------------------------------------
    async def _halt_loop(self, budget: float) -> None:
        """End the sync loop; a request in flight may finish first (its report is then
        acked, not sent twice)."""
        self._stopping = True
        if self._task is None:
            return
        try:
            async with asyncio.timeout(budget):
                await self._send_lock.acquire()
            self._send_lock.release()
        except TimeoutError:
            pass
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("master link failed")
        self._task = None

    async def go_offline(self) -> bool:
        """The first step of a real stop, before any task is stopped: end the loop and tell
        the master we are offline, retried within `agent_shutdown_timeout`. The master then
        releases our tasks and sends us nothing more; told the other way round (tasks
        requeued first, offline after), it hands them straight back. True if the master
        answered."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.agent_shutdown_timeout
        await self._halt_loop(self.config.agent_shutdown_timeout / 4)
        self._offline_told = await self._post_offline(deadline)
        return self._offline_told

    async def stop(self, timeout: float | None = None, offline: bool = True) -> None:
        """Deliver what is queued and (unless `offline` is False: the agent restarts and its
        tasks run on; or go_offline() already said it) say offline, all within
        `agent_shutdown_timeout`."""
        budget = self.config.agent_shutdown_timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        await self._halt_loop(budget / 2)
        try:
            if self.announced:
                with contextlib.suppress(_Retry):
                    await self._drain(timeout=max(0.1, deadline - loop.time()))
            if offline and not self._offline_told:
                await self._post_offline(deadline)
        finally:
            left = self.store.pending_count()
            if left:
                log.warning("%d report(s) stay queued for the master until next start", left)
            self.http.close()

    async def _post_offline(self, deadline: float) -> bool:
        loop = asyncio.get_running_loop()
        body = protocol.offline_body(free_ram=self.agent.free_ram_mb(),
                                     current_assignments=self._current_assignments())
        attempt = 0
        while (left := deadline - loop.time()) > 0:
            attempt += 1
            try:
                resp = await self._post(self._agent_path(), body, timeout=left)
            except _Retry:
                delay = protocol.backoff(attempt, self.config.agent_http_retry_delay,
                                         self.config.agent_http_retry_max)
                await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
                continue
            if resp.ok:
                log.info("told the master we are offline")
                return True
            log.warning("the master refused our offline state: %s", _body_text(resp))
            return False
        log.warning("could not tell the master we are offline within %gs",
                    self.config.agent_shutdown_timeout)
        return False
