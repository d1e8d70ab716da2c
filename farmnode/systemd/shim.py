"""The first process of every task scope: waits at the gate, runs the job, journals its output.

The agent starts this shim, moves it into a new scope with StartTransientUnit, and only when
systemd has confirmed the scope (JobRemoved) writes the job's spec to the gate (the shim's
stdin), so no process of the job ever runs outside its scope. The job gets /dev/null as stdin.

The shim stays as the job's parent inside the scope. It reads the job's stdout and stderr,
forwards them to the agent over the link (its stdout, a SOCK_SEQPACKET socket; see link.py)
and writes to journald what the agent answers (the lines after the job type's hooks), over
one journald stream connection per output stream: opened from inside the scope, so journald
files the lines under the scope. It keeps every byte until it is journaled, so an agent that
dies or restarts loses nothing; if the agent's end of the link is gone for good, it journals
the raw output itself. It ignores the stop signals meant for the job, records the job's exit
status and the scope's final accounting (a file in the runtime directory and an EXIT packet),
and leaves once the agent has recorded the exit — or once the job ended and the agent is gone.
Standard library only: this starts once per task and must be cheap.
"""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import socket
import sys

from farmnode.systemd import framing, link
from farmnode.systemd.cgroup import own_cgroup_dir, read_accounting

# Not typing.TYPE_CHECKING: importing typing costs ~2 ms of every task's start (mypy treats
# any name TYPE_CHECKING as true).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

GATE_FD = 0
LINK_FD = 1
# Every signal meant for the job (a cancel's SIGTERM, SignalTask's anything) reaches the whole
# scope, the shim included; it ignores all it can. Not SIGCHLD: ignoring it would make the
# kernel reap the job before the shim could read its status.
SHIELDED = tuple(s for s in signal.valid_signals()
                 if s not in (signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD)
                 and signal.getsignal(s) is not None)
BUFFER_CAP = 64 * 1024 * 1024  # per stream, unacknowledged: beyond it the job is slowed down
READ_SIZE = link.MAX_PAYLOAD


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _write_status(path: str, record: dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


def _set_oom_score_adj(value: int) -> None:
    # The OOM killer must pick the job, never the shim that reports its death.
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(value))
    except OSError:
        pass


def _set_name(name: str) -> None:
    # ps, top and journald's _COMM (the lines it writes come from this process) show this
    # instead of "python3".
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(name)
    except OSError:
        pass


def _exec_job(spec: dict[str, Any], out_w: int, err_w: int, err_fd: int) -> None:
    """In the forked child: wire stdio, drop privileges, enter cwd, exec. Never returns."""
    stage = "setup"
    try:
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        for sig in SHIELDED:
            # Back to defaults (Python itself ignores SIGPIPE and SIGXFSZ): a renderer writing
            # to a closed pipe should die as usual.
            signal.signal(sig, signal.SIG_DFL)
        _set_oom_score_adj(0)
        stage = "set groups"
        os.setgroups([int(g) for g in spec["groups"]])
        stage = "set gid"
        os.setgid(int(spec["gid"]))
        stage = "set uid"
        os.setuid(int(spec["uid"]))
        cwd = spec.get("cwd")
        if cwd:
            stage = f"chdir {cwd}"
            os.chdir(str(cwd))
        argv = [str(a) for a in spec["argv"]]
        env = {str(k): str(v) for k, v in spec["env"].items()}
        stage = f"exec {argv[0]}"
        os.execvpe(argv[0], argv, env)
    except BaseException as exc:
        msg = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        os.write(err_fd, f"{stage}: {msg}".encode())
    os._exit(127)


JOURNAL_SOCKET = "/run/systemd/journal/stdout"
RECV_SIZE = 256 * 1024  # a SEQPACKET read shorter than the packet would lose its tail


class JournalStream:
    """One journald stdout-stream connection (the protocol systemd uses for services)."""

    def __init__(self, path: str, identifier: str, priority: int) -> None:
        self.path = path
        self.identifier = identifier
        self.priority = priority
        self.sock: socket.socket | None = None
        self.framer = framing.Framer(priority)  # raw output (no agent): where prefixes go

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.path)
            sock.shutdown(socket.SHUT_RD)
            # identifier, unit id, priority, level prefix, to syslog, kmsg, console: journald
            # then reads "<N>" at the start of each line as that line's priority.
            sock.sendall(f"{self.identifier}\n\n{self.priority}\n1\n0\n0\n0\n".encode())
        except OSError:
            sock.close()
            raise
        self.sock = sock

    def write(self, data: bytes) -> None:
        """Blocking: a journald slower than the job slows the job, never drops a line."""
        for attempt in range(50):
            try:
                if self.sock is None:
                    self.connect()
                assert self.sock is not None
                self.sock.sendall(data)
                return
            except OSError:
                # journald keeps its streams across its own restarts; a broken one is
                # reopened (bytes of the failed write may be in the old one already).
                if self.sock is not None:
                    self.sock.close()
                    self.sock = None
                if attempt:
                    select.select([], [], [], 0.1)

    def write_raw(self, data: bytes) -> None:
        """The job's own bytes with the default priority (when no agent formats them): every
        line journald reads starts with our prefix, whatever NULs or "<N>" the job prints."""
        out = self.framer.feed(data)
        if out:
            self.write(out)

    def finish_raw(self) -> None:
        end = self.framer.finish()
        if end:
            self.write(end)


class Stream:
    # A plain class: dataclasses (with inspect) and typing cost the shim ~12 ms of start-up,
    # which is on every task's launch path (bench/REPORT.md).
    __slots__ = ("base", "buf", "eof", "fd", "index", "journal", "nonce", "sent")

    def __init__(self, index: int, fd: int, journal: JournalStream) -> None:
        self.index = index
        self.fd = fd
        self.journal = journal
        self.base = 0  # absolute offset of buf[0]: everything below it is journaled
        self.buf = bytearray()
        self.sent = 0  # absolute offset up to which data went out on the link
        self.eof = False
        self.nonce = 0  # of the last RESUME, echoed in RESUMED

    @property
    def end(self) -> int:
        return self.base + len(self.buf)

    def free_below(self, offset: int) -> None:
        if offset > self.base:
            drop = min(offset, self.end) - self.base
            del self.buf[:drop]
            self.base += drop
        self.sent = max(self.sent, self.base)

    def journal_raw(self) -> None:
        if self.buf:
            self.journal.write_raw(bytes(self.buf))
            self.base += len(self.buf)
            self.sent = self.base
            self.buf.clear()


class Forwarder:
    def __init__(self, sock: socket.socket, streams: list[Stream], pid: int) -> None:
        self.sock = sock
        self.streams = streams
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)
        self.exit_record: dict[str, Any] | None = None
        self.exit_sent = False
        self.exit_acked = False
        self.resumed: list[Stream] = []  # RESUMED answers owed, sent before any more DATA
        # The agent's end is closed for good (the service was stopped and its fd store
        # flushed): the shim journals the job's raw output itself until the job ends.
        self.link_gone = False

    def _send(self, packet: bytes) -> bool:
        try:
            self.sock.send(packet)
            return True
        except BlockingIOError:
            return False
        except (BrokenPipeError, ConnectionResetError):
            self._lose_link()
            return False

    def _lose_link(self) -> None:
        if not self.link_gone:
            self.link_gone = True
            for s in self.streams:
                s.journal_raw()

    def _pump_out(self) -> None:
        while self.resumed:
            s = self.resumed[0]
            if not self._send(link.pack(link.RESUMED, s.index, s.base,
                                        s.nonce.to_bytes(8, "big"))):
                return
            self.resumed.pop(0)
        for s in self.streams:
            while s.sent < s.end:
                start = s.sent - s.base
                chunk = bytes(s.buf[start:start + link.MAX_PAYLOAD])
                if not self._send(link.pack(link.DATA, s.index, s.sent, chunk)):
                    return
                s.sent += len(chunk)
        if self.exit_record is not None and not self.exit_sent and self._finished_output():
            record = dict(self.exit_record)
            record["ends"] = [s.end for s in self.streams]
            self.exit_sent = self._send(link.pack(link.EXIT, payload=json.dumps(record).encode()))

    def _finished_output(self) -> bool:
        return all(s.eof and s.sent == s.end for s in self.streams)

    def _handle_link(self) -> None:
        while True:
            try:
                packet = self.sock.recv(RECV_SIZE)
            except BlockingIOError:
                return
            except ConnectionResetError:
                packet = b""
            if not packet:
                self._lose_link()
                return
            kind, stream, offset, payload = link.unpack(packet)
            if kind == link.EXIT_ACK:
                self.exit_acked = True
                return
            if stream >= len(self.streams):
                continue
            s = self.streams[stream]
            if kind == link.WRITE:
                if offset >= s.base:  # below it: already journaled (never sent twice)
                    if payload:
                        s.journal.write(payload)
                    s.free_below(offset)
            elif kind == link.RESUME:
                s.sent = s.base
                s.nonce = offset
                if s not in self.resumed:
                    self.resumed.append(s)
                self.exit_sent = False  # a new agent: say it again after the data

    def _drain(self, s: Stream) -> None:
        try:
            data = os.read(s.fd, READ_SIZE)
        except BlockingIOError:
            return
        if data:
            if self.link_gone:
                s.journal.write_raw(data)
                s.base += len(data)
                s.sent = s.base
            else:
                s.buf += data
        else:
            s.eof = True
            os.close(s.fd)
    def _reap(self, status_path: str, exec_error: str) -> None:
        _, wstatus = os.waitpid(self.pid, 0)
        os.close(self.pidfd)
        self.pidfd = -1
        # Output still in the pipes belongs to the task; anything a leftover background
        # process writes later does not (the agent stops the scope once the task ended).
        for s in self.streams:
            while not s.eof:
                before = s.end
                self._drain(s)
                if s.end == before and not s.eof:
                    s.eof = True
                    os.close(s.fd)
        record: dict[str, Any] = {"pid": self.pid}
        if exec_error:
            record["error"] = exec_error
        if os.WIFSIGNALED(wstatus):
            record["signal"] = os.WTERMSIG(wstatus)
            record["core_dumped"] = os.WCOREDUMP(wstatus)
        else:
            record["exit_code"] = os.WEXITSTATUS(wstatus)
        record["accounting"] = read_accounting(own_cgroup_dir())
        record["ends"] = [s.end for s in self.streams]
        _write_status(status_path, record)
        self.exit_record = record

    def run(self, status_path: str, exec_error: str) -> None:
        while not (self.exit_acked or (self.link_gone and self.pidfd < 0)):
            if not self.link_gone:
                self._pump_out()
            poller = select.poll()
            wanted: dict[int, Stream] = {}
            for s in self.streams:
                if not s.eof and len(s.buf) < BUFFER_CAP:
                    poller.register(s.fd, select.POLLIN)
                    wanted[s.fd] = s
            if self.pidfd >= 0:
                poller.register(self.pidfd, select.POLLIN)
            if not self.link_gone:
                link_events = select.POLLIN
                if self.resumed or any(s.sent < s.end for s in self.streams) or (
                    self.exit_record is not None and not self.exit_sent
                ):
                    link_events |= select.POLLOUT
                poller.register(self.sock.fileno(), link_events)
            for fd, event in poller.poll():
                if fd == self.sock.fileno():
                    if event & (select.POLLIN | select.POLLHUP | select.POLLERR):
                        self._handle_link()
                elif fd == self.pidfd:
                    self._reap(status_path, exec_error)
                elif (st := wanted.get(fd)) is not None:
                    self._drain(st)
        if self.link_gone:
            for s in self.streams:
                s.journal.finish_raw()


def _refuse(sock: socket.socket, status_path: str, reason: str) -> int:
    """The job cannot run: record why, tell the agent, wait until it has recorded it."""
    record = {"error": reason, "accounting": read_accounting(own_cgroup_dir())}
    _write_status(status_path, record)
    try:
        sock.send(link.pack(link.EXIT, payload=json.dumps(record).encode()))
        while (packet := sock.recv(RECV_SIZE)) and link.unpack(packet)[0] != link.EXIT_ACK:
            pass
    except OSError:
        pass  # the agent is gone; the status file tells the next one
    return 125


def main() -> int:
    data = _read_all(GATE_FD)
    if not data:
        # The agent closed the gate without a spec: the scope could not be created.
        return 125
    spec = json.loads(data)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, GATE_FD)
    os.close(devnull)
    status_path = str(spec["status_path"])
    _set_oom_score_adj(-1000)
    _set_name("farmnode-shim")
    for sig in SHIELDED:
        signal.signal(sig, signal.SIG_IGN)
    sock = socket.socket(fileno=os.dup(LINK_FD))
    null_out = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null_out, LINK_FD)  # a stray print must never corrupt the link
    os.close(null_out)
    # The socket is configurable only for the host tests' stand-in journald.
    journal_socket = str(spec.get("journal_socket") or JOURNAL_SOCKET)
    journals = [JournalStream(journal_socket, str(ident), int(prio))
                for ident, prio in spec["journal"]]
    try:
        for j in journals:
            j.connect()
    except OSError as exc:
        # Output that could not be kept: the job does not run at all.
        return _refuse(sock, status_path, f"cannot connect to journald ({journal_socket}): "
                                          f"{exc.strerror or exc}")
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    exec_r, exec_w = os.pipe()  # close-on-exec: EOF without data means exec succeeded
    pid = os.fork()
    if pid == 0:
        for fd in (out_r, err_r, exec_r, sock.fileno()):
            os.close(fd)
        _exec_job(spec, out_w, err_w, exec_w)
    for fd in (out_w, err_w, exec_w):
        os.close(fd)
    exec_error = _read_all(exec_r).decode(errors="replace")
    os.close(exec_r)
    sock.setblocking(True)
    try:
        sock.send(link.pack(link.STARTED, payload=json.dumps({"pid": pid}).encode()))
    except OSError as exc:
        if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
            raise
    sock.setblocking(False)
    for fd in (out_r, err_r):
        os.set_blocking(fd, False)
    fwd = Forwarder(sock, [Stream(link.STDOUT, out_r, journals[0]),
                           Stream(link.STDERR, err_r, journals[1])], pid)
    fwd.run(status_path, exec_error)
    record = fwd.exit_record or {}
    if "signal" in record:
        return 128 + int(record["signal"])
    return int(record.get("exit_code", 0))


if __name__ == "__main__":
    sys.exit(main())
