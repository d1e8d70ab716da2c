"""The first process of every task scope: waits at the gate, runs the job, journals its output.

The agent starts this shim, moves it into a new scope with StartTransientUnit, and only when
systemd has confirmed the scope (JobRemoved) writes the job's spec to the gate (the shim's
stdin), so no process of the job ever runs outside its scope. The job gets /dev/null as stdin.

The shim stays as the job's parent inside the scope. It reads the job's stdout and stderr,
forwards them to the agent over the link (its stdout, a SOCK_SEQPACKET socket; see link.py)
and writes to journald what the agent answers (the lines after the job type's hooks), over
one journald stream connection per output stream: opened from inside the scope, so journald
files the lines under the scope. It keeps every byte until journald has read it, so an agent
that dies or restarts loses nothing, and neither does a journald that is stopped: the shim
reopens the stream when journald is back (JournalStream) and meanwhile stops reading the
job's pipes once it holds BUFFER_CAP, so the job blocks on its writes. If the agent's end of
the link is gone for good, it journals the raw output itself. It ignores the stop signals
meant for the job, records the job's exit status and the scope's final accounting (a file in
the runtime directory and an EXIT packet), and leaves once the agent has recorded the exit
and journald has read every line — or once the job ended, the agent is gone and journald has
read every line.
Standard library only: this starts once per task and must be cheap.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import select
import signal
import socket
import struct
import sys
import time
from collections import deque

from farmnode.systemd import framing, link
from farmnode.systemd.cgroup import SHIM_NAME, own_cgroup_dir, read_accounting

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
# Per stream, not yet journaled: beyond it the job blocks on its pipe. Its formatted copy
# (the agent's WRITEs, queued for journald) comes on top: a task holds about four times this.
BUFFER_CAP = 64 * 1024 * 1024
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


def _exec_job(spec: dict[str, Any], out_w: int, err_w: int, err_fd: int,
              report_fd: int) -> None:
    """In the forked child: wire stdio, drop privileges, enter cwd, exec (or, with hooks,
    become their supervisor: farmnode.systemd.hooks). Never returns."""
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
        pre, post = spec.get("pre"), spec.get("post")
        if pre or post:
            from farmnode.systemd import hooks

            stage = "start the hooks"
            for sig in SHIELDED:
                # The stop signals are the job's (and the hooks'), never their supervisor's.
                signal.signal(sig, signal.SIG_IGN)
            os.close(err_fd)  # running: what fails from here on comes as a report
            os._exit(hooks.supervise([str(a) for a in pre] if pre else None, argv,
                                     [str(a) for a in post] if post else None, env,
                                     report_fd, SHIELDED))
        stage = f"exec {argv[0]}"
        os.execvpe(argv[0], argv, env)
    except BaseException as exc:
        msg = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        os.write(err_fd, f"{stage}: {msg}".encode())
    os._exit(127)


JOURNAL_SOCKET = "/run/systemd/journal/stdout"
RECV_SIZE = 256 * 1024  # a SEQPACKET read shorter than the packet would lose its tail
SIOCOUTQ = 0x5411  # bytes sent on a socket that the peer has not read yet (see confirm())
RETRY_FIRST, RETRY_MAX = 0.05, 1.0  # seconds between tries to reach journald again
CONFIRM_EVERY = 0.02  # while journald has not read everything yet: how often to look
# Once the job has ended and the agent has its exit, how long the shim waits for a journald
# that is away before it leaves, its held output in the spool for the agent to journal
# (task_journal_grace; the spec carries it).
JOURNAL_GRACE = 60.0
SPOOL_META_EVERY = 0.2  # seconds between rewrites of a spool's record while it changes


def spool_paths(status_path: str, identifier: str) -> tuple[str, str]:
    """(data, record) of a stream's spool: the formatted lines journald has not taken, kept
    on disk while journald is away so that a stopped scope (SIGKILL) or a shim that leaves
    loses none of them (farmnode.systemd.spool journals them later)."""
    return f"{status_path}.{identifier}.spool", f"{status_path}.{identifier}.spool.json"


class JournalStream:
    """One journald stdout stream (the protocol systemd uses for services), with the bytes
    journald has not taken yet.

    Bytes are freed only once journald has read them, whole lines only: it turns every line
    it reads into an entry at once, while a read that ends inside a line leaves that part in
    its buffer, gone if journald is stopped then. When the connection breaks (journald was
    stopped: its end is closed and what it had not read with it), the bytes are kept and the
    shim tries to reach journald again, forever: the job is slowed, never a byte dropped. Of
    the bytes sent but not known to be read when it broke, journald may have taken some lines
    and lost the rest; once it is back, the journal says how many (resolve()), and only the
    rest is sent again, on a new connection with the same header, so every line is in the
    journal once and in order."""

    def __init__(self, path: str, identifier: str, priority: int,
                 journalctl: str = "journalctl") -> None:
        self.path = path
        self.identifier = identifier
        self.priority = priority
        self.journalctl = journalctl
        self.sock: socket.socket | None = None
        self.framer = framing.Framer(priority)  # raw output (no agent): where prefixes go
        self.buf = bytearray()  # not known to be taken by journald yet
        self.base = 0  # offset (in all bytes ever queued) of buf[0]
        self.written = 0  # offset up to which buf went out on the current connection
        self.marks: deque[tuple[int, int]] = deque()  # (end in buf's offsets, raw offset)
        self.taken_raw = 0  # the job's stream is journaled up to here
        self.opened_at = 0.0  # wall clock before the current connection was made
        self.lines_taken = 0  # lines journald took on the current connection
        self.unresolved = False  # it broke with bytes in it that journald may have taken
        self.retry_at = 0.0  # monotonic; when to try to reach journald again
        self.retry_delay = RETRY_FIRST
        self.down_since: float | None = None  # wall clock: journald unreachable since
        self.outages: list[tuple[float, float]] = []  # (from, to) wall clock, not yet noted
        self.spool_path = ""  # set by the shim; empty: no spool (the host tests' streams)
        self.spool_fd = -1
        self.spool_start = 0  # offset (in all bytes ever queued) of the spool file's byte 0
        self.spooled = 0  # offset up to which the spool file holds buf
        self.spool_meta: tuple[int, int, float] | None = None  # as last recorded
        self.spool_meta_at = 0.0
        self.spool_error = ""

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        opened_at = time.time()
        # A journald that is dead while its socket unit listens accepts into the backlog;
        # a full backlog would block the connect for good.
        sock.settimeout(5)
        try:
            sock.connect(self.path)
            sock.shutdown(socket.SHUT_RD)
            # identifier, unit id, priority, level prefix, to syslog, kmsg, console: journald
            # then reads "<N>" at the start of each line as that line's priority.
            sock.sendall(f"{self.identifier}\n\n{self.priority}\n1\n0\n0\n0\n".encode())
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self.sock = sock
        self.opened_at = opened_at

    # ---- what the forwarder calls -------------------------------------------------------
    def add(self, data: bytes, raw_end: int) -> None:
        """Queue formatted lines that cover the job's stream up to raw_end."""
        self.buf += data
        self.marks.append((self.base + len(self.buf), raw_end))
        if not self.buf:  # a WRITE with no lines (a hook dropped them): nothing to wait for
            self._release(0)

    def add_raw(self, data: bytes, raw_end: int) -> None:
        """The job's own bytes with the default priority (when no agent formats them): every
        line journald reads starts with our prefix, whatever NULs or "<N>" the job prints."""
        self.add(self.framer.feed(data), raw_end)

    def finish_raw(self) -> None:
        end = self.framer.finish()
        if end:
            self.add(end, self.taken_raw if not self.marks else self.marks[-1][1])

    @property
    def pending(self) -> bool:
        return bool(self.buf)

    def wants_out(self) -> bool:
        return self.sock is not None and self.written < self.base + len(self.buf)

    def timeout(self, now: float) -> float | None:
        """Seconds until this stream needs a look without an event, None: never."""
        if self.sock is None:
            return max(0.0, self.retry_at - now) if self.buf or self.unresolved else None
        return CONFIRM_EVERY if self.written > self.base else None

    def pump(self, now: float) -> None:
        """Reconnect when due, write what the socket takes, free what journald has read."""
        if self.sock is None:
            if now < self.retry_at or not (self.buf or self.unresolved):
                return
            old_opened_at = self.opened_at
            try:
                self.connect()
            except OSError:
                if self.down_since is None:
                    self.down_since = time.time()
                self.retry_at = now + self.retry_delay
                self.retry_delay = min(self.retry_delay * 2, RETRY_MAX)
                return
            self.retry_delay = RETRY_FIRST
            if self.unresolved:
                self.resolve(old_opened_at)
            self.lines_taken = 0
            self.written = self.base
            if self.down_since is not None:
                self.outages.append((self.down_since, time.time()))
                self.down_since = None
        self.flush()
        self.confirm()

    def broken(self) -> None:
        """The connection is gone (journald stopped): keep everything, try again soon."""
        if self.sock is None:
            return
        # The kernel marks the survivor ECONNRESET when the closed end still had bytes to
        # read; otherwise journald read all that was written, and made entries of every whole
        # line of it.
        lost = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNRESET
        self.sock.close()
        self.sock = None
        if not lost and self.written > self.base:
            cut = self.buf.rfind(b"\n", 0, self.written - self.base) + 1
            if cut:
                self._release(cut)
        self.unresolved = self.unresolved or (lost and self.written > self.base)
        if self.down_since is None:
            self.down_since = time.time()
        self.retry_at = 0.0

    # ---- the spool ----------------------------------------------------------------------
    def spool(self, now: float, force: bool = False) -> None:
        """While journald is away (and until it has taken what was held): keep buf on disk.

        The file only grows (written at each byte's offset from spool_start); its record says
        from where on journald had not taken it (base) and what the journal needs to tell how
        many of the following lines it took after all (the connection's opening time and the
        lines taken on it: see resolve()). A record older than the file is still true, only
        less precise: the journal count corrects it."""
        if not self.spool_path or self.spool_error:
            return
        if self.spool_fd < 0:
            if self.sock is not None or not (self.buf or self.unresolved):
                return
            try:
                self.spool_fd = os.open(self.spool_path,
                                        os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                                        0o600)
            except OSError as exc:
                self._spool_failed(exc)
                return
            self.spool_start = self.spooled = self.base
            force = True
        elif self.sock is not None and not self.buf and not self.unresolved:
            # journald has taken all: the spool is of no use any more.
            os.close(self.spool_fd)
            self.spool_fd = -1
            for path in spool_paths_of(self.spool_path):
                try:  # noqa: SIM105 (contextlib would cost every task's start an import)
                    os.unlink(path)
                except OSError:
                    pass
            self.spool_meta = None
            return
        end = self.base + len(self.buf)
        try:
            start = max(self.spooled, self.base)
            while start < end:
                start += os.pwrite(self.spool_fd, memoryview(self.buf)[start - self.base:],
                                   start - self.spool_start)
            self.spooled = end
            meta = (self.base, self.lines_taken, self.opened_at)
            if meta != self.spool_meta and (force or now - self.spool_meta_at >= SPOOL_META_EVERY):
                _write_status(spool_paths_of(self.spool_path)[1], {
                    "identifier": self.identifier, "priority": self.priority,
                    "pid": os.getpid(), "start": self.spool_start, "base": self.base,
                    "lines_taken": self.lines_taken, "opened_at": self.opened_at})
                self.spool_meta = meta
                self.spool_meta_at = now
        except OSError as exc:
            self._spool_failed(exc)

    def _spool_failed(self, exc: OSError) -> None:
        self.spool_error = f"cannot spool to {self.spool_path}: {exc.strerror or exc}"

    @property
    def spool_current(self) -> bool:
        """Everything held is in the spool and its record is up to date."""
        return (self.spool_fd >= 0 and not self.spool_error
                and self.spooled == self.base + len(self.buf)
                and self.spool_meta == (self.base, self.lines_taken, self.opened_at))

    # ---- inside -------------------------------------------------------------------------
    def flush(self) -> None:
        while self.sock is not None and self.written < self.base + len(self.buf):
            try:
                n = self.sock.send(memoryview(self.buf)[self.written - self.base:])
            except BlockingIOError:
                return
            except OSError:
                self.broken()
                return
            self.written += n

    def confirm(self) -> None:
        if self.sock is None or self.written <= self.base:
            return
        # What journald has not read is at most what is still charged to this socket (the
        # kernel counts buffer sizes, never less than the bytes), so at least the rest has
        # been read: a lower bound, exact once journald has read everything.
        unread = struct.unpack("i", fcntl.ioctl(self.sock.fileno(), SIOCOUTQ, b"\0" * 4))[0]
        # A closed peer's unread bytes are thrown away after the hang-up is flagged: a count
        # taken with no hang-up flagged after it is a true one.
        if self.hung_up():
            self.broken()
            return
        read = self.written - max(unread, 0) - self.base
        if read > 0:
            cut = self.buf.rfind(b"\n", 0, read) + 1
            if cut:
                self._release(cut)

    def hung_up(self) -> bool:
        assert self.sock is not None
        p = select.poll()
        p.register(self.sock.fileno(), 0)
        return any(ev & (select.POLLHUP | select.POLLERR) for _, ev in p.poll(0))

    def _release(self, n: int) -> None:
        self.lines_taken += self.buf.count(b"\n", 0, n)
        del self.buf[:n]
        self.base += n
        while self.marks and self.marks[0][0] <= self.base:
            self.taken_raw = self.marks.popleft()[1]

    def resolve(self, opened_at: float) -> None:
        """After a broken connection: drop the lines journald took of those not known taken.

        The entries of that connection are the stream's entries of this process since it
        was opened (the ones before were made by a journald that was gone by then); of them
        lines_taken were already freed, the rest are the first lines of buf."""
        self.unresolved = False
        stored = self._count_entries(opened_at)
        extra = stored - self.lines_taken
        cut = 0
        for _ in range(max(extra, 0)):
            nl = self.buf.find(b"\n", cut)
            if nl < 0:
                break
            cut = nl + 1
        if cut:
            self._release(cut)

    def _count_entries(self, since: float) -> int:
        import subprocess

        argv = [self.journalctl, f"_PID={os.getpid()}", f"SYSLOG_IDENTIFIER={self.identifier}",
                f"--since=@{since:.6f}", "--output=cat", "--output-fields=_PID", "--quiet",
                "--no-pager"]
        try:
            out = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, timeout=300, check=True).stdout
        except (OSError, subprocess.SubprocessError):
            return 0  # not knowing: send them again (twice in the journal beats missing)
        return out.count(b"\n")


def spool_paths_of(data_path: str) -> tuple[str, str]:
    return data_path, f"{data_path}.json"


class Stream:
    # A plain class: dataclasses (with inspect) and typing cost the shim ~12 ms of start-up,
    # which is on every task's launch path (bench/REPORT.md).
    __slots__ = ("base", "buf", "covered", "eof", "fd", "index", "journal", "nonce", "sent")

    def __init__(self, index: int, fd: int, journal: JournalStream) -> None:
        self.index = index
        self.fd = fd
        self.journal = journal
        self.base = 0  # absolute offset of buf[0]: everything below it is journaled
        self.buf = bytearray()
        self.covered = 0  # offset up to which the journal stream has lines queued for it
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
        """Queue what no WRITE covers as the job's own lines (no agent formats them)."""
        if self.end > self.covered:
            self.journal.add_raw(bytes(self.buf[self.covered - self.base:]), self.end)
            self.covered = self.sent = self.end


class Forwarder:
    def __init__(self, sock: socket.socket, streams: list[Stream], pid: int,
                 journal_grace: float = JOURNAL_GRACE) -> None:
        self.sock = sock
        self.journal_grace = journal_grace
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
        self.raw_finished = False
        self.ended_at: float | None = None  # monotonic: when the job was reaped
        self.report_fd = -1  # the hooks' supervisor's report of a failure (hooks.py)

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
            if not self._send(link.pack(link.RESUMED, s.index, s.covered,
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
                # At or below covered: queued already (never written twice).
                if offset > s.covered:
                    s.journal.add(payload, offset)
                    s.covered = offset
            elif kind == link.RESUME:
                s.sent = s.covered
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
            s.buf += data
            if self.link_gone:
                s.journal_raw()
        else:
            s.eof = True
            os.close(s.fd)

    def _journal(self) -> None:
        now = time.monotonic()
        for s in self.streams:
            s.journal.pump(now)
            s.free_below(s.journal.taken_raw)
            s.journal.spool(now)

    def _journal_pending(self) -> bool:
        return any(s.journal.pending or s.journal.unresolved for s in self.streams)

    def _hook_report(self) -> str:
        # The hooks' supervisor wrote it before it left, at most a few KiB: in the pipe.
        if self.report_fd < 0:
            return ""
        os.set_blocking(self.report_fd, False)
        try:
            return _read_all(self.report_fd).decode(errors="replace")
        except BlockingIOError:
            return ""
        finally:
            os.close(self.report_fd)
            self.report_fd = -1

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
        failure = self._hook_report()
        if failure:
            record["failure"] = failure
        if os.WIFSIGNALED(wstatus):
            record["signal"] = os.WTERMSIG(wstatus)
            record["core_dumped"] = os.WCOREDUMP(wstatus)
        else:
            record["exit_code"] = os.WEXITSTATUS(wstatus)
        record["accounting"] = read_accounting(own_cgroup_dir())
        record["ends"] = [s.end for s in self.streams]
        _write_status(status_path, record)
        self.exit_record = record
        self.ended_at = time.monotonic()

    def _done(self) -> bool:
        # The shim leaves only once journald has taken every byte: the agent reports the
        # task finished when the link closes.
        if self.link_gone and self.pidfd < 0 and not self.raw_finished:
            self.raw_finished = True
            for s in self.streams:
                s.journal.finish_raw()
            self._journal()
        if not (self.exit_acked or (self.link_gone and self.pidfd < 0)):
            return False
        if not self._journal_pending():
            return True
        return self._give_up_waiting()

    def _give_up_waiting(self) -> bool:
        """journald is still away well after the job ended: leave, with what it has not taken
        in the spool (the agent journals it once journald is back and says so in the task's
        outcome), rather than keep the task running for as long as journald is gone. Output
        that could not be spooled is kept in memory: the shim waits on."""
        if self.ended_at is None or time.monotonic() - self.ended_at < self.journal_grace:
            return False
        now = time.monotonic()
        held = [s.journal for s in self.streams if s.journal.pending or s.journal.unresolved]
        for j in held:
            j.spool(now, force=True)
        return all(j.spool_current for j in held)

    def run(self, status_path: str, exec_error: str) -> None:
        while not self._done():
            if not self.link_gone:
                self._pump_out()
            poller = select.poll()
            wanted: dict[int, Stream] = {}
            for s in self.streams:
                # The job's pipe is read only while what it holds is below the cap: beyond
                # it (journald or the agent away) the job blocks on its next write.
                if not s.eof and len(s.buf) < BUFFER_CAP:
                    poller.register(s.fd, select.POLLIN)
                    wanted[s.fd] = s
            if self.pidfd >= 0:
                poller.register(self.pidfd, select.POLLIN)
            if not self.link_gone and not self.exit_acked:
                link_events = select.POLLIN
                if self.resumed or any(s.sent < s.end for s in self.streams) or (
                    self.exit_record is not None and not self.exit_sent
                ):
                    link_events |= select.POLLOUT
                poller.register(self.sock.fileno(), link_events)
            elif self.exit_acked and not self.link_gone:
                poller.register(self.sock.fileno(), select.POLLIN)  # a new agent's RESUME
            now = time.monotonic()
            timeout: float | None = None
            journals: dict[int, JournalStream] = {}
            for s in self.streams:
                j = s.journal
                t = j.timeout(now)
                if t is not None:
                    timeout = t if timeout is None else min(timeout, t)
                if j.sock is not None and (j.wants_out() or j.written > j.base):
                    # POLLHUP comes unasked: a broken connection is seen at once.
                    poller.register(j.sock.fileno(), select.POLLOUT if j.wants_out() else 0)
                    journals[j.sock.fileno()] = j
            if self.ended_at is not None and self._journal_pending():
                left = max(0.0, self.ended_at + self.journal_grace - now)
                timeout = left if timeout is None else min(timeout, left)
            events = poller.poll(None if timeout is None else int(timeout * 1000) + 1)
            for fd, event in events:
                if fd == self.sock.fileno():
                    if event & (select.POLLIN | select.POLLHUP | select.POLLERR):
                        self._handle_link()
                elif fd == self.pidfd:
                    self._reap(status_path, exec_error)
                elif (st := wanted.get(fd)) is not None:
                    self._drain(st)
                elif (broken := journals.get(fd)) is not None and \
                        event & (select.POLLHUP | select.POLLERR):
                    broken.broken()
            self._journal()
            self._note_outages()

    def _note_outages(self) -> None:
        """Say in the task's journal that journald was away and the output held meanwhile
        (its lines carry the time journald took them): an entry of the scope with the task's
        fields, under its own identifier so that it is not taken for the job's output."""
        for s in self.streams:
            j = s.journal
            while j.outages:
                start, end = j.outages.pop(0)
                msg = (f"<4>journald was unreachable for {end - start:.1f} s "
                       f"({time.strftime('%H:%M:%S', time.localtime(start))} to "
                       f"{time.strftime('%H:%M:%S', time.localtime(end))}): the job's "
                       f"{j.identifier.rpartition('-')[2]} was held meanwhile and is "
                       f"journaled in full, with the time journald took each line\n")
                note = JournalStream(j.path, "farmnode-shim", 4)
                try:
                    note.connect()
                    assert note.sock is not None
                    note.sock.setblocking(True)
                    note.sock.sendall(msg.encode())
                except OSError:
                    pass  # a note only: the output itself is what must not be lost
                finally:
                    if note.sock is not None:
                        note.sock.close()


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
    _set_name(SHIM_NAME)
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
    for j in journals:
        j.spool_path = spool_paths(status_path, j.identifier)[0]
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
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        for fd in (out_r, err_r, exec_r, report_r, sock.fileno()):
            os.close(fd)
        _exec_job(spec, out_w, err_w, exec_w, report_w)
    for fd in (out_w, err_w, exec_w, report_w):
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
                           Stream(link.STDERR, err_r, journals[1])], pid,
                    float(spec.get("journal_grace", JOURNAL_GRACE)))
    fwd.report_fd = report_r
    fwd.run(status_path, exec_error)
    record = fwd.exit_record or {}
    if "signal" in record:
        return 128 + int(record["signal"])
    return int(record.get("exit_code", 0))


if __name__ == "__main__":
    sys.exit(main())
