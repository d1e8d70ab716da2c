"""The task shim's link protocol, driven from the agent's side by hand (no systemd needed).

The system tier shows it surviving real restarts against the real journald; here each rule
is pinned down alone, with a stand-in for journald's stream socket that records what the shim
writes: output forwarded with offsets, kept until a WRITE covers it, WRITE payloads handed to
journald exactly once, resent from RESUMED after RESUME, EXIT with the status after all data,
the shim waiting for EXIT_ACK, raw output journaled by the shim once the agent is gone."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from farmnode.systemd import framing, link
from farmnode.systemd.journal import format_line
from farmnode.systemd.shim import spool_paths


class FakeJournal:
    """Accepts stream connections like /run/systemd/journal/stdout; keeps each one's bytes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.streams: list[bytearray] = []
        self.conns: list[socket.socket] = []
        self.open = 0
        self.lock = threading.Condition()
        self.start()

    def start(self) -> None:
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(self.path))
        self.server.listen(8)
        threading.Thread(target=self._accept, args=(self.server,), daemon=True).start()

    def stop(self) -> None:
        """As `systemctl stop systemd-journald*`: every stream closed, nobody listening."""
        self.server.close()
        self.path.unlink()
        with self.lock:
            for conn in self.conns:
                conn.shutdown(socket.SHUT_RDWR)
            assert self.lock.wait_for(lambda: self.open == 0, timeout=10)

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            buf = bytearray()
            with self.lock:
                self.streams.append(buf)
                self.conns.append(conn)
                self.open += 1
                self.lock.notify_all()
            threading.Thread(target=self._read, args=(conn, buf), daemon=True).start()

    def _read(self, conn: socket.socket, buf: bytearray) -> None:
        while data := conn.recv(65536):
            with self.lock:
                buf += data
        conn.close()
        with self.lock:
            self.open -= 1
            self.lock.notify_all()

    def lines_of(self, identifier: str) -> list[bytes]:
        """What one stream carried after its header (7 lines: identifier first), once every
        connection is closed (the shim has exited)."""
        with self.lock:
            assert self.lock.wait_for(lambda: self.open == 0, timeout=10)
            lines: list[bytes] = []
            for buf in self.streams:  # a stream reopened after journald was away goes on
                parts = bytes(buf).split(b"\n", 7)
                if parts[0] == identifier.encode():
                    assert parts[1:7] == [b"", b"6" if "out" in identifier else b"4",
                                          b"1", b"0", b"0", b"0"]
                    lines += parts[7].splitlines(keepends=True) if len(parts) > 7 else []
        return lines


class Shim:
    def __init__(self, tmp: Path, argv: list[str], journal_socket: Path | None = None,
                 journal_grace: float | None = None, **extra: object) -> None:
        self.journal = FakeJournal(tmp / "journal.sock") if journal_socket is None else None
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        gate_r, gate_w = os.pipe()
        self.status = tmp / "status.json"
        self.proc = subprocess.Popen([sys.executable, "-I", "-m", "farmnode.systemd.shim"],
                                     stdin=gate_r, stdout=theirs.fileno(),
                                     stderr=subprocess.DEVNULL)
        os.close(gate_r)
        theirs.close()
        spec = {"argv": argv, "env": {"PATH": "/usr/bin:/bin"}, "cwd": str(tmp),
                "uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(),
                "status_path": str(self.status),
                "journal": [["farmnode-stdout", 6], ["farmnode-stderr", 4]],
                "journal_socket": str(journal_socket or tmp / "journal.sock")}
        if journal_grace is not None:
            spec["journal_grace"] = journal_grace
        spec.update(extra)
        with os.fdopen(gate_w, "wb") as gate:
            gate.write(json.dumps(spec).encode())
        self.sock.settimeout(30)

    def packets(self) -> Iterator[tuple[bytes, int, int, bytes]]:
        while True:
            packet = self.sock.recv(65536 + 64)
            if not packet:
                return
            yield link.unpack(packet)

    def send(self, kind: bytes, stream: int = 0, offset: int = 0, payload: bytes = b"") -> None:
        self.sock.send(link.pack(kind, stream, offset, payload))

    def journaled(self, identifier: str = "farmnode-stdout") -> list[bytes]:
        assert self.proc.poll() is not None and self.journal is not None
        return self.journal.lines_of(identifier)


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path


def collect_until_exit(shim: Shim) -> tuple[dict[int, bytearray], dict[str, object], list[bytes]]:
    data: dict[int, bytearray] = {0: bytearray(), 1: bytearray()}
    kinds = []
    for kind, stream, offset, payload in shim.packets():
        kinds.append(kind)
        if kind == link.DATA:
            assert offset == len(data[stream])  # contiguous, in order
            data[stream] += payload
        elif kind == link.EXIT:
            return data, json.loads(payload), kinds
    raise AssertionError("link closed without EXIT")


def test_forwards_output_and_exit_status_then_waits_for_ack(tmp: Path) -> None:
    shim = Shim(tmp, ["/bin/sh", "-c", "echo out; echo err >&2; printf tail; exit 3"])
    data, record, kinds = collect_until_exit(shim)
    assert kinds[0] == link.STARTED
    assert bytes(data[0]) == b"out\ntail" and bytes(data[1]) == b"err\n"
    assert record["exit_code"] == 3 and record["ends"] == [8, 4]
    assert json.loads(shim.status.read_text())["exit_code"] == 3
    assert shim.proc.poll() is None  # it waits until the agent has recorded the exit
    shim.send(link.WRITE, 0, 8, b"<6>out\n<5>tail\n")
    shim.send(link.WRITE, 1, 4, b"<3>err\n")
    shim.send(link.EXIT_ACK)
    assert shim.proc.wait(timeout=10) == 3
    assert shim.journaled("farmnode-stdout") == [b"<6>out\n", b"<5>tail\n"]
    assert shim.journaled("farmnode-stderr") == [b"<3>err\n"]


def test_resume_resends_what_is_not_journaled_after_resumed(tmp: Path) -> None:
    # The job prints, then waits for the agent to say go (a file), so the RESUME happens
    # while the shim still holds output nobody has written to journald.
    go = tmp / "go"
    script = f"echo one; echo two; while [ ! -e {go} ]; do sleep 0.01; done; echo three"
    shim = Shim(tmp, ["/bin/sh", "-c", script])
    got = bytearray()
    for kind, _stream, _offset, payload in shim.packets():
        if kind == link.DATA:
            got += payload
        if got == b"one\ntwo\n":
            break
    # The old agent wrote "one" and died; its WRITE is still carried out.
    shim.send(link.WRITE, 0, 4, b"<6>one\n")
    shim.send(link.RESUME, 0, 77)  # the nonce comes back with the answer
    kind, stream, offset, nonce = next(p for p in shim.packets() if p[0] != link.DATA)
    assert (kind, stream, offset, nonce) == (link.RESUMED, 0, 4, (77).to_bytes(8, "big"))
    kind, stream, offset, payload = next(shim.packets())
    assert (kind, stream, offset, payload) == (link.DATA, 0, 4, b"two\n")
    shim.send(link.WRITE, 0, 8, b"<6>two\n")
    shim.send(link.WRITE, 0, 4, b"<6>stale\n")  # below what is journaled: never written
    shim.send(link.RESUME, 0)
    kind, stream, offset, _ = next(p for p in shim.packets() if p[0] != link.DATA)
    assert (kind, stream, offset) == (link.RESUMED, 0, 8)
    go.touch()
    kind, _, offset, payload = next(shim.packets())
    assert (kind, offset, payload) == (link.DATA, 8, b"three\n")
    assert next(p for p in shim.packets() if p[0] != link.DATA)[0] == link.EXIT
    shim.send(link.WRITE, 0, 14, b"<6>three\n")
    shim.send(link.EXIT_ACK)
    assert shim.proc.wait(timeout=10) == 0
    assert shim.journaled() == [b"<6>one\n", b"<6>two\n", b"<6>three\n"]


def test_exec_failure_is_reported(tmp: Path) -> None:
    shim = Shim(tmp, ["/no/such/renderer", "-f", "1"])
    _data, record, _ = collect_until_exit(shim)
    assert "/no/such/renderer" in str(record["error"])
    shim.send(link.EXIT_ACK)
    assert shim.proc.wait(timeout=10) == 127


def test_unreachable_journald_refuses_to_run_the_job(tmp: Path) -> None:
    marker = tmp / "ran"
    shim = Shim(tmp, ["/bin/sh", "-c", f"touch {marker}"], journal_socket=tmp / "nothing")
    assert next(p for p in shim.packets() if p[0] != link.DATA)[0] == link.EXIT
    assert "cannot connect to journald" in json.loads(shim.status.read_text())["error"]
    shim.send(link.EXIT_ACK)
    assert shim.proc.wait(timeout=10) == 125
    assert not marker.exists()


def test_gone_agent_leaves_the_status_file_and_journals_raw_output(tmp: Path) -> None:
    shim = Shim(tmp, ["/bin/sh", "-c", "echo bye; printf 'no newline'; echo oops >&2; exit 5"])
    shim.sock.close()  # the service was stopped: its end of the link is gone for good
    assert shim.proc.wait(timeout=10) == 5
    assert json.loads(shim.status.read_text())["exit_code"] == 5
    assert shim.journaled() == [b"<6>bye\n", b"<6>no newline\n"]
    assert shim.journaled("farmnode-stderr") == [b"<4>oops\n"]


def test_journald_away_holds_the_output_and_the_exit_until_it_is_back(tmp: Path) -> None:
    shim = Shim(tmp, ["/bin/sh", "-c", "echo one; echo two"])
    _data, _record, _ = collect_until_exit(shim)
    assert shim.journal is not None
    shim.journal.stop()
    shim.send(link.WRITE, 0, 4, b"<6>one\n")
    shim.send(link.WRITE, 0, 8, b"<6>two\n")
    shim.send(link.EXIT_ACK)
    # It used to give up after 5 s and leave as if the lines were journaled.
    with pytest.raises(subprocess.TimeoutExpired):
        shim.proc.wait(timeout=6)
    shim.journal.start()
    assert shim.proc.wait(timeout=10) == 0
    assert shim.journaled() == [b"<6>one\n", b"<6>two\n"]
    notes = shim.journal.lines_of("farmnode-shim")
    assert len(notes) == 1 and b"journald was unreachable" in notes[0]


def test_journald_away_past_the_grace_leaves_the_output_in_the_spool(tmp: Path) -> None:
    # task_journal_grace reaches the shim in its spec: after it, the shim leaves, and what
    # journald never took is in the spool for the agent to journal.
    shim = Shim(tmp, ["/bin/sh", "-c", "echo one; echo two"], journal_grace=0.5)
    _data, _record, _ = collect_until_exit(shim)
    assert shim.journal is not None
    shim.journal.stop()
    shim.send(link.WRITE, 0, 4, b"<6>one\n")
    shim.send(link.WRITE, 0, 8, b"<6>two\n")
    shim.send(link.EXIT_ACK)
    assert shim.proc.wait(timeout=30) == 0
    data, _meta = spool_paths(str(shim.status), "farmnode-stdout")
    assert Path(data).read_bytes() == b"<6>one\n<6>two\n"


def test_journald_away_blocks_the_job_on_its_pipe_once_the_cap_is_held(tmp: Path) -> None:
    from farmnode.systemd.shim import BUFFER_CAP

    marker = tmp / "all-written"
    lines = 2 * BUFFER_CAP // 100  # twice what the shim holds per stream
    job = (f"import sys\nfor i in range({lines}):\n    sys.stdout.write('%099d\\n' % i)\n"
           f"sys.stdout.flush()\nopen({str(marker)!r}, 'w').close()\n")
    shim = Shim(tmp, [sys.executable, "-c", job])
    assert shim.journal is not None
    with shim.journal.lock:  # the shim has its streams (else it would refuse to start)
        assert shim.journal.lock.wait_for(lambda: len(shim.journal.streams) == 2, timeout=10)
    shim.journal.stop()
    state = {"pid": 0, "forwarded": 0, "exit": False}

    def agent(timeout: float) -> bool:
        """One packet answered as the agent does: every byte forwarded gets its lines."""
        shim.sock.settimeout(timeout)
        try:
            packet = shim.sock.recv(65536 + 64)
        except TimeoutError:
            return False
        kind, stream, offset, payload = link.unpack(packet)
        if kind == link.STARTED:
            state["pid"] = json.loads(payload)["pid"]
        elif kind == link.DATA:
            state["forwarded"] = offset + len(payload)
            shim.send(link.WRITE, stream, offset + len(payload), payload)
        elif kind == link.EXIT:
            state["exit"] = True
        return True

    while int(state["forwarded"]) < BUFFER_CAP:
        assert agent(30)
    # The job blocks writing to its pipe: nothing dropped, nothing more read.
    wchan = Path(f"/proc/{state['pid']}/wchan")
    for _ in range(600):
        if wchan.read_text().endswith("pipe_write"):  # anon_pipe_write on newer kernels
            break
        agent(0.05)
    assert wchan.read_text().endswith("pipe_write")
    while agent(0.2):
        pass
    assert not marker.exists()
    assert int(state["forwarded"]) < BUFFER_CAP + 2 * link.MAX_PAYLOAD
    shim.journal.start()
    while not state["exit"]:
        assert agent(30)
    shim.send(link.EXIT_ACK)
    assert shim.proc.wait(timeout=30) == 0
    assert marker.exists()
    out = b"".join(shim.journaled())
    assert out == b"".join(b"%099d\n" % i for i in range(lines))


LINE_MAX = 48 * 1024  # journald's default LineMax


def journald_lines(stream: bytes) -> list[bytes]:
    """Where journald's stdout-stream reader ends lines (systemd 252, journald-stream.c):
    at a newline, at a NUL, and at LineMax; each such line is one entry whose "<N>" at the
    start, if any, is its priority."""
    lines, line = [], bytearray()
    for byte in stream:
        if byte in (0, 10):
            lines.append(bytes(line))
            line.clear()
            continue
        line.append(byte)
        if len(line) >= LINE_MAX:
            lines.append(bytes(line))
            line.clear()
    if line:
        lines.append(bytes(line))
    return lines


HOSTILE = [b"ok\n", b"a\0<0>nul ends the line\n", b"<0>own prefix\n", b"\0\0\n",
           b"x" * (LINE_MAX - 3) + b"<0>after LineMax\n", b"y" * 70000 + b"\n",
           "\u00e9".encode() * 20000 + b"<1>\n", b"\n", b"<0>", b"no newline<0>"]


def test_framing_gives_every_journald_line_our_priority() -> None:
    whole = b"".join(HOSTILE)
    expected = whole.replace(b"\0", "\ufffd".encode()).replace(b"\n", b"")
    for chunk in (1, 7, 4096, len(whole)):  # the job's writes may cut anywhere
        framer = framing.Framer(6)
        out = b"".join(framer.feed(whole[i:i + chunk]) for i in range(0, len(whole), chunk))
        out += framer.finish()
        assert b"\0" not in out and out.endswith(b"\n")
        lines = journald_lines(out)
        assert all(line.startswith(b"<6>") for line in lines), [
            line[:20] for line in lines if not line.startswith(b"<6>")]
        assert max(map(len, lines)) <= framing.LINE_BYTES + 3
        assert b"".join(line[3:] for line in lines) == expected  # nothing lost or added
        assert lines[:4] == [b"<6>ok", "<6>a\ufffd<0>nul ends the line".encode(),
                             b"<6><0>own prefix", "<6>\ufffd\ufffd".encode()]


def test_formatted_lines_are_framed_too() -> None:
    text = "\0" * 16000 + "<0>tripled by U+FFFD"
    lines = journald_lines(format_line(4, text))
    assert all(line.startswith(b"<4>") for line in lines) and len(lines) == 3
    assert journald_lines(format_line(3, "x" * 20000 + "\n<0>y")) == [
        b"<3>" + b"x" * framing.LINE_BYTES, b"<3>" + b"x" * (20000 - framing.LINE_BYTES),
        b"<3><0>y"]


def test_gone_agent_raw_output_cannot_choose_its_priority(tmp: Path) -> None:
    script = tmp / "hostile"
    script.write_bytes(b"".join(HOSTILE))
    shim = Shim(tmp, ["/bin/cat", str(script)])
    shim.sock.close()
    assert shim.proc.wait(timeout=30) == 0
    lines = journald_lines(b"".join(shim.journaled()))
    assert lines and all(line.startswith(b"<6>") for line in lines)
    assert b"".join(line[3:] for line in lines) == b"".join(HOSTILE).replace(
        b"\0", "\ufffd".encode()).replace(b"\n", b"")


# --- pre and post hooks (farmnode.systemd.hooks) ------------------------------------------


def run_with_hooks(tmp: Path, argv: list[str], **hooks: object) -> tuple[bytes, bytes,
                                                                             dict[str, object]]:
    shim = Shim(tmp, argv, **hooks)
    data, record, _ = collect_until_exit(shim)
    shim.send(link.EXIT_ACK)
    shim.proc.wait(timeout=10)
    return bytes(data[0]), bytes(data[1]), record


def test_a_failing_pre_hook_stops_the_job_and_its_output_is_the_reason(tmp: Path) -> None:
    marker = tmp / "ran"
    pre = ["/bin/sh", "-c", "echo checking mounts; echo '/mnt/projects is missing' >&2; exit 3"]
    out, err, record = run_with_hooks(tmp, ["/bin/sh", "-c", f"touch {marker}"], pre=pre)
    assert not marker.exists()
    assert record["exit_code"] == 3
    assert str(record["failure"]).startswith("pre-hook /bin/sh failed (exit 3): "), record
    assert "checking mounts" in str(record["failure"])
    assert "/mnt/projects is missing" in str(record["failure"])
    # Its lines are the task's output, on their own streams, like the job's.
    assert out == b"checking mounts\n" and err == b"/mnt/projects is missing\n"


def test_hooks_run_around_the_job_and_the_post_hook_learns_how_it_ended(tmp: Path) -> None:
    pre = ["/bin/sh", "-c", "echo pre $FARMNODE_HOOK"]
    post = ["/bin/sh", "-c", "echo post $FARMNODE_HOOK ${FARMNODE_EXIT_CODE-none}"]
    out, _, record = run_with_hooks(tmp, ["/bin/sh", "-c", "echo job; exit 4"], pre=pre,
                                    post=post)
    assert out == b"pre pre\njob\npost post 4\n"
    assert record["exit_code"] == 4 and "failure" not in record, record


def test_a_failing_post_hook_fails_a_job_that_succeeded_only(tmp: Path) -> None:
    post = ["/bin/sh", "-c", "echo copy failed >&2; exit 2"]
    _, _, record = run_with_hooks(tmp, ["true"], post=post)
    assert record["exit_code"] == 2
    assert record["failure"] == "post-hook /bin/sh failed (exit 2): copy failed", record
    # After a job that failed, its own failure stays the reason.
    (tmp / "again").mkdir()
    _, _, record = run_with_hooks(tmp / "again", ["/bin/sh", "-c", "exit 5"], post=post)
    assert record["exit_code"] == 5 and "failure" not in record, record


def test_under_hooks_a_job_killed_by_a_signal_is_recorded_as_such(tmp: Path) -> None:
    post = ["/bin/sh", "-c", "echo after signal $FARMNODE_EXIT_SIGNAL"]
    out, _, record = run_with_hooks(tmp, ["/bin/sh", "-c", "kill -9 $$"], post=post)
    assert record["signal"] == 9 and "exit_code" not in record, record
    assert out == b"after signal 9\n"


def test_under_hooks_a_job_that_cannot_start_fails_with_the_reason(tmp: Path) -> None:
    _, _, record = run_with_hooks(tmp, ["/no/such/renderer"], pre=["true"])
    assert record["exit_code"] == 127
    assert record["failure"] == "exec /no/such/renderer: No such file or directory", record


def test_the_hooks_supervisor_leaves_the_stop_signal_to_the_job(tmp: Path) -> None:
    # systemd signals every process of the scope: the job handles it, the supervisor stays
    # and runs the post-hook with the job's outcome.
    script = "trap 'echo stopping; exit 0' TERM; echo ready; while :; do sleep 0.05; done"
    shim = Shim(tmp, ["/bin/sh", "-c", script], pre=["true"],
                post=["/bin/sh", "-c", "echo post $FARMNODE_EXIT_CODE"])
    out = bytearray()
    supervisor = 0
    for kind, _stream, _offset, payload in shim.packets():
        if kind == link.STARTED:
            supervisor = json.loads(payload)["pid"]
        if kind == link.DATA:
            out += payload
        if b"ready\n" in out:
            break
    job = int(Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()[0])
    for pid in (supervisor, job):
        os.kill(pid, signal.SIGTERM)
    record: dict[str, object] = {}
    for kind, _stream, _offset, payload in shim.packets():
        if kind == link.DATA:
            out += payload
        if kind == link.EXIT:
            record = json.loads(payload)
            break
    shim.send(link.EXIT_ACK)
    assert shim.proc.wait(timeout=10) == 0
    assert record["exit_code"] == 0 and "failure" not in record, record
    assert bytes(out).endswith(b"stopping\npost 0\n"), bytes(out)

