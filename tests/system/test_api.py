"""The HTTP API through the real socket unit: gunicorn started with the agent and handed
systemd's socket, talking to the real agent over D-Bus. The container shares the host's network,
so these tests are HTTP clients on 127.0.0.1:<a free port>.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import io
import json
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
import requests
from container import Container

from tests.system.conftest import agent_pid, assign_wait, assignment, farmnode

USER, PASSWORD, TOKEN = "master", "pa$$ word:with colon", "tok-" + uuid.uuid4().hex
CONFD = "/etc/farmnode/conf.d/50-api-test.yaml"


def free_port() -> int:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
        s.bind(("::", 0))
        return int(s.getsockname()[1])


@dataclass
class Api:
    ct: Container
    port: int

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request(self, method: str, path: str, *, auth: str | None = "basic",
                **kw: Any) -> requests.Response:
        headers = dict(kw.pop("headers", {}))
        if auth == "basic":
            raw = f"{USER}:{PASSWORD}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(raw).decode()
        elif auth == "bearer":
            headers["Authorization"] = f"Bearer {TOKEN}"
        kw.setdefault("timeout", 30)
        return requests.request(method, self.base + path, headers=headers, **kw)

    def get(self, path: str, **kw: Any) -> requests.Response:
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> requests.Response:
        return self.request("POST", path, **kw)

    def service(self, prop: str, unit: str = "farmnode-api.service") -> str:
        return self.ct.run(["systemctl", "show", "-P", prop, unit]).stdout.strip()

    def refused(self) -> bool:
        """Whether a connection to the port is refused (nothing listens: no socket unit)."""
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=10).close()
        except ConnectionRefusedError:
            return True
        return False

    def api_log(self) -> str:
        """What this run of farmnode-api.service logged: gunicorn's master and its worker."""
        self.ct.run(["journalctl", "--sync"])
        invocation = self.service("InvocationID")
        return str(self.ct.run(["journalctl", "-o", "cat", "--no-pager",
                                f"_SYSTEMD_INVOCATION_ID={invocation}"]).stdout)


@pytest.fixture(scope="module")
def api(ct: Container) -> Iterator[Api]:
    port = free_port()
    ct.sh(f"""
cat > {CONFD} <<'EOF'
agent_api_port: {port}
agent_api_username: {USER}
EOF
install -m 0600 /dev/null /etc/farmnode/api-password
cat > /etc/farmnode/api-password <<'EOF'
{PASSWORD}
EOF
printf '# test token\\n{TOKEN}\\n' > /etc/farmnode/tokens
chmod 0600 /etc/farmnode/tokens
systemctl daemon-reload
# A running socket keeps its port across daemon-reload: stopped, the agent's start opens the
# new one.
systemctl stop farmnode-api.socket
systemctl restart farmnode.service
""")
    yield Api(ct, port)
    ct.sh(f"rm -f {CONFD} /etc/farmnode/conf.d/90-http-api.yaml /etc/farmnode/api-password; "
          "systemctl daemon-reload; systemctl stop farmnode-api.socket; "
          "systemctl start farmnode.service", check=False)


class EventStream:
    """A client of GET /api/v1/events; events are awaited, never slept for."""

    def __init__(self, api: Api) -> None:
        self.resp = api.get("/api/v1/events", stream=True, timeout=(5, 60),
                            headers={"Accept": "text/event-stream"})
        assert self.resp.status_code == 200, self.resp.text
        assert self.resp.headers["Content-Type"].startswith("text/event-stream")
        self.lines = self.resp.iter_lines(decode_unicode=True)

    def next(self) -> tuple[str, dict[str, Any]]:
        event, data = "", ""
        for line in self.lines:
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = line[6:]
            elif line == "" and event:
                return event, json.loads(data)
        raise EOFError("event stream ended")

    def until(self, pred: Callable[[str, dict[str, Any]], bool]) -> dict[str, Any]:
        while True:
            event, data = self.next()
            if pred(event, data):
                return data

    def close(self) -> None:
        self.resp.close()


@contextlib.contextmanager
def events(api: Api) -> Iterator[EventStream]:
    stream = EventStream(api)
    try:
        yield stream
    finally:
        stream.close()


def wait_tasks(stream: EventStream, ids: list[int], states: tuple[str, ...]) -> None:
    pending = set(ids)
    while pending:
        data = stream.until(lambda e, d: e == "task" and d["task_id"] in pending
                            and d["state"] in states)
        pending.discard(data["task_id"])


# ---- activation, sandbox ------------------------------------------------------------------


def test_the_api_is_up_before_the_first_request_after_start(api: Api) -> None:
    listen = api.ct.run(["systemctl", "show", "-P", "Listen", "farmnode-api.socket"]).stdout
    assert f":{api.port} (Stream)" in listen, listen  # the port came from the config
    api.ct.run(["systemctl", "stop", "farmnode.service"])
    assert api.refused()
    # `systemctl start` returns at the agent's READY=1: by then gunicorn runs, has loaded the
    # app and took systemd's socket, before any request reached it (its access log is empty).
    api.ct.run(["systemctl", "start", "farmnode.service"])
    assert api.service("ActiveState") == "active"
    pid = api.service("MainPID")
    log = api.api_log()
    listening = f"Listening at: http://[::]:{api.port} ({pid})"
    assert "Starting gunicorn" in log and listening in log, log[-2000:]
    assert '"GET ' not in log and '"POST ' not in log, log[-2000:]
    cmdline = api.ct.run(["cat", f"/proc/{pid}/cmdline"]).stdout.replace("\0", " ")
    assert "-m farmnode.api " in cmdline and "--bind" not in cmdline, cmdline
    r = api.get("/api/versions", auth=None)
    assert r.status_code == 200 and r.json() == {"versions": [1]}
    assert api.service("MainPID") == pid  # the running API answered; nothing was started
    user = api.ct.run(["ps", "-o", "user:32=,group:32=", "-p", pid]).stdout.split()
    assert user == ["farmnode-api", "farmnode"]
    # IPv6 on the same socket
    r = requests.get(f"http://[::1]:{api.port}/api/versions", timeout=10)
    assert r.status_code == 200


def test_security_exposure_at_most_2(api: Api) -> None:
    out = api.ct.run(["systemd-analyze", "security", "--no-pager", "farmnode-api.service"],
                     check=False).stdout
    m = re.search(r"Overall exposure level for farmnode-api\.service: (\d+\.\d+)", out)
    assert m, out[-2000:]
    assert float(m.group(1)) <= 2.0, out


# ---- PyFarm's protocol ---------------------------------------------------------------------


def test_assign_run_and_read_back(api: Api) -> None:
    a = assignment("fakerender", {"duration": 0.1, "lines": 3}, [1, 2])
    ids = [t["id"] for t in a["tasks"]]
    with events(api) as stream:
        stream.until(lambda e, d: e == "agent")  # the stream is live
        r = api.post("/api/v1/assign", json=a, headers={"User-Agent": "PyFarm/1.0 (master)"})
        assert r.status_code == 202, r.text
        aid = r.json()["id"]
        assert uuid.UUID(aid)
        wait_tasks(stream, ids, ("done", "failed"))
    task = api.get(f"/api/v1/tasks/{ids[0]}").json()
    assert task["state"] == "done" and task["assignment_id"] == aid
    assert task["local_state"] == "done" and task["frame"] == 1
    assert task["stats"]["task_id"] == ids[0]
    # one log per assignment, PyFarm's CSV: time, pid, stream, line, message
    r = api.get(f"/api/v1/task_logs/{aid}.csv")
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/csv")
    rows = list(csv.reader(io.StringIO(r.text)))
    messages = [row[4] for row in rows]
    assert "line 1:1" in messages and "line 2:3" in messages
    assert all(row[2] in ("0", "1", "internal") for row in rows)
    assert rows[0][2] == "internal" and rows[0][4].startswith("Starting work on job")
    assert [int(row[3]) for row in rows] == list(range(1, len(rows) + 1))
    assert all(re.match(r"\d{4}-\d\d-\d\dT", row[0]) for row in rows)
    text = api.get(f"/api/v1/task_logs/{ids[1]}?format=text").text
    assert "stdout line 2:3" in text  # a batch logs once, under each of its tasks
    plain = api.get(f"/api/v1/task_logs/{ids[1]}", headers={"Accept": "text/plain"})
    assert plain.headers["Content-Type"].startswith("text/plain")


ALLOCATED = 64 * 1024 * 1024
# Touches every page of ALLOCATED bytes (b"x" * n writes them; a zeroed bytearray would not be
# resident), then burns 0.3 s of CPU.
HOG = ("import time\n"
       f"block = b'x' * {ALLOCATED}\n"
       "while time.process_time() < 0.3:\n"
       "    pass\n"
       "print(len(block))\n")


def test_stats_of_a_real_task_carry_its_cgroup_figures(api: Api) -> None:
    a = assignment("command", {"command": ["python3", "-c", HOG]}, [1])
    (tid,) = [t["id"] for t in a["tasks"]]
    with events(api) as stream:
        stream.until(lambda e, d: e == "agent")
        r = api.post("/api/v1/assign", json=a)
        assert r.status_code == 202, r.text
        wait_tasks(stream, [tid], ("done", "failed"))
    stats = api.get(f"/api/v1/tasks/{tid}/stats").json()
    assert stats["task_id"] == tid and stats["state"] == "done", stats
    # the scope's final figures, kept after it is gone: at least the CPU the loop burnt, well
    # under what a minute of one core would be
    assert 300_000 <= stats["cpu_usage_usec"] < 60_000_000, stats
    # The container's v2 tree has no memory controller where the host is a hybrid one (its v1
    # controllers are mounted read-only there: systemd makes no per-unit memory cgroup), so
    # the figure is null there by fact, and the allocation's size where the host has one.
    controllers = api.ct.sh("cat /sys/fs/cgroup/unified/cgroup.controllers "
                            "2>/dev/null || cat /sys/fs/cgroup/cgroup.controllers").stdout.split()
    if "memory" in controllers:
        assert stats["memory_peak"] >= ALLOCATED, stats
    else:
        assert stats["memory_peak"] is None and stats["memory_current"] is None, stats
    assert api.get(f"/api/v1/tasks/{tid}").json()["stats"] == stats


def test_tasks_overlap_resources_and_delete(api: Api) -> None:
    a = assignment("fakerender", {"duration": 120}, [1, 2])
    ids = [t["id"] for t in a["tasks"]]
    with events(api) as stream:
        stream.until(lambda e, d: e == "agent")
        r = api.post("/api/v1/assign", json=a, auth="bearer")
        assert r.status_code == 202, r.text
        aid = r.json()["id"]
        # an identical repeat is accepted with the same id (PyFarm)
        again = api.post("/api/v1/assign", json=a)
        assert again.status_code == 202 and again.json()["id"] == aid
        partial = json.loads(json.dumps(a))
        partial["tasks"] = [a["tasks"][1], {"id": ids[1] + 50_000, "frame": 3}]
        r = api.post("/api/v1/assign", json=partial)
        assert r.status_code == 409
        assert r.json() == {"error": "Partial overlap of tasks", "rejected_task_ids": [ids[1]]}
        big = assignment("fakerender", {}, [1], ram=10**7)
        r = api.post("/api/v1/assign", json=big)
        assert r.status_code == 400 and "ram" in r.json()["error"], r.text
        if r.json()["error"] == "Not enough ram":  # PyFarm's form, when the agent says so
            assert r.json()["requires_ram"] == 10**7 and "agent_ram" in r.json()
        wait_tasks(stream, ids, ("running",))
        listed = {t["id"]: t for t in api.get("/api/v1/tasks/").json()}
        assert set(ids) <= set(listed)
        assert {"id", "frame", "attempt", "tile", "local_state"} <= set(listed[ids[0]])
        assert api.get("/api/v1/tasks").status_code == 200  # without the slash too
        stats = api.get(f"/api/v1/tasks/{ids[0]}/stats").json()
        assert stats["task_id"] == ids[0] and stats["state"] == "running"
        # DELETE stops the whole assignment
        assert api.request("DELETE", f"/api/v1/tasks/{ids[0]}").status_code == 202
        wait_tasks(stream, ids, ("cancelled",))
    assert api.request("DELETE", f"/api/v1/tasks/{ids[0]}").status_code in (202, 204)
    assert api.request("DELETE", "/api/v1/tasks/987654321").status_code == 204
    r = api.request("DELETE", "/api/v1/tasks/abc")
    assert r.status_code == 400 and "error" in r.json()
    assert api.get("/api/v1/tasks/987654321").status_code == 404


def test_status_versions_config_metrics(api: Api) -> None:
    st = api.get("/api/v1/status", auth=None).json()
    for key in ("state", "agent_hostname", "free_ram", "agent_process_ram", "consumed_ram",
                "child_processes", "grandchild_processes", "pids", "agent_id",
                "last_master_contact", "last_announce", "uptime", "jobs"):
        assert key in st
    assert st["agent_id"] == json.loads(farmnode(api.ct, "--json", "status").stdout)["agent_id"]
    cfg = api.get("/api/v1/config").json()
    # the password is a credential of the API (redaction: test_privilege.py)
    assert PASSWORD not in json.dumps(cfg) and cfg["agent_api_password_file"]
    metrics = api.get("/metrics").text
    assert "farmnode_up 1" in metrics
    assert re.search(r'^farmnode_tasks\{state="done"\} [1-9]', metrics, re.M), metrics
    assert re.search(r"^farmnode_ram_free_megabytes \d+", metrics, re.M)


def test_config_patch(api: Api) -> None:
    assert "\n  " in api.get("/api/v1/status").text  # pretty by default (PyFarm's option)
    r = api.request("PATCH", "/api/v1/config", json={"agent_pretty_json": False,
                                                     "farm_name": "test-farm"})
    assert r.status_code == 200, r.text
    assert r.json()["farm_name"] == "test-farm"
    assert "\n" not in api.get("/api/v1/status").text.strip()
    assert api.get("/api/v1/status").json()["farm_name"] == "test-farm"
    r = api.request("PATCH", "/api/v1/config", json={"agent_api_port": 1})
    assert r.status_code == 400 and "agent_api_port" in r.json()["error"]
    r = api.request("PATCH", "/api/v1/config", json={"task_stop_grace": -1})
    assert r.status_code == 400 and "task_stop_grace" in r.json()["error"]
    r = api.request("PATCH", "/api/v1/config", json={"agent_pretty_json": None,
                                                     "farm_name": None},
                    headers={"Content-Type": "application/merge-patch+json"})
    assert r.status_code == 200 and r.json()["farm_name"] is None
    assert "\n  " in api.get("/api/v1/status").text


def test_path_mapping_set_at_runtime_reaches_the_next_task(api: Api) -> None:
    rules = ["Z:\\bin => /bin", "//filer/proj => /srv/proj"]
    r = api.request("PATCH", "/api/v1/config", json={"jobtype_path_map": rules})
    assert r.status_code == 200, r.text
    try:
        # The command job type maps its program (map_path); the job data's other path is
        # mapped before the job type sees it.
        a = assignment("command", {"command": ["Z:\\bin\\echo", "//FILER/proj/shots/010"]},
                       [1])
        tid = a["tasks"][0]["id"]
        done = assign_wait(api.ct, a)
        assert [t["state"] for t in done["tasks"]] == ["done"], done
        out = farmnode(api.ct, "logs", str(tid)).stdout
        assert "/srv/proj/shots/010" in out, out
        r = api.request("PATCH", "/api/v1/config", json={"jobtype_path_map": ["Y: -> /y"]})
        assert r.status_code == 400 and "jobtype_path_map" in r.json()["error"], r.text
        assert "SOURCE => TARGET" in r.json()["error"], r.text
    finally:
        r = api.request("PATCH", "/api/v1/config", json={"jobtype_path_map": None},
                        headers={"Content-Type": "application/merge-patch+json"})
        assert r.status_code == 200, r.text


def test_signal_task(api: Api) -> None:
    # SIGTERM: the task's shim (issue [2]) shields itself from it, the job's shell traps it.
    script = 'trap "echo got TERM; trap - TERM" TERM; echo ready; while :; do sleep 0.05; done'
    a = assignment("command", {"command": ["/bin/sh", "-c", script]}, [1])
    tid = a["tasks"][0]["id"]
    with events(api) as stream:
        stream.until(lambda e, d: e == "agent")
        assert api.post("/api/v1/assign", json=a).status_code == 202
        wait_tasks(stream, [tid], ("running",))
        deadline = time.monotonic() + 30
        while "ready" not in api.get(f"/api/v1/task_logs/{tid}?format=text").text:
            assert time.monotonic() < deadline, "the task never printed ready"
            time.sleep(0.05)
        r = api.post(f"/api/v1/tasks/{tid}/signal", json={"signal": "term"})
        assert r.status_code == 202 and r.json()["signal"] == "SIGTERM", r.text
        while "got TERM" not in api.get(f"/api/v1/task_logs/{tid}?format=text").text:
            assert time.monotonic() < deadline, "the signal never arrived"
            time.sleep(0.05)
        assert api.post(f"/api/v1/tasks/{tid}/signal", json={"signal": 999}).status_code == 400
        assert api.post(f"/api/v1/tasks/{tid}/signal", json={"signal": "NOPE"}).status_code == 400
        # the trap is gone: the second TERM ends the job
        assert api.post(f"/api/v1/tasks/{tid}/signal", json={"signal": 15}).status_code == 202
        wait_tasks(stream, [tid], ("failed",))
    # Once the agent has let go of the finished run (it emits no event for that): 409.
    while (r := api.post(f"/api/v1/tasks/{tid}/signal", json={"signal": "TERM"})).status_code \
            == 202:
        assert time.monotonic() < deadline + 30, "the finished task still takes signals"
        time.sleep(0.1)
    assert r.status_code == 409 and "not running" in r.json()["error"]
    assert api.post("/api/v1/tasks/987654321/signal", json={"signal": 15}).status_code == 404


# ---- auth and bad input --------------------------------------------------------------------


def _routes_with_auth(api: Api) -> list[tuple[str, str]]:
    doc = api.get("/api/v1/openapi.json", auth=None).json()
    routes = []
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            if {} not in op["security"]:
                routes.append((method.upper(), path.replace("{task_id}", "1")
                               .replace("{identifier}", "1")))
    return routes


def test_auth_on_every_mutating_route(api: Api) -> None:
    routes = _routes_with_auth(api)
    assert {m for m, _ in routes} == {"POST", "PATCH", "DELETE", "GET"} and len(routes) >= 9
    # the reads that need credentials by default: task output, the event stream and the
    # status page that shows both
    assert {p for m, p in routes if m == "GET"} == {"/api/v1/task_logs/1", "/api/v1/events",
                                                   "/"}
    before = (agent_pid(api.ct), api.get("/api/v1/config").text,
              api.get("/api/v1/tasks/").text)
    wrong = {"wrong basic": "Basic " + base64.b64encode(f"{USER}:nope".encode()).decode(),
             "wrong user": "Basic " + base64.b64encode(f"x:{PASSWORD}".encode()).decode(),
             "wrong token": "Bearer nope", "garbage": "Basic !!!", "other scheme": "Digest x"}
    body = assignment("command", {"command": ["true"]}, [1])
    for method, path in routes:
        for name, header in [("missing", None), *wrong.items()]:
            headers = {"Authorization": header} if header else {}
            r = api.request(method, path, auth=None, json=body if method != "GET" else None,
                            headers=headers)
            assert r.status_code == 401, (method, path, name, r.text)
            assert "error" in r.json() and "Basic" in r.headers["WWW-Authenticate"]
    after = (agent_pid(api.ct), api.get("/api/v1/config").text, api.get("/api/v1/tasks/").text)
    assert after == before  # nothing changed, the agent never restarted nor stopped


def test_reads_can_require_auth(api: Api) -> None:
    r = api.request("PATCH", "/api/v1/config", json={"agent_api_read_requires_auth": True})
    assert r.status_code == 200
    try:
        assert api.get("/api/v1/status", auth=None).status_code == 401
        assert api.get("/api/v1/status", auth="bearer").status_code == 200
        assert api.get("/api/versions", auth=None).status_code == 200  # discovery stays open
    finally:
        api.request("PATCH", "/api/v1/config", json={"agent_api_read_requires_auth": None})
    assert api.get("/api/v1/status", auth=None).status_code == 200


def test_bad_input_gets_clear_errors_and_the_agent_keeps_running(api: Api) -> None:
    pid = agent_pid(api.ct)
    good = assignment("command", {"command": ["true"]}, [1])

    def err(r: requests.Response, status: int) -> str:
        assert r.status_code == status, (status, r.status_code, r.text)
        assert r.headers["Content-Type"].startswith("application/json")
        message: str = r.json()["error"]
        return message

    huge = b'{"job": {"id": 1, "by": 1, "notes": "' + b"x" * (5 * 1024 * 1024) + b'"}}'
    err(api.post("/api/v1/assign", data=huge, headers={"Content-Type": "application/json"}), 413)
    err(api.post("/api/v1/assign", data=json.dumps(good),
                 headers={"Content-Type": "text/plain"}), 415)
    err(api.post("/api/v1/assign", json=good, headers={"Accept": "text/html"}), 406)
    err(api.get("/api/v1/status", headers={"Accept": "application/xml"}), 406)
    assert "decode" in err(api.post("/api/v1/assign", data=b'{"job": ',
                                    headers={"Content-Type": "application/json"}), 400)
    assert "No data" in err(api.post("/api/v1/assign", data=b""), 400)
    extra = {**good, "surprise": 1}
    assert "surprise" in err(api.post("/api/v1/assign", json=extra), 400)
    bad_job = json.loads(json.dumps(good))
    bad_job["job"]["id"] = "x"
    assert "job.id" in err(api.post("/api/v1/assign", json=bad_job), 400)
    bad_job["job"]["id"] = 2**70
    assert "job.id" in err(api.post("/api/v1/assign", json=bad_job), 400)
    assert "wait" in err(api.post("/api/v1/stop", json={"wait": "yes"}), 400)
    assert "unknown" in err(api.post("/api/v1/restart", json={"now": True}), 400)
    err(api.post("/api/v1/update", json={"version": "1.0; rm -rf /"}), 400)
    err(api.get("/nothing/here"), 404)
    err(api.request("PUT", "/api/v1/status"), 405)
    # task_logs: path tricks never name a file
    for trick in ("..%2F..%2Fetc%2Fpasswd", "..%5C..%5Cetc%5Cpasswd", "%2Fetc%2Fpasswd",
                  "a%2Fb"):
        err(api.get(f"/api/v1/task_logs/{trick}"), 400)
    for trick in ("..", "...", "etc", ".csv", "passwd.csv"):
        assert api.get(f"/api/v1/task_logs/{trick}").status_code in (400, 404)
    r = api.get("/api/v1/task_logs/../../../etc/passwd")
    assert r.status_code in (400, 404) and "root:" not in r.text
    err(api.get("/api/v1/task_logs/1?format=xml"), 400)
    assert agent_pid(api.ct) == pid
    assert api.get("/api/v1/status").json()["state"] in ("online", "running")


def test_update_is_recorded_not_faked(api: Api) -> None:
    r = api.post("/api/v1/update", json={"version": "9.9.9"})
    assert r.status_code == 202 and "package manager" in r.json()["message"]
    logs = api.ct.run(["journalctl", "-u", "farmnode.service", "--no-pager", "-g",
                       "update to farmnode 9.9.9"]).stdout
    assert "package manager" in logs


# ---- availability under unauthenticated load ------------------------------------------------

# Generous: the answer must come while the attackers are held; how fast is the bench's business.
ANSWER_TIMEOUT = 120
PER_ADDRESS = 40  # attackers per source address, below the API's cap per peer (64)


class Attackers:
    """`n` connections held open from 127.0.0.2, 127.0.0.3, ... (PER_ADDRESS each), each
    sending `opening`, then `trickle` every half second when given (slowloris). One the
    server answers with anything but a 200 stream, or closes, is opened again at once, so
    `n` are held (or tried) for as long as the block lasts."""

    def __init__(self, port: int, n: int, opening: bytes, trickle: bytes = b"") -> None:
        self.port, self.n, self.opening, self.trickle = port, n, opening, trickle
        self.socks: list[socket.socket | None] = [None] * n
        self.statuses: dict[str, int] = {}
        self.opened = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _open(self, i: int) -> None:
        source = f"127.0.0.{2 + i // PER_ADDRESS}"
        try:
            s = socket.create_connection(("127.0.0.1", self.port), timeout=10,
                                         source_address=(source, 0))
            s.sendall(self.opening)
        except OSError:
            self.socks[i] = None
            return
        self.socks[i] = s
        self.opened += 1

    def _check(self, i: int) -> None:
        s = self.socks[i]
        if s is None:
            self._open(i)
            return
        try:
            peek = s.recv(16, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            peek = None  # nothing yet: still held
        except OSError:
            peek = b""
        if peek is not None and not peek.startswith(b"HTTP/1.1 200"):
            status = peek[9:12].decode(errors="replace") if peek else "closed"
            self.statuses[status] = self.statuses.get(status, 0) + 1
            s.close()
            self._open(i)
        elif peek is None and self.trickle:
            with contextlib.suppress(OSError):
                s.send(self.trickle)

    def _run(self) -> None:
        while not self._stop.is_set():
            for i in range(self.n):
                self._check(i)
            self._stop.wait(0.5)

    def __enter__(self) -> Attackers:
        for i in range(self.n):
            self._open(i)
        assert self.opened == self.n, f"only {self.opened} of {self.n} connections opened"
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        for s in self.socks:
            if s is not None:
                s.close()

    def streams(self) -> int:
        """Connections that got a 200 event stream and hold it."""
        count = 0
        for s in list(self.socks):
            with contextlib.suppress(OSError):
                if s is not None and s.recv(16, socket.MSG_PEEK | socket.MSG_DONTWAIT) \
                        .startswith(b"HTTP/1.1 200"):
                    count += 1
        return count


EVENTS = b"GET /api/v1/events HTTP/1.1\r\nHost: node\r\nAccept: text/event-stream\r\n\r\n"
HALF_HEAD = b"POST /api/v1/assign HTTP/1.1\r\nHost: node\r\nContent-Type: appl"


@contextlib.contextmanager
def output_open(api: Api) -> Iterator[None]:
    r = api.request("PATCH", "/api/v1/config", json={"agent_api_output_requires_auth": False})
    assert r.status_code == 200, r.text
    try:
        yield
    finally:
        r = api.request("PATCH", "/api/v1/config",
                        json={"agent_api_output_requires_auth": None})
        assert r.status_code == 200, r.text


def serves_authenticated_clients(api: Api) -> None:
    """Status, an assignment and an event stream, each answered, with credentials."""
    r = api.get("/api/v1/status", timeout=ANSWER_TIMEOUT)
    assert r.status_code == 200 and r.json()["state"] in ("online", "running"), r.text
    a = assignment("command", {"command": ["true"]}, [1])
    r = api.post("/api/v1/assign", json=a, auth="bearer", timeout=ANSWER_TIMEOUT)
    assert r.status_code == 202, r.text
    stream = api.get("/api/v1/events", stream=True, timeout=(ANSWER_TIMEOUT, ANSWER_TIMEOUT),
                     headers={"Accept": "text/event-stream"})
    try:
        assert stream.status_code == 200, stream.text
        for line in stream.iter_lines(decode_unicode=True):
            if line.startswith("event: agent"):
                break  # the stream is live
        else:
            raise AssertionError("the event stream ended before its first event")
    finally:
        stream.close()


@pytest.mark.parametrize("n", [40, 400])
@pytest.mark.parametrize("attack", ["idle events", "idle events, output open",
                                    "half-sent head", "slowloris"])
def test_the_api_answers_while_unauthenticated_clients_hold_connections(
        api: Api, attack: str, n: int) -> None:
    opening, trickle = {"idle events": (EVENTS, b""),
                        "idle events, output open": (EVENTS, b""),
                        "half-sent head": (HALF_HEAD, b""),
                        "slowloris": (HALF_HEAD, b"i")}[attack]
    with contextlib.ExitStack() as stack:
        if attack == "idle events, output open":
            stack.enter_context(output_open(api))
        attackers = stack.enter_context(Attackers(api.port, n, opening, trickle))
        serves_authenticated_clients(api)
        if attack == "idle events":  # the stream needs credentials: refused, at once
            assert attackers.statuses.get("401", 0) >= 1, attackers.statuses
            assert attackers.streams() == 0
        elif attack == "idle events, output open":  # a few get a stream, the rest are told
            assert 1 <= attackers.streams() <= 4, attackers.statuses
            assert attackers.statuses.get("503", 0) >= 1, attackers.statuses
        else:  # every head still unfinished: none of them was served
            assert set(attackers.statuses) <= {"408", "closed"}, attackers.statuses


def _get_many(port: int, paths: list[str], headers: dict[str, str]) -> dict[int, int]:
    """GET each path (32 at a time, each on its own connection); {status: count}."""
    import http.client

    def one(path: str) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=ANSWER_TIMEOUT)
        try:
            conn.request("GET", path, headers=headers)
            r = conn.getresponse()
            r.read()
            return r.status
        finally:
            conn.close()

    counts: dict[int, int] = {}
    with ThreadPoolExecutor(32) as pool:
        for status in pool.map(one, paths):
            counts[status] = counts.get(status, 0) + 1
    return counts


def _agent_fds(api: Api) -> int:
    return len(api.ct.run(["ls", f"/proc/{agent_pid(api.ct)}/fd"]).stdout.split())


def test_a_task_log_flood_leaves_the_agent_its_descriptors(api: Api) -> None:
    assert api.ct.run(["systemctl", "show", "-P", "LimitNOFILESoft", "farmnode.service"]
                      ).stdout.strip() == "65536"

    def open_files(pid: int | str) -> tuple[int, int]:
        limits = api.ct.run(["cat", f"/proc/{pid}/limits"]).stdout
        m = re.search(r"^Max open files\s+(\d+)\s+(\d+)", limits, re.M)
        assert m, limits
        return int(m.group(1)), int(m.group(2))

    # 65536, or all that systemd itself may give (the test container's PID 1 inherits a
    # lower hard limit from the host): never the default soft limit of 1024 again.
    ceiling = min(65536, open_files(1)[1])
    assert open_files(agent_pid(api.ct)) == (ceiling, ceiling)
    a = assignment("fakerender", {"duration": 0.1, "lines": 3}, [1])
    with events(api) as stream:
        stream.until(lambda e, d: e == "agent")
        r = api.post("/api/v1/assign", json=a)
        assert r.status_code == 202, r.text
        aid = r.json()["id"]
        wait_tasks(stream, [a["tasks"][0]["id"]], ("done",))
    before = _agent_fds(api)
    # Without credentials: refused (task output is not public), ten times over.
    for n in (1100, 11000):
        counts = _get_many(api.port, [f"/api/v1/task_logs/{aid}.csv"] * n, {})
        assert counts == {401: n}, counts
    # Opened to everyone, the flood that once left 1023 descriptors held: each log's memfd
    # goes as its answer is sent, so the agent holds about what it held before.
    with output_open(api):
        counts = _get_many(api.port, [f"/api/v1/task_logs/{aid}.csv"] * 1100, {})
        assert counts == {200: 1100}, counts
        after = _agent_fds(api)
    assert after <= before + 16, (before, after)
    # and the next assignment runs
    b = assignment("command", {"command": ["true"]}, [1])
    with events(api) as stream:
        stream.until(lambda e, d: e == "agent")
        r = api.post("/api/v1/assign", json=b)
        assert r.status_code == 202, r.text
        wait_tasks(stream, [b["tasks"][0]["id"]], ("done",))


def test_bad_input_of_any_shape_is_a_4xx_and_chunked_bodies_work(api: Api) -> None:
    def reconnects() -> int:
        api.ct.run(["journalctl", "--sync"])
        return api.ct.run(["journalctl", "-u", "farmnode-api.service", "-o", "cat",
                           "--no-pager"]).stdout.count("reconnecting")

    pid, before = agent_pid(api.ct), reconnects()
    deep: Any = {}
    for _ in range(600):
        deep = {"a": deep}
    a = assignment("command", {"command": ["true"], "x": deep}, [1])
    r = api.post("/api/v1/assign", json=a)
    assert r.status_code == 400 and r.json()["error"].startswith("job.data.x.a.a"), r.text
    assert "nested more than" in r.json()["error"]
    # below the API's own bound, above job.data's: the agent names it
    shallow: Any = {}
    for _ in range(40):
        shallow = {"a": shallow}
    a = assignment("command", {"command": ["true"], "x": shallow}, [1])
    r = api.post("/api/v1/assign", json=a)
    assert r.status_code == 400 and "job.data.x.a" in r.json()["error"], r.text
    assert "nested deeper than" in r.json()["error"]
    # straight over D-Bus, the agent's own answer is an error naming the field
    out = api.ct.run(["busctl", "call", "org.farmnode.Agent1", "/org/farmnode/Agent1",
                      "org.farmnode.Agent1", "Assign", "s",
                      json.dumps(assignment("command", {"x": deep}, [1]))], check=False)
    assert out.returncode != 0 and "job.data.x.a" in out.stderr, out.stderr
    out = api.ct.run(["busctl", "call", "org.farmnode.Agent1", "/org/farmnode/Agent1",
                      "org.farmnode.Agent1", "Assign", "s", "[" * 100_000], check=False)
    assert out.returncode != 0 and "nested too deeply" in out.stderr, out.stderr[-500:]
    r = api.post("/api/v1/assign", data=b"[" * 100_000,
                 headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "nested" in r.json()["error"], r.text
    # a valid body sent chunked (a generator: requests sends it without Content-Length)
    good = assignment("command", {"command": ["true"]}, [1])
    body = json.dumps(good).encode()
    r = api.post("/api/v1/assign", data=(body[i:i + 100] for i in range(0, len(body), 100)),
                 headers={"Content-Type": "application/json"})
    assert r.request.headers.get("Transfer-Encoding") == "chunked"
    assert r.status_code == 202, r.text
    # nothing of it reached the bus connection or the agent
    assert api.get("/api/v1/status").status_code == 200
    assert agent_pid(api.ct) == pid and reconnects() == before


# ---- the OpenAPI document, fuzzed -----------------------------------------------------------


# Not fuzzed: /events streams forever; /stop and /restart take the agent away mid-run (they
# are exercised below). Everything else is, with valid credentials.
NOT_FUZZED = {("GET", "/api/v1/events"), ("POST", "/api/v1/stop"), ("POST", "/api/v1/restart")}


def test_openapi_document_fuzzed(api: Api) -> None:
    import hypothesis
    import schemathesis
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        negative_data_rejection,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    doc = api.get("/api/v1/openapi.json", auth=None).json()
    schema = schemathesis.openapi.from_dict(doc)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_schema_conformance, response_headers_conformance]
    counts = {"requests": 0, "5xx": 0}
    session = requests.Session()
    operations = [r.ok() for r in schema.get_all_operations()]
    fuzzed = [op for op in operations if (op.method.upper(), op.path) not in NOT_FUZZED]
    assert len(fuzzed) == len(operations) - len(NOT_FUZZED)

    def fuzz(op: Any, mode: GenerationMode, examples: int) -> None:
        extra = [negative_data_rejection] if mode is GenerationMode.NEGATIVE else []

        @hypothesis.settings(max_examples=examples, deadline=None, database=None,
                             suppress_health_check=list(hypothesis.HealthCheck),
                             phases=[hypothesis.Phase.generate])
        @hypothesis.given(case=op.as_strategy(generation_mode=mode))
        def run(case: Any) -> None:
            response = case.call(base_url=api.base, session=session, headers=headers)
            counts["requests"] += 1
            if response.status_code >= 500:
                counts["5xx"] += 1
            case.validate_response(response, checks=checks + extra, headers=headers)

        try:
            run()
        except hypothesis.errors.Unsatisfiable:
            # Nothing to break in a request without parameters or body (GET /api/versions).
            assert mode is GenerationMode.NEGATIVE

    for op in fuzzed:
        fuzz(op, GenerationMode.POSITIVE, 150)
        fuzz(op, GenerationMode.NEGATIVE, 75)
    api.request("PATCH", "/api/v1/config", json=dict.fromkeys(
        doc["paths"]["/api/v1/config"]["patch"]["requestBody"]["content"]["application/json"]
        ["schema"]["properties"]))
    for t in api.get("/api/v1/tasks/").json():
        api.request("DELETE", f"/api/v1/tasks/{t['id']}")
    print(f"\nschemathesis: {counts['requests']} requests, {counts['5xx']} server errors")
    assert counts["requests"] >= 1000 and counts["5xx"] == 0


# ---- stop and restart (last: they take the agent away) --------------------------------------


def test_restart_keeps_the_api_and_requests_wait_for_the_agent(api: Api) -> None:
    api_pid = api.service("MainPID")
    pid = agent_pid(api.ct)
    api.ct.run(["systemctl", "restart", "farmnode.service"])
    assert agent_pid(api.ct) not in (pid, 0)
    # The restart left the socket and gunicorn alone: no queued connection was dropped.
    assert api.service("MainPID") == api_pid
    assert api.get("/api/v1/status").status_code == 200
    # A request that arrives while the agent is down, with its restart pending, waits for it
    # rather than answering 503. The new agent's start is held on a gate, so the request
    # surely comes while no agent is there; the gate opens once the API says it waits.
    gate = "/run/farmnode-test-restart-gate"
    dropin = "/run/systemd/system/farmnode.service.d/50-test-gate.conf"
    api.ct.sh(f"""mkdir -p {dropin.rsplit("/", 1)[0]}
cat > {dropin} <<'EOF'
[Service]
ExecStartPre=/bin/sh -c "while [ ! -e {gate} ]; do sleep 0.05; done"
EOF
rm -f {gate}; systemctl daemon-reload; systemctl restart --no-block farmnode.service""")
    try:
        for _ in range(600):
            if api.service("SubState", "farmnode.service") == "start-pre":
                break
            time.sleep(0.05)
        assert api.service("SubState", "farmnode.service") == "start-pre"
        answer: list[requests.Response] = []
        waiter = threading.Thread(target=lambda: answer.append(api.get("/api/v1/status")))
        waiter.start()
        for _ in range(600):
            if "the agent is restarting: a request waits" in api.api_log():
                break
            time.sleep(0.05)
        assert "the agent is restarting: a request waits" in api.api_log()
        assert not answer
    finally:
        api.ct.sh(f"touch {gate}; rm -f {dropin}; systemctl daemon-reload")
    waiter.join(60)
    assert answer and answer[0].status_code == 200, answer and answer[0].text
    assert answer[0].json()["state"] in ("online", "running")
    assert api.service("MainPID") == api_pid


def test_restart_and_stop(api: Api) -> None:
    pid = agent_pid(api.ct)
    api_pid = api.service("MainPID")
    with events(api) as stream:
        stream.until(lambda e, d: e == "agent")
        r = api.post("/api/v1/restart", json={"immediately": False})
        assert r.status_code == 202 and r.json() == {"restart": "now"}, r.text  # idle: now
        stream.until(lambda e, d: e == "agent" and d["state"] == "offline")
        stream.until(lambda e, d: e == "agent" and d["state"] in ("online", "running"))
    assert agent_pid(api.ct) not in (pid, 0)
    assert api.service("MainPID") == api_pid  # a restart of the agent is not one of the API

    # Stopped, the node is unreachable: the answer comes first, then the port refuses
    # connections, so the master takes its "cannot contact the agent" path.
    r = api.post("/api/v1/stop", json={"wait": True})
    assert r.status_code == 200, r.text
    # The answer leaves when the agent has left the bus; the agent then closes the socket and
    # exits, and only then is the unit inactive.
    for _ in range(600):
        if api.service("ActiveState", "farmnode.service") == "inactive":
            break
        time.sleep(0.05)
    assert api.service("ActiveState", "farmnode.service") == "inactive"
    assert api.service("ActiveState", "farmnode-api.socket") == "inactive"
    assert api.service("ActiveState") == "inactive"
    assert api.refused()
    with pytest.raises(requests.ConnectionError):
        api.get("/api/v1/status")
    # `systemctl stop farmnode` closes it the same way, before it returns.
    api.ct.run(["systemctl", "start", "farmnode.service"])
    assert api.get("/api/v1/status").status_code == 200
    api.ct.run(["systemctl", "stop", "farmnode.service"])
    assert api.refused()

    # A socket started by hand still activates the API on the first connection: with no agent
    # it answers 503 and does not bring the agent back through bus activation.
    api.ct.run(["systemctl", "start", "farmnode-api.socket"])
    assert api.service("ActiveState") == "inactive"
    r = api.get("/api/v1/status")
    assert r.status_code == 503 and "not running" in r.json()["error"]
    assert api.service("ActiveState") == "active"
    assert api.post("/api/v1/assign", json=assignment("command", {"command": ["true"]}, [1])
                    ).status_code == 503
    assert "farmnode_up 0" in api.get("/metrics").text
    assert api.ct.run(["systemctl", "is-active", "farmnode.service"],
                      check=False).stdout.strip() == "inactive"
    # `systemctl start farmnode` brings the agent back behind the running API.
    api.ct.run(["systemctl", "start", "farmnode.service"])
    assert api.get("/api/v1/status").status_code == 200
