"""A test master: a real HTTP server speaking the master side of PyFarm's agent protocol.

It keeps what a PyFarm master keeps (agents by id, tasks with state/progress/start time),
checks what a PyFarm master checks (unknown agent keys, resource ranges, the User-Agent that
decides `remote_ip`, task updates only from the owning agent's address, `time_started` only
"now"), records every request, and does on command what a real master does on a bad day:
answer 5xx, answer 4xx, stall, or vanish (port closed, open connections cut) and come back.

Tests wait on it instead of sleeping: `wait_for(predicate, timeout)` returns as soon as the
recorded requests satisfy the predicate.

Used by host tests (tests/test_master*.py), the container tests (tests/system/test_master.py)
and the fleet test; also runnable alone: `python3 tests/master_stub.py [port]`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

AGENT_UA = "PyFarm/1.0 (agent)"
# PyFarm 0.8.6's Agent model (GET /api/v1/agents/schema, pyfarm/models/agent.py): columns
# and relationships; plus what the API pops before validating. Anything else is a 400.
AGENT_COLUMNS = {
    "hostname", "notes", "remote_ip", "use_address", "os_class", "os_fullname", "ram",
    "free_ram", "cpus", "cpu_name", "port", "time_offset", "version", "upgrade_to",
    "restart_requested", "state", "last_heard_from", "last_polled",
    "ram_allocation", "cpu_allocation", "tasks", "tags", "software_versions",
    "mac_addresses", "gpus",
}
ANNOUNCE_EXTRA = {"id", "current_assignments", "farm_name"}
ANNOUNCE_REQUIRED = {"id", "hostname", "ram", "free_ram", "cpus", "port"}
TASK_KEYS = {"state", "progress", "time_started", "last_error", "agent_id"}
AGENT_STATES = {"online", "offline", "running", "disabled"}
TASK_STATES = {"queued", "running", "done", "failed", "paused"}
# PyFarm's TaskLog model (columns and relationships): what a log registration may carry.
TASKLOG_COLUMNS = {"id", "identifier", "agent_id", "created_on", "agent", "task_associations"}
# PyFarm's master parses POST/PUT bodies of these types itself (raw); JSON is decoded, any
# other type with a body is refused with 415 before a view runs.
RAW_MIMETYPES = {"application/x-www-form-urlencoded", "multipart/form-data", "application/zip",
                 "text/csv"}


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    body: Any
    user_agent: str
    peer: str
    at: float  # time.monotonic()
    status: int = 0
    content_type: str = ""

    @property
    def agent_id(self) -> str | None:
        parts = self.path.strip("/").split("/")
        if parts[:3] == ["api", "v1", "agents"]:
            return parts[3] if len(parts) > 3 and parts[3] else (self.body or {}).get("id")
        return None

    @property
    def task_id(self) -> int | None:
        parts = self.path.strip("/").split("/")
        if len(parts) == 6 and parts[:3] == ["api", "v1", "jobs"] and parts[4] == "tasks":
            return int(parts[5])
        return None

    @property
    def log(self) -> tuple[int, int, int, str | None] | None:
        """(job, task, attempt, identifier) of a call to a task attempt's logs."""
        parts = self.path.strip("/").split("/")
        if (len(parts) in (9, 10, 11) and parts[:3] == ["api", "v1", "jobs"]
                and parts[4] == "tasks" and parts[6] == "attempts" and parts[8] == "logs"
                and all(p.isdigit() for p in (parts[3], parts[5], parts[7]))
                and (len(parts) < 11 or parts[10] == "logfile")):
            return (int(parts[3]), int(parts[5]), int(parts[7]),
                    parts[9] if len(parts) > 9 else None)
        return None

    @property
    def kind(self) -> str:
        if self.task_id is not None:
            return "task"
        if self.log is not None:
            if self.path.endswith("/logfile"):
                return "log_upload"
            return "log_state" if self.log[3] else "log_register"
        if self.path.startswith("/api/v1/jobtypes/"):
            return "jobtype"
        if self.path.rstrip("/") == "/api/v1/agents":
            return "announce"
        if self.agent_id is not None:
            return "offline" if (self.body or {}).get("state") == "offline" else "reannounce"
        return "other"


@dataclass
class TaskLog:
    """A registered log: its associations (task, attempt) -> state, and the uploaded file."""

    identifier: str
    agent_id: str
    created_on: float
    associations: dict[tuple[int, int], str | None] = field(default_factory=dict)
    content: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"identifier": self.identifier, "agent_id": self.agent_id,
                "created_on": self.created_on, "id": hash(self.identifier) & 0xffff}


@dataclass
class Task:
    id: int
    job_id: int
    agent_id: str | None
    state: str | None = None
    progress: float = 0.0
    time_started: float | None = None
    last_error: str | None = None
    history: list[str] = field(default_factory=list)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    stub: MasterStub


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a real master behind a WSGI server
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.server.stub._connections.add(self.connection)

    def finish(self) -> None:
        self.server.stub._connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def _handle(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        mimetype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        body: Any = None
        bad: tuple[int, Any] | None = None
        if mimetype == "application/json" and raw:
            try:
                body = json.loads(raw)
            except ValueError:
                bad = 400, {"error": "failed to decode json"}
        elif raw:
            body = raw.decode(errors="replace")
            if method in ("POST", "PUT") and mimetype not in RAW_MIMETYPES:
                bad = 415, {"error": f"Unsupported media type {mimetype!r}"}
        status, reply = self.server.stub._dispatch(
            method, self.path, body, self.headers.get("User-Agent", ""), self.client_address[0],
            mimetype, bad)
        if status == 0:  # vanished mid-request: no answer at all
            self.close_connection = True
            return
        data = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        self._handle("POST")

    def do_GET(self) -> None:
        self._handle("GET")

    def do_PUT(self) -> None:
        self._handle("PUT")


class MasterStub:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, *,
                 allow_loopback: bool = True, farm_name: str | None = None) -> None:
        self.host = host
        self.port = port
        self.allow_loopback = allow_loopback
        self.farm_name = farm_name
        self.requests: list[Request] = []
        self.agents: dict[str, dict[str, Any]] = {}
        self.tasks: dict[int, Task] = {}
        self.task_logs: dict[str, TaskLog] = {}
        # (name, version as text) -> PyFarm's job type record, served to agents that ask
        self.jobtypes: dict[tuple[str, str], dict[str, Any]] = {}
        # Behaviour: "ok", "fail" (503), "reject" (400) or "stall" (hold the request).
        self.mode = "ok"
        # Per-request override: return (status, body) to answer that instead.
        self.override: Callable[[Request], tuple[int, Any] | None] | None = None
        self._cond = threading.Condition()
        self._unstall = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()

    # ---- lifecycle ------------------------------------------------------------------------
    def start(self) -> MasterStub:
        self._server = _Server((self.host, self.port), _Handler)
        self._server.stub = self
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def vanish(self) -> None:
        """Close the port and cut every open connection: the master is gone."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._server = None
        for conn in list(self._connections):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._unstall.set()

    def reappear(self) -> None:
        self._unstall.clear()
        self.start()

    def stall(self) -> None:
        self._unstall.clear()
        self.mode = "stall"

    def release(self, mode: str = "ok") -> None:
        self.mode = mode
        self._unstall.set()

    def stop(self) -> None:
        self.vanish()

    def __enter__(self) -> MasterStub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- waiting --------------------------------------------------------------------------
    def wait_for(self, predicate: Callable[[list[Request]], bool], timeout: float = 30,
                 what: str = "") -> list[Request]:
        """Block until predicate(requests) holds; AssertionError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self.requests):
                left = deadline - time.monotonic()
                if left <= 0:
                    kinds = [(r.kind, r.status) for r in self.requests[-20:]]
                    raise AssertionError(f"test master: timed out waiting for {what or predicate}"
                                         f"; last requests {kinds}")
                self._cond.wait(min(left, 0.5))
            return list(self.requests)

    def wait_count(self, kind: str, n: int, timeout: float = 30,
                   status: int | None = 200) -> list[Request]:
        """The first n requests of a kind (answered `status`, any if None)."""
        def match(rs: list[Request]) -> bool:
            return len(self.of(kind, status, rs)) >= n
        self.wait_for(match, timeout, f"{n} {kind} request(s)")
        return self.of(kind, status)[:n]

    def of(self, kind: str, status: int | None = None,
           requests: list[Request] | None = None) -> list[Request]:
        rs = self.requests if requests is None else requests
        return [r for r in rs if r.kind == kind and (status is None or r.status == status
                                                     or (status == 200 and r.status == 201))]

    # ---- the master -----------------------------------------------------------------------
    def _dispatch(self, method: str, path: str, body: Any, ua: str, peer: str,
                  content_type: str = "", bad: tuple[int, Any] | None = None,
                  ) -> tuple[int, Any]:
        req = Request(method, path, body, ua, peer, time.monotonic(), 0, content_type)
        if self.mode == "stall":
            self._unstall.wait(120)
            if self._server is None:
                return 0, None
        status, reply = bad or self._answer(req)
        with self._cond:
            self.requests.append(Request(method, path, body, ua, peer, req.at, status,
                                         content_type))
            self._cond.notify_all()
        return status, reply

    def _answer(self, req: Request) -> tuple[int, Any]:
        if self.override is not None:
            forced = self.override(req)
            if forced is not None:
                return forced
        if self.mode == "fail":
            return 503, {"error": "test master: failing on command"}
        if self.mode == "reject":
            return 400, {"error": "test master: rejecting on command"}
        parts = req.path.strip("/").split("/")
        if req.method == "GET" and len(parts) == 6 and parts[:3] == ["api", "v1", "jobtypes"] \
                and parts[4] == "versions":
            # PyFarm's GET /jobtypes/<name>/versions/<version>: the job type's Python source
            found = self.jobtypes.get((parts[3], parts[5]))
            return (200, found) if found else (404, {"error": "no such job type version"})
        if req.log is not None and req.method in ("POST", "PUT"):
            with self._cond:
                return self._task_log(req, *req.log)
        if req.method != "POST" or not isinstance(req.body, dict):
            return 400, {"error": "expected a JSON object"}
        with self._cond:
            if parts == ["api", "v1", "agents"]:
                return self._announce(req)
            if len(parts) == 4 and parts[:3] == ["api", "v1", "agents"]:
                return self._update_agent(parts[3], req)
            if req.task_id is not None:
                return self._update_task(int(parts[3]), req.task_id, req)
        return 404, {"error": "no such endpoint"}

    def _check_ip(self, value: str) -> str | None:
        ip = ipaddress.ip_address(value)
        if ip.is_loopback and not self.allow_loopback:
            return f"{value} is a loopback address"
        if ip.is_link_local or ip.is_multicast:
            return f"{value} is not a usable address"
        return None

    def _announce(self, req: Request) -> tuple[int, Any]:
        data = dict(req.body)
        unknown = set(data) - AGENT_COLUMNS - ANNOUNCE_EXTRA
        if unknown:
            return 400, {"error": f"request contains field(s) that do not exist: {unknown}"}
        missing = ANNOUNCE_REQUIRED - set(data)
        if missing:
            return 400, {"error": f"request is missing field(s): {missing}"}
        try:
            agent_id = str(uuid.UUID(data["id"]))
        except (ValueError, TypeError, AttributeError):
            return 400, {"error": "`id` is not a UUID"}
        if req.user_agent == AGENT_UA:
            data.setdefault("remote_ip", req.peer)
        farm = data.pop("farm_name", None)
        if farm and farm != self.farm_name:
            return 400, {"error": "Wrong farm name"}
        if not 1 <= data["cpus"] <= 256 or not isinstance(data["cpus"], int):
            return 400, {"error": "value for `cpus` must be between 1 and 256"}
        if not 16 <= data["ram"] <= 262144:
            return 400, {"error": "value for `ram` must be between 16 and 262144"}
        if not 1024 <= data["port"] <= 65535:
            return 400, {"error": "value for `port` must be between 1024 and 65535"}
        if data.get("state", "online") not in AGENT_STATES:
            return 400, {"error": f"bad state {data.get('state')!r}"}
        if data.get("remote_ip") and (err := self._check_ip(data["remote_ip"])):
            return 400, {"error": err}
        if not all(isinstance(g, str) for g in data.get("gpus", [])):
            return 400, {"error": "gpus must be strings"}
        created = agent_id not in self.agents
        data.pop("current_assignments", None)
        agent = self.agents.setdefault(agent_id, {})
        agent.update(data, id=agent_id)
        return (201 if created else 200), agent

    def _update_agent(self, agent_id: str, req: Request) -> tuple[int, Any]:
        agent = self.agents.get(agent_id)
        if agent is None:
            return 404, {"error": f"Agent {agent_id} not found"}
        data = dict(req.body)
        if "remote_ip" not in data and req.user_agent == AGENT_UA:
            data["remote_ip"] = req.peer
        farm = data.pop("farm_name", None)
        if farm and farm != self.farm_name:
            return 400, {"error": "Wrong farm name"}
        current = data.pop("current_assignments", None)
        unknown = set(data) - AGENT_COLUMNS
        if unknown:
            return 400, {"error": f"Agent has no such column {unknown}"}
        if data.get("state") is not None and data["state"] not in AGENT_STATES:
            return 400, {"error": f"bad state {data['state']!r}"}
        agent.update(data)
        if current is not None and agent.get("state") != "offline":
            # PyFarm: a task the master thinks is ours that is missing here is failed.
            known = {t["id"] for a in current.values() for t in a["tasks"]}
            for t in self.tasks.values():
                if (t.agent_id == agent_id and t.id not in known
                        and t.state not in ("done", "failed")):
                    t.state = "failed"
                    t.history.append("failed (missing from current_assignments)")
        if agent.get("state") == "offline":
            for t in self.tasks.values():
                if t.agent_id == agent_id and t.state not in ("done", "failed"):
                    t.state, t.agent_id = None, None
        return 200, agent

    def _task(self, job_id: int, task_id: int, req: Request) -> Task | None:
        task = self.tasks.get(task_id)
        if task is None:
            # Our tests assign through the agent, not the master: the first report from an
            # agent's address makes the task that agent's, as if the master had assigned it.
            owner = next((a for a, d in self.agents.items() if d.get("remote_ip") == req.peer),
                         None)
            task = self.tasks[task_id] = Task(task_id, job_id, owner)
        # PyFarm looks a task up by (id, job_id): another job's task is not found
        return task if task.job_id == job_id else None

    def _task_log(self, req: Request, job_id: int, task_id: int, attempt: int,
                  identifier: str | None) -> tuple[int, Any]:
        """PyFarm's tasklogs API: register a log with a task attempt, upload its file, set
        the attempt's state on it — each only for a log registered with that attempt."""
        if req.method == "PUT" and identifier is None:
            return 405, {"error": "method not allowed"}
        if req.method == "POST" and identifier is None:
            # validate_with_model(TaskLog, type_checks={"agent_id": isuuid})
            if req.content_type != "application/json":
                return 415, {"error": f"Unsupported media type {req.content_type!r}"}
            if not isinstance(req.body, dict):
                return 400, {"error": "dictionary expected"}
            unknown = set(req.body) - TASKLOG_COLUMNS
            if unknown:
                return 400, {"error": f"request contains field(s) that do not exist: {unknown}"}
            if "identifier" not in req.body:
                return 400, {"error": "request is missing field(s): {'identifier'}"}
            ident = req.body["identifier"]
            if not isinstance(ident, str):
                return 400, {"error": "field 'identifier' has the wrong type"}
            if "agent_id" in req.body:
                try:
                    uuid.UUID(req.body["agent_id"])
                except (ValueError, TypeError, AttributeError):
                    return 400, {"error": "type check failed for 'agent_id'"}
        task = self._task(job_id, task_id, req)
        if task is None:
            return 404, {"error": "Specified task not found"}
        if req.method == "POST" and identifier is None:
            ident = req.body["identifier"]
            if "/" in ident or ident in ("", ".", ".."):
                return 400, {"error": "Identifier is not acceptable"}
            tlog = self.task_logs.get(ident)
            if tlog is not None and (task_id, attempt) in tlog.associations:
                return 409, {"error": "This log is already registered for this task."}
            if tlog is None:
                tlog = self.task_logs[ident] = TaskLog(ident, req.body.get("agent_id", ""),
                                                       time.time())
            tlog.associations[(task_id, attempt)] = None
            return 201, tlog.to_json()
        assert identifier is not None
        tlog = self.task_logs.get(identifier)
        if tlog is None:
            return 404, {"error": "Specified log not found"}
        if (task_id, attempt) not in tlog.associations:
            return 404, {"error": "Specified log not found in task"}
        if req.method == "PUT":
            # the raw body, whatever its type (Flask's request.data): the file on the master
            tlog.content = req.body if isinstance(req.body, str) else ""
            return 201, ""
        if not isinstance(req.body, dict):
            # PyFarm's view reads g.json unchecked: anything else is a 500 there
            return 500, {"error": "internal error: no JSON object"}
        if "state" in req.body:
            state = req.body["state"]
            if state not in TASK_STATES:
                return 500, {"error": f"internal error: {state!r} is not a WorkState"}
            tlog.associations[(task_id, attempt)] = None if state == "queued" else state
        if "identifier" in req.body:
            return 400, {"error": "The tasklog identifier cannot be changed"}
        if "created_on" in req.body:
            return 400, {"error": "The created_on timestampt cannot be changed"}
        return 200, tlog.to_json()

    def _update_task(self, job_id: int, task_id: int, req: Request) -> tuple[int, Any]:
        data = dict(req.body)
        task = self._task(job_id, task_id, req)
        if task is None:
            return 404, {"error": "Specified task not found"}
        unknown = set(data) - TASK_KEYS
        if unknown:
            return 400, {"error": f"Unknown columns in request: {unknown}"}
        if "time_started" in data and data["time_started"] != "now":
            return 400, {"error": "`time_started` cannot be set manually"}
        if ("state" in data or "progress" in data) and req.user_agent == AGENT_UA:
            owner_ip = self.agents.get(task.agent_id or "", {}).get("remote_ip")
            if task.agent_id is None or owner_ip != req.peer:
                return 400, {"error": "`state` and `progress` can only be changed by the "
                                      "agent owning this task"}
        if task.state == "done" and "progress" in data and data["progress"] != 1.0:
            return 400, {"error": "Cannot set progress: task is already in state `done`"}
        state = data.get("state")
        if state is not None:
            if state not in TASK_STATES:
                return 400, {"error": f"bad state {state!r}"}
            if state != (task.state or "queued"):
                task.history.append(state)
                task.state = None if state == "queued" else state
                if state == "running" and task.time_started is None:
                    task.time_started = time.time()
                if state == "done":
                    task.progress = 1.0
        if "progress" in data:
            task.progress = float(data["progress"])
        if data.get("time_started") == "now":
            task.time_started = time.time()
        if "last_error" in data:
            task.last_error = data["last_error"]
        if "agent_id" in data:
            task.agent_id = data["agent_id"]
        return 200, {"id": task.id, "job": task.job_id, "state": task.state or "queued",
                     "progress": task.progress}


if __name__ == "__main__":
    stub = MasterStub("0.0.0.0", int(sys.argv[1]) if len(sys.argv) > 1 else 5000).start()
    print(f"test master on {stub.address}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        stub.stop()
