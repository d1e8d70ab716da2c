"""The first process of a job's warm scope: owns the job's persistent interpreter and serves
the job's tasks one request at a time.

    python3 -I -m farmnode.warm.host      (started by farmnode.warm.manager)

Like the task shim it waits at the gate (stdin) until systemd has confirmed the scope, then
reads its spec (JSON): argv, env, cwd, uid, gid, groups, socket, setup, teardown,
idle_timeout, ready_fd, journal_socket. It drops to the job's user, listens on the socket,
starts the interpreter (stdin, stdout and stderr pipes, the back-channel as FARMNODE_WARM_FD)
and says "ok" (or "error: why") on ready_fd. Its own output (and the interpreter's while no
task is served: teardown, stray prints) goes to journald under the warm scope.

The interpreter's output goes to the task being served: the task's client writes it to its
own stdout and stderr, inside the task's scope, so the task's shim journals it with the task's
fields. A command's outcome comes only from the back-channel. The setup commands run at the
start of the first request a fresh interpreter serves; teardown when the host leaves (idle
for idle_timeout, or asked to stop), with no task to serve. If the interpreter dies, the
request in flight fails with the reason, and the next request starts a fresh one (setup
again). A client that goes away while its command runs (its task was cancelled) leaves the
interpreter in an unknown state: it is killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from farmnode.warm import wire

GATE_FD = 0
RECV_SIZE = wire.MAX_REQUEST + 1
READ_SIZE = wire.CHUNK
LEAVE_GRACE = 10.0  # seconds the interpreter has to leave once its stdin is closed
TEARDOWN_TIMEOUT = 60.0  # the teardown commands, together
EXIT_MOMENT = 1.0  # seconds between a dying interpreter's back-channel closing and its exit


@dataclass
class Step:
    label: str
    code: str
    variables: dict[str, Any]


@dataclass
class Request:
    """One client's request; sock None: the host's own (teardown), output to its own log."""

    sock: socket.socket | None
    steps: list[Step]
    setup_steps: int = 0  # how many of steps are the job's setup
    pos: int = 0

    def send(self, data: bytes) -> bool:
        if self.sock is None:
            return True
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False


def describe_wait(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return f"killed by {name}"
    return f"exit code {os.WEXITSTATUS(status)}"


def steps_of(request: dict[str, Any]) -> list[Step]:
    """The commands of a run request, each labelled for the reasons; ValueError if malformed."""
    commands = request.get("commands")
    items = request.get("items")
    if not (isinstance(commands, list) and all(isinstance(c, str) for c in commands)):
        raise ValueError("commands must be a list of strings")
    if not (isinstance(items, list) and all(isinstance(i, dict) for i in items)):
        raise ValueError("items must be a list of objects")
    steps = []
    for item in items:
        variables = item.get("vars", {})
        if not isinstance(variables, dict):
            raise ValueError("items[].vars must be an object")
        where = f" of frame {item['label']}" if "label" in item else ""
        steps += [Step(f"command {n}{where}", code, variables)
                  for n, code in enumerate(commands, 1)]
    return steps


@dataclass
class Interpreter:
    proc: subprocess.Popen[bytes]
    backchannel: int
    pidfd: int
    streams: dict[int, int] = field(default_factory=dict)  # fd → 1 (stdout) or 2 (stderr)
    in_flight: bool = False
    setup_done: bool = False
    lost_backchannel: bool = False

    @classmethod
    def start(cls, spec: dict[str, Any]) -> Interpreter:
        bc_r, bc_w = os.pipe()
        env = {str(k): str(v) for k, v in spec["env"].items()}
        env[wire.BACKCHANNEL_ENV] = str(bc_w)
        try:
            proc = subprocess.Popen(
                [str(a) for a in spec["argv"]], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, pass_fds=(bc_w,), env=env, cwd=spec.get("cwd") or None,
                start_new_session=False, restore_signals=True)
        finally:
            os.close(bc_w)
        assert proc.stdout is not None and proc.stderr is not None
        for f in (proc.stdout, proc.stderr):
            os.set_blocking(f.fileno(), False)
        return cls(proc, bc_r, os.pidfd_open(proc.pid),
                   {proc.stdout.fileno(): 1, proc.stderr.fileno(): 2})

    def send(self, step: Step) -> None:
        assert self.proc.stdin is not None
        self.in_flight = True
        body = json.dumps({"code": step.code, "vars": step.variables}).encode()
        self.proc.stdin.write(str(len(body)).encode() + b"\n" + body)
        self.proc.stdin.flush()

    def read_result(self) -> dict[str, Any] | None:
        """One command's outcome from the back-channel; None: the interpreter closed it."""
        head = _read_exact(self.backchannel, wire.LENGTH_BYTES)
        if head is None:
            return None
        body = _read_exact(self.backchannel, int.from_bytes(head, "big"))
        if body is None:
            return None
        self.in_flight = False
        result: dict[str, Any] = json.loads(body)
        return result

    def close(self) -> None:
        for fd in (self.backchannel, self.pidfd):
            os.close(fd)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f is not None:
                try:  # noqa: SIM105
                    f.close()
                except OSError:
                    pass


def _read_exact(fd: int, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _write_all(fd: int, data: bytes) -> None:
    """The host's own log (journald): lines no task is served for. A journald that is away
    loses them; the host, serving the job's tasks, must not go with it."""
    while data:
        try:
            data = data[os.write(fd, data):]
        except BlockingIOError:
            select.select([], [fd], [])
        except OSError:
            return


def _last_line(tb: str) -> str:
    lines = [line for line in tb.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "an exception"


class Host:
    def __init__(self, spec: dict[str, Any], listener: socket.socket) -> None:
        self.spec = spec
        self.listener: socket.socket | None = listener
        self.socket_path = str(spec["socket"])
        self.setup = [str(c) for c in spec.get("setup") or []]
        self.teardown = [str(c) for c in spec.get("teardown") or []]
        self.idle_timeout = float(spec.get("idle_timeout") or 300.0)
        self.interp: Interpreter | None = None
        self.waiting: list[socket.socket] = []  # connected, request not read yet
        self.queue: list[Request] = []
        self.current: Request | None = None
        self.closing = False  # asked to stop: serve the queue, then leave
        self.leaving = False  # the teardown is the current request
        self.leave_by = 0.0
        self.idle_since = time.monotonic()

    # ---- requests ------------------------------------------------------------------------
    def _accept(self) -> None:
        assert self.listener is not None
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return
        conn.setblocking(True)
        self.waiting.append(conn)

    def _read_request(self, conn: socket.socket) -> None:
        self.waiting.remove(conn)
        try:
            data = conn.recv(RECV_SIZE)
            request = json.loads(data)
            if not isinstance(request, dict):
                raise ValueError("a request is a JSON object")
        except (OSError, ValueError) as exc:
            self._answer(conn, wire.DONE_FAILED, f"bad request: {exc}")
            return
        op = request.get("op")
        if op == "hold":
            self.idle_since = time.monotonic()
            if self.closing:
                self._answer(conn, wire.DONE_UNAVAILABLE, "stopping")
            else:
                self._answer(conn, wire.DONE_OK)
        elif op == "stop":
            self.closing = True
            if not request.get("teardown", True):
                self.teardown = []
            self._answer(conn, wire.DONE_OK)
        elif op == "run":
            try:
                steps = steps_of(request)
            except ValueError as exc:
                self._answer(conn, wire.DONE_FAILED, f"bad request: {exc}")
                return
            self.queue.append(Request(conn, steps))
        else:
            self._answer(conn, wire.DONE_FAILED, f"bad request: unknown op {op!r}")

    def _answer(self, conn: socket.socket, status: int, reason: str = "") -> None:
        with contextlib.suppress(OSError):
            conn.sendall(wire.done(status, reason))
        conn.close()

    def _next_request(self) -> None:
        if self.current is not None:
            return
        if self.queue:
            req = self.queue.pop(0)
        elif (self.closing or time.monotonic() - self.idle_since >= self.idle_timeout) \
                and not self.leaving:
            self._begin_leaving()
            return
        else:
            return
        if self.interp is None:
            try:
                self.interp = Interpreter.start(self.spec)
            except OSError as exc:
                req.send(wire.done(wire.DONE_UNAVAILABLE, "cannot start the job's warm "
                                   f"process: {exc.strerror or exc}"))
                self._end_request(req)
                return
        if not self.interp.setup_done and req.sock is not None:
            setup = [Step(f"setup command {n}", code, {}) for n, code in
                     enumerate(self.setup, 1)]
            req.steps[:0] = setup
            req.setup_steps = len(setup)
        self.current = req
        self._advance()

    def _advance(self) -> None:
        """Send the current request's next command, or end it."""
        req = self.current
        assert req is not None and self.interp is not None
        if req.pos == req.setup_steps and req.sock is not None:
            self.interp.setup_done = True
        if req.pos >= len(req.steps):
            req.send(wire.done(wire.DONE_OK))
            self._end_request(req)
            return
        with contextlib.suppress(OSError):  # it is dying: its pidfd says so next
            self.interp.send(req.steps[req.pos])

    def _end_request(self, req: Request) -> None:
        if req.sock is not None:
            req.sock.close()
        if self.current is req:
            self.current = None
        self.idle_since = time.monotonic()

    # ---- the interpreter -----------------------------------------------------------------
    def _drain(self) -> None:
        """Hand on all the output the pipes hold now (before an outcome or a death)."""
        while self.interp is not None and any(self._read_once(fd) > 0
                                              for fd in list(self.interp.streams)):
            pass

    def _read_once(self, fd: int) -> int:
        """Hand one read of the interpreter's output on: 1 data, 0 none now, -1 its end."""
        assert self.interp is not None
        try:
            data = os.read(fd, READ_SIZE)
        except BlockingIOError:
            return 0
        if not data:
            self.interp.streams.pop(fd, None)
            return -1
        stream = self.interp.streams[fd]
        if self.current is not None and self.current.sock is not None:
            if not self.current.send((wire.OUT if stream == 1 else wire.ERR) + data):
                self._client_gone()
        else:
            _write_all(stream, data)
        return 1

    def _result(self) -> None:
        assert self.interp is not None
        result = self.interp.read_result()
        if result is None:
            # A dying process closes its fds a moment before its pidfd says it died: give it
            # that moment. (Not proc.poll(): it would reap it before _died reads its status.)
            alive = not select.select([self.interp.pidfd], [], [], EXIT_MOMENT)[0]
            if alive and not self.interp.lost_backchannel:
                # Alive, but a command closed the back-channel (os.closerange...): no outcome
                # can come any more, and the task would wait for ever.
                self.interp.lost_backchannel = True
                with contextlib.suppress(OSError):
                    self.interp.proc.kill()
            return  # its pidfd reports the death
        self._drain()
        req = self.current
        if req is None:
            return  # a client that went away: its interpreter is gone already
        step = req.steps[req.pos]
        ok = bool(result.get("ok"))
        tb = str(result.get("traceback") or "")
        req.send(wire.result(ok, tb))
        if ok:
            req.pos += 1
            self._advance()
            return
        if req.sock is None:
            _write_all(2, f"{step.label} failed:\n{tb}".encode())
            req.pos += 1
            self._advance()
            return
        reason = f"{step.label} raised {_last_line(tb)}"
        req.send(wire.done(wire.DONE_FAILED, reason))
        self._end_request(req)
        if req.pos < req.setup_steps:
            # A half-done setup: the next task gets a fresh interpreter and the setup again.
            self._kill()

    def _died(self) -> None:
        interp = self.interp
        assert interp is not None
        self._drain()
        _, status = os.waitpid(interp.proc.pid, 0)
        interp.proc.returncode = status
        interp.close()
        self.interp = None
        req = self.current
        if req is None:
            return
        what = f" while running {req.steps[req.pos].label}" if req.pos < len(req.steps) else ""
        how = describe_wait(status)
        if interp.lost_backchannel:
            how = f"its back-channel was closed, so it was stopped ({how})"
        reason = f"the job's warm process (pid {interp.proc.pid}) died{what}: {how}"
        if req.sock is None:
            _write_all(2, (reason + "\n").encode())
        req.send(wire.done(wire.DONE_UNAVAILABLE, reason))
        self._end_request(req)

    def _kill(self) -> None:
        interp = self.interp
        if interp is None:
            return
        try:  # noqa: SIM105
            interp.proc.kill()
        except OSError:
            pass
        current, self.current = self.current, None
        self._died()
        self.current = current

    def _client_gone(self) -> None:
        req = self.current
        assert req is not None
        if self.interp is not None and self.interp.in_flight:
            _write_all(2, f"the task's client left while {req.steps[req.pos].label} ran "
                          "(cancelled): its warm process is stopped\n".encode())
            self.current = None
            self._kill()
        self._end_request(req)

    # ---- leaving -------------------------------------------------------------------------
    def _begin_leaving(self) -> None:
        self.leaving = True
        self.leave_by = time.monotonic() + TEARDOWN_TIMEOUT
        # No task reaches a host that is leaving: the agent starts a fresh one.
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        try:  # noqa: SIM105
            os.unlink(self.socket_path)
        except OSError:
            pass
        for conn in self.waiting:
            conn.close()
        self.waiting.clear()
        if self.interp is not None and self.interp.setup_done and self.teardown:
            self.current = Request(None, [Step(f"teardown command {n}", code, {})
                                          for n, code in enumerate(self.teardown, 1)])
            self._advance()

    def _finish(self) -> None:
        interp = self.interp
        if interp is None:
            return
        assert interp.proc.stdin is not None
        try:  # noqa: SIM105
            interp.proc.stdin.close()
        except OSError:
            pass
        deadline = time.monotonic() + LEAVE_GRACE
        while self.interp is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                self._kill()
                break
            r, _, _ = select.select([*interp.streams, interp.pidfd], [], [], left)
            for fd in r:
                if fd == interp.pidfd:
                    self._died()
                    break
                self._read_once(fd)

    def run(self) -> None:
        while True:
            self._next_request()
            if self.leaving and self.current is None:
                break
            if self.leaving and time.monotonic() > self.leave_by:
                _write_all(2, b"the teardown ran longer than its time: it is stopped\n")
                self.current = None
                break
            poller = select.poll()
            if self.listener is not None:
                poller.register(self.listener, select.POLLIN)
            for conn in self.waiting:
                poller.register(conn, select.POLLIN)
            if self.current is not None and self.current.sock is not None:
                poller.register(self.current.sock, select.POLLIN)
            if self.interp is not None:
                for fd in self.interp.streams:
                    poller.register(fd, select.POLLIN)
                if not self.interp.lost_backchannel:
                    poller.register(self.interp.backchannel, select.POLLIN)
                poller.register(self.interp.pidfd, select.POLLIN)
            timeout = None
            if self.current is None and not self.queue:
                left = self.idle_since + self.idle_timeout - time.monotonic()
                timeout = max(0, int(left * 1000) + 1)
            elif self.leaving:
                timeout = max(0, int((self.leave_by - time.monotonic()) * 1000) + 1)
            events = dict(poller.poll(timeout))
            if self.interp is not None:
                # Output first, then outcomes, then a death: each task gets its own lines.
                for fd in list(self.interp.streams):
                    if fd in events and self.interp is not None:
                        self._read_once(fd)
                if self.interp is not None and self.interp.backchannel in events:
                    self._result()
                if self.interp is not None and self.interp.pidfd in events:
                    self._died()
            if self.current is not None and self.current.sock is not None and \
                    self.current.sock.fileno() in events:
                # A client sends nothing after its request: readable means it left.
                self._client_gone()
            for conn in list(self.waiting):
                if conn.fileno() in events:
                    self._read_request(conn)
            if self.listener is not None and self.listener.fileno() in events:
                self._accept()
        self._finish()


def _drop_privileges(spec: dict[str, Any]) -> None:
    uid, gid = int(spec["uid"]), int(spec["gid"])
    if uid == os.geteuid():
        return  # the host tests and the benchmark run it as themselves
    os.setgroups([int(g) for g in spec["groups"]])
    os.setgid(gid)
    os.setuid(uid)


def _connect_journal(path: str, identifier: str, priority: int, fd: int) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    sock.shutdown(socket.SHUT_RD)
    # identifier, unit id, priority, level prefix, to syslog, kmsg, console
    sock.sendall(f"{identifier}\n\n{priority}\n0\n0\n0\n0\n".encode())
    os.dup2(sock.fileno(), fd)
    sock.close()


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def main() -> int:
    data = _read_all(GATE_FD)
    if not data:
        return 125  # the agent closed the gate: the scope could not be made
    spec: dict[str, Any] = json.loads(data)
    ready = int(spec["ready_fd"])
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, GATE_FD)
    os.close(devnull)
    # A cancel's SIGTERM reaches the whole task scope, never this one: only a stop of the
    # warm scope sends it here, and then the host and its interpreter simply end.
    try:
        journal = str(spec.get("journal_socket") or "")
        if journal:
            _connect_journal(journal, "farmnode-warm", 6, 1)
            _connect_journal(journal, "farmnode-warm", 4, 2)
        _drop_privileges(spec)
        os.umask(0o077)
        path = str(spec["socket"])
        try:  # noqa: SIM105
            os.unlink(path)
        except FileNotFoundError:
            pass
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        listener.bind(path)
        listener.listen(64)
        listener.setblocking(False)
        host = Host(spec, listener)
        host.interp = Interpreter.start(spec)
    except (OSError, ValueError, KeyError) as exc:
        msg = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        os.write(ready, f"error: {msg}\n".encode())
        return 1
    os.write(ready, f"ok {host.interp.proc.pid}\n".encode())
    os.close(ready)
    host.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
