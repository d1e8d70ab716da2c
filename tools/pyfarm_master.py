"""The real PyFarm 0.8.6 master (with its celery scheduler and redis) as a test peer.

PyFarm's master is Python 2.7 code; a Debian 12 host has no Python 2.7, Debian 11 still ships
it. So the recipe is a Debian 11 (bullseye) debootstrap tree with python2.7, a compiler (some
pinned dependencies build from source) and redis, and a virtualenv at /opt/pyfarm inside it
with pyfarm.master from PyPI under the pins in tools/pyfarm-master/pins.txt. The tree is cached
under CACHE_ROOT keyed by a hash of the recipe (packages, pins, the version below), like the
Debian 12 tree of tools/container.py.

At run time redis, the master and the scheduler each run in a read-only systemd-nspawn of the
tree (no --boot, host network namespace, so everything listens on 127.0.0.1 of the host), with
one writable directory per run bound in for the database, the scheduler's files and logs.

    python3 tools/pyfarm_master.py build     # build (or reuse) the cached tree
    python3 tools/pyfarm_master.py run       # run a master until Ctrl-C (prints its URL)
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CACHE_ROOT = Path(os.environ.get("FARMNODE_TEST_CACHE", "/var/cache/farmnode-test"))
MIRROR = os.environ.get("FARMNODE_DEBIAN_MIRROR", "http://deb.debian.org/debian")
PINS = REPO / "tools" / "pyfarm-master" / "pins.txt"
PACKAGES = ["python2.7", "python2.7-dev", "gcc", "libc6-dev", "redis-server",
            "python3-virtualenv", "ca-certificates"]
REQUIREMENTS = ["pyfarm.core==0.9.3", "pyfarm.master==0.8.6"]
VENV = "/opt/pyfarm"
# Where each run's writable state is bound inside the tree.
STATE = "/var/lib/pyfarm-test"
CA_IN_TREE = "/etc/farmnode-test-ca.pem"
# Bump when the recipe changes in a way the hashed lists would not show.
RECIPE_VERSION = "1"
TREE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# A job type record the master insists on (it stores source); farmnode runs its built-in job
# type of the same name, so this code is never executed.
JOBTYPE_CODE = (
    "from pyfarm.jobtypes.core.jobtype import JobType\n\n"
    "class {cls}(JobType):\n"
    "    pass\n"
)


def _log(msg: str) -> None:
    print(f"[pyfarm-master] {msg}", file=sys.stderr, flush=True)


def recipe_hash() -> str:
    h = hashlib.sha256()
    h.update(RECIPE_VERSION.encode())
    h.update(" ".join(PACKAGES).encode())
    h.update(" ".join(REQUIREMENTS).encode())
    h.update(PINS.read_bytes())
    return h.hexdigest()[:12]


def host_ca_bundle() -> Path:
    """The CA bundle this host's pip trusts: pip inside the tree must trust the same index."""
    for candidate in (os.environ.get("PIP_CERT"), os.environ.get("SSL_CERT_FILE"),
                      os.environ.get("REQUESTS_CA_BUNDLE")):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    r = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.cert"],
                       capture_output=True, text=True)
    if r.returncode == 0 and Path(r.stdout.strip()).is_file():
        return Path(r.stdout.strip())
    return Path("/etc/ssl/certs/ca-certificates.crt")


def _nspawn(tree: Path, *, read_only: bool, binds: Mapping[Path, str] = {},
            env: Mapping[str, str] = {}) -> list[str]:
    argv = ["systemd-nspawn", "-q", "--register=no", "--keep-unit", "--as-pid2",
            "-D", str(tree), "--setenv=PATH=" + TREE_PATH]
    if read_only:
        argv.append("--read-only")
    argv += [f"--bind={src}:{dst}" for src, dst in binds.items()]
    argv += [f"--setenv={k}={v}" for k, v in env.items()]
    return argv


def _pip_env() -> dict[str, str]:
    # The host's pip config (find-links to a missing directory, file:// indexes) makes
    # pip 20.3.4 crash; the tree's pip uses none of it, only the host's CA bundle.
    return {"PIP_CONFIG_FILE": "/dev/null", "PIP_FIND_LINKS": "", "PIP_CERT": CA_IN_TREE,
            "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_CACHE_DIR": "1",
            "PIP_DEFAULT_TIMEOUT": "120"}


def ensure_tree() -> Path:
    """The cached tree for the current recipe, built if missing."""
    tree = CACHE_ROOT / f"pyfarm-{recipe_hash()}"
    if (tree / ".farmnode-tree-complete").exists():
        return tree
    for tool in ("debootstrap", "systemd-nspawn"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} not found: run 'make apt' (debootstrap systemd-container)")
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    work = CACHE_ROOT / f"building-pyfarm-{recipe_hash()}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    _log(f"building {tree} (debootstrap bullseye, then pip; a few minutes)")
    t0 = time.monotonic()
    subprocess.run(
        ["debootstrap", "--variant=minbase", "--include=" + ",".join(PACKAGES), "bullseye",
         str(work), MIRROR],
        check=True, stdout=subprocess.DEVNULL,
    )
    shutil.copyfile(host_ca_bundle(), work / CA_IN_TREE.lstrip("/"))
    shutil.copyfile(PINS, work / "etc/pyfarm-pins.txt")
    # The mount point of each run's state: a read-only tree cannot get it later.
    (work / STATE.lstrip("/")).mkdir(parents=True)
    run = _nspawn(work, read_only=False, env=_pip_env())
    subprocess.run([*run, "python3", "-m", "virtualenv", "-q", "-p", "python2.7", VENV],
                   check=True)
    subprocess.run([*run, f"{VENV}/bin/pip", "install", "-q", "-c", "/etc/pyfarm-pins.txt",
                    *REQUIREMENTS], check=True)
    subprocess.run([*run, f"{VENV}/bin/python", "-c",
                    "import pyfarm.master.entrypoints, pyfarm.scheduler.tasks"], check=True)
    (work / ".farmnode-tree-complete").write_text(recipe_hash() + "\n")
    try:
        os.rename(work, tree)
    except OSError:
        # Another run built the same recipe meanwhile: keep theirs.
        shutil.rmtree(work, ignore_errors=True)
        if not (tree / ".farmnode-tree-complete").exists():
            raise
    for old in CACHE_ROOT.glob("pyfarm-*"):
        if old != tree and old.is_dir():
            _remove_unused_tree(old)
    _log(f"built {tree} in {time.monotonic() - t0:.0f}s")
    return tree


def _tree_lock(tree: Path) -> Path:
    return tree.with_name(f"{tree.name}.lock")


@contextlib.contextmanager
def _using_tree(tree: Path) -> Iterator[None]:
    with open(_tree_lock(tree), "a") as f:
        fcntl.flock(f, fcntl.LOCK_SH)
        yield


def _remove_unused_tree(tree: Path) -> None:
    with open(_tree_lock(tree), "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log(f"kept {tree}: a master runs from it")
            return
        shutil.rmtree(tree, ignore_errors=True)
        _tree_lock(tree).unlink(missing_ok=True)



# The master as PyFarm's `pyfarm-master` entry point runs it, but on 127.0.0.1 and a port of
# ours, without the reloader (the process we start is the one serving), loopback agents
# allowed (the node under test shares the host's network and says 127.0.0.1). Like the
# entry point, debug=True and one request at a time (werkzeug's default server).
RUN_MASTER = """\
import os
from pyfarm.master.application import app, api
from pyfarm.master.entrypoints import load_setup, load_master
app.config.update(ALLOW_AGENT_LOOPBACK_ADDRESSES=True)
load_setup(app)
load_master(app, api)
app.run(host="127.0.0.1", port=int(os.environ["MASTER_PORT"]), debug=True,
        use_reloader=False)
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class MasterError(RuntimeError):
    pass


@dataclass
class _Proc:
    """One program in its own read-only nspawn of the tree."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def payload_pid(self) -> int | None:
        # --as-pid2: nspawn's child is its stub init, whose child is the program.
        try:
            stub = Path(f"/proc/{self.popen.pid}/task/{self.popen.pid}/children").read_text()
            stub_pid = int(stub.split()[0])
            kids = Path(f"/proc/{stub_pid}/task/{stub_pid}/children").read_text().split()
            return int(kids[0]) if kids else None
        except (OSError, IndexError, ValueError):
            return None

    def stop(self, timeout: float = 10) -> None:
        if self.popen.poll() is not None:
            return
        pid = self.payload_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            _log(f"{self.name} ignored SIGTERM for {timeout:g}s: killing its container")
        # Killing the container's PID 1 (the stub init) kills every process in it.
        with contextlib.suppress(OSError, IndexError, ValueError):
            stub = Path(f"/proc/{self.popen.pid}/task/{self.popen.pid}/children").read_text()
            os.kill(int(stub.split()[0]), signal.SIGKILL)
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


@dataclass
class Master:
    """A running master: its REST API at `api`, its scheduler's log at `log("scheduler")`."""

    tree: Path
    state: Path
    port: int
    redis_port: int
    env: dict[str, str]
    procs: list[_Proc] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api(self) -> str:
        return f"{self.url}/api/v1"

    def log(self, name: str) -> str:
        try:
            return (self.state / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""

    def logs_tail(self, lines: int = 40) -> str:
        out = []
        for p in self.procs:
            tail = self.log(p.name).splitlines()[-lines:]
            out.append(f"--- {p.name} ---\n" + "\n".join(tail))
        return "\n".join(out)

    # ---- REST ---------------------------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None,
                timeout: float = 30) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.api + path, data=data, method=method,
                                     headers={"Content-Type": "application/json",
                                              "Accept": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode(errors="replace")

    def get(self, path: str) -> Any:
        status, body = self.request("GET", path)
        if status != 200:
            raise MasterError(f"GET {path}: {status} {body}")
        return body

    def ui_post(self, path: str, form: Mapping[str, str] = {}) -> int:
        """POST a form to the master's web UI (pause, restart agent: what a user clicks),
        the redirect it answers with not followed. Its status."""
        data = urllib.parse.urlencode(form).encode()
        req = urllib.request.Request(self.url + path, data=data, method="POST")

        class _NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args: Any, **kwargs: Any) -> None:
                return None

        opener = urllib.request.build_opener(_NoRedirect)
        try:
            with opener.open(req, timeout=30) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            if exc.code >= 400:
                raise MasterError(f"POST {path}: {exc.code} {exc.read()[:500]!r}") from None
            return exc.code

    def post(self, path: str, body: Any, expect: tuple[int, ...] = (200, 201)) -> Any:
        status, answer = self.request("POST", path, body)
        if status not in expect:
            raise MasterError(f"POST {path} {body}: {status} {answer}")
        return answer

    # ---- jobs, as a user submits them ---------------------------------------------------
    def jobtype(self, name: str, max_batch: int = 1) -> None:
        """The job type record the master insists on before it takes a job of that type."""
        status, _ = self.request("GET", f"/jobtypes/{name}")
        if status == 404:
            self.post("/jobtypes/", {
                "name": name, "classname": name.capitalize(), "max_batch": max_batch,
                "description": "farmnode test peer", "code": JOBTYPE_CODE.format(
                    cls=name.capitalize())})

    def submit(self, jobtype: str, frames: int, data: dict[str, Any], **job: Any) -> int:
        """A job of frames 1..frames (one task each); its id."""
        self.jobtype(jobtype)
        body = {"title": f"farmnode {jobtype} {time.time():.3f}", "jobtype": jobtype,
                "start": 1, "end": frames, "by": 1, "data": data, **job}
        created = self.post("/jobs/", body)
        return int(created["id"])

    def job(self, job_id: int) -> dict[str, Any]:
        got: dict[str, Any] = self.get(f"/jobs/{job_id}")
        return got

    def tasks(self, job_id: int) -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = self.get(f"/jobs/{job_id}/tasks/")
        return got

    def wait_job(self, job_id: int, states: tuple[str, ...] = ("done", "failed"),
                 timeout: float = 120, interval: float = 0.2,
                 detail: Callable[[], str] | None = None) -> dict[str, Any]:
        """The job's record once its state is one of `states` (the master has no event to
        wait on: it is polled every `interval` seconds)."""
        deadline = time.monotonic() + timeout
        while True:
            j = self.job(job_id)
            if j["state"] in states:
                return j
            if time.monotonic() > deadline:
                more = detail() if detail is not None else self.logs_tail()
                raise AssertionError(f"job {job_id} in {states}: not within {timeout:g}s\n"
                                     f"{more}")
            time.sleep(interval)

    # ---- processes ----------------------------------------------------------------------
    def _start(self, name: str, argv: list[str], extra_env: Mapping[str, str] = {}) -> _Proc:
        cmd = _nspawn(self.tree, read_only=True, binds={self.state: STATE},
                      env={**self.env, **extra_env})
        cmd[1:1] = ["-M", f"pyfarm-{name}-{os.getpid()}-{self.port}"]
        log = self.state / f"{name}.log"
        with open(log, "ab") as f:
            popen = subprocess.Popen([*cmd, *argv], stdin=subprocess.DEVNULL, stdout=f,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        proc = _Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def _await(self, what: str, ready: Any, proc: _Proc, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if proc.popen.poll() is not None:
                raise MasterError(f"{proc.name} exited {proc.popen.returncode}:\n"
                                  f"{self.log(proc.name)[-3000:]}")
            if time.monotonic() > deadline:
                raise MasterError(f"{what} not ready in {timeout:g}s:\n{self.logs_tail()}")
            time.sleep(0.05)

    def start(self) -> None:
        """Redis, the master, then its scheduler; each ready before the next starts."""
        self.start_master()
        self.start_scheduler()

    def start_master(self) -> None:
        """Redis and the master's web app, not the scheduler: a master back from an outage
        answers its agents before its scheduler polls them. The database stays."""
        py = f"{VENV}/bin/python"
        cmd = _nspawn(self.tree, read_only=True, binds={self.state: STATE}, env=self.env)
        cmd[1:1] = ["-M", f"pyfarm-tables-{os.getpid()}-{self.port}"]
        tables = subprocess.run([*cmd, f"{VENV}/bin/pyfarm-tables"], capture_output=True,
                                text=True)
        if tables.returncode != 0:
            raise MasterError(f"pyfarm-tables failed: {tables.stdout[-2000:]}"
                              f"{tables.stderr[-2000:]}")
        redis = self._start("redis", ["redis-server", "--bind", "127.0.0.1", "--port",
                                      str(self.redis_port), "--save", "", "--appendonly", "no",
                                      "--daemonize", "no", "--dir", STATE])
        self._await("redis", lambda: _listening(self.redis_port), redis)
        (self.state / "run_master.py").write_text(RUN_MASTER)
        master = self._start("master", [py, "-u", f"{STATE}/run_master.py"])
        self._await("the master", self._answers, master)

    def start_scheduler(self) -> None:
        # The log is appended to across restarts: only what this start wrote counts.
        seen = len(self.log("scheduler"))
        # -B: beat (the periodic scheduler and agent polls) inside the worker. celery 3.1
        # refuses root with pickle accepted unless told.
        scheduler = self._start(
            "scheduler",
            [f"{VENV}/bin/celery", "-A", "pyfarm.scheduler.celery_app", "worker", "-B",
             "-c", "2", "--loglevel=info", "-s", f"{STATE}/celerybeat-schedule",
             "--pidfile=", "-n", f"pyfarm-{self.port}@localhost"],
            {"C_FORCE_ROOT": "1"})
        self._await("the scheduler", lambda: " ready." in self.log("scheduler")[seen:],
                    scheduler)

    def _answers(self) -> bool:
        try:
            return self.request("GET", "/agents/", timeout=2)[0] == 200
        except OSError:
            return False

    def stop(self) -> None:
        # Reverse order: the scheduler first (it talks to both others), redis last.
        for proc in reversed(self.procs):
            try:
                proc.stop()
            except Exception as exc:  # one failing must not leave the others running
                _log(f"stopping {proc.name}: {exc}")
        self.procs.clear()


def master_env(state: str, port: int, redis_port: int, farm_name: str | None = None,
               overrides: Mapping[str, str] = {}) -> dict[str, str]:
    """Every variable the master and scheduler read, with the cadences a test needs:
    assignment passes every few seconds, idle agents polled within seconds."""
    env = {
        "MASTER_PORT": str(port),
        "TMPDIR": f"{state}/tmp",
        "PYFARM_CONFIG_ROOT": f"{state}/etc",
        "PYFARM_DATABASE_URI": f"sqlite:///{state}/pyfarm.sqlite",
        "PYFARM_SCHEDULER_BROKER": f"redis://127.0.0.1:{redis_port}/0",
        "PYFARM_BASE_URL": f"http://127.0.0.1:{port}",
        "PYFARM_DEV_ALLOW_AGENT_LOOPBACK_ADDRESSES": "true",
        "PYFARM_SCHEDULER_LOCKFILE_BASE": f"{state}/pyfarm_scheduler_lock",
        "PYFARM_LOGFILES_DIR": f"{state}/task_logs",
        "PYFARM_SECRET_KEY": "farmnode-test-peer",
        "PYFARM_SCHEDULER_INTERVAL": "3",
        "PYFARM_AGENTS_POLL_INTERVAL": "2",
        "PYFARM_POLL_IDLE_AGENTS_INTERVAL": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "LANG": "C.UTF-8",
    }
    if farm_name is not None:
        env["PYFARM_FARM_NAME"] = farm_name
    env.update(overrides)
    return env


@contextlib.contextmanager
def running_master(farm_name: str | None = None,
                   env: Mapping[str, str] = {}) -> Iterator[Master]:
    """A fresh master (empty database) with its scheduler and redis, stopped at the end
    whatever happens."""
    tree = ensure_tree()
    runs = CACHE_ROOT / "pyfarm-runs"
    runs.mkdir(parents=True, exist_ok=True)
    state = Path(tempfile.mkdtemp(prefix="run-", dir=runs))
    for sub in ("tmp", "etc", "task_logs"):
        (state / sub).mkdir()
    port, redis_port = free_port(), free_port()
    master = Master(tree=tree, state=state, port=port, redis_port=redis_port,
                    env=master_env(STATE, port, redis_port, farm_name, env))
    with _using_tree(tree):
        try:
            master.start()
            yield master
        finally:
            master.stop()
            if os.environ.get("FARMNODE_KEEP_MASTER_STATE"):
                _log(f"kept {state}")
            else:
                shutil.rmtree(state, ignore_errors=True)


def main(argv: list[str]) -> int:
    cmd = argv[1] if len(argv) > 1 else "build"
    if cmd == "build":
        print(ensure_tree())
        return 0
    if cmd == "run":
        with running_master(farm_name=os.environ.get("PYFARM_FARM_NAME")) as m:
            print(m.url, flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                signal.pause()
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
