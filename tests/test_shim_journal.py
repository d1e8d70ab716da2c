"""The shim's journald stream on its own: bytes kept until journald has read them, a broken
stream reopened with the same header, and of the lines in flight when it broke only those
journald did not take sent again (counted in the journal, here a stand-in journalctl)."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

import pytest

from farmnode.systemd import spool
from farmnode.systemd.journal import TaskLogFields
from farmnode.systemd.shim import JournalStream, spool_paths

HEADER = b"farmnode-stdout\n\n6\n1\n0\n0\n0\n"

FAKE_JOURNALCTL = """\
import json, os, sys
if "--sync" in sys.argv:
    sys.exit(1 if os.path.exists(sys.argv[0] + ".down") else 0)
args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
open(sys.argv[0] + ".calls", "a").write(" ".join(sys.argv[1:]) + "\\n")
since = float(args["--since"].lstrip("@"))
for line in open(sys.argv[0] + ".entries"):
    e = json.loads(line)
    if (str(e["pid"]) == args["_PID"] and e["ident"] == args["SYSLOG_IDENTIFIER"]
            and e["ts"] >= since):
        print(e["pid"])
"""


class Journald:
    """A stand-in for journald's stream socket that reads exactly as much as a test says,
    stores the whole lines it read as entries, and can be stopped with bytes unread."""

    def __init__(self, tmp: Path) -> None:
        self.path = tmp / "stdout"
        self.journalctl = tmp / "journalctl"
        self.journalctl.write_text(f"#!{sys.executable}\n{FAKE_JOURNALCTL}")
        self.journalctl.chmod(0o755)
        self.entries = Path(f"{self.journalctl}.entries")
        self.entries.touch()
        self.calls = Path(f"{self.journalctl}.calls")
        self.server: socket.socket | None = None
        self.conn: socket.socket | None = None
        self.partial = b""  # read, not a whole line yet: lost if it stops
        self.start()

    def start(self) -> None:
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(self.path))
        self.server.listen(4)

    def accept(self) -> None:
        assert self.server is not None
        self.server.settimeout(10)
        self.conn, _ = self.server.accept()
        assert self.read(len(HEADER)) == HEADER

    def read(self, n: int) -> bytes:
        assert self.conn is not None
        out = b""
        while len(out) < n:
            chunk = self.conn.recv(n - len(out))
            assert chunk
            out += chunk
        return out

    def take(self, n: int) -> None:
        """Read n bytes and make an entry of each line in them, as journald does."""
        self.partial += self.read(n)
        *lines, self.partial = self.partial.split(b"\n")
        with self.entries.open("a") as f:
            for line in lines:
                f.write(json.dumps({"pid": os.getpid(), "ident": "farmnode-stdout",
                                    "ts": time.time(), "msg": line.decode()}) + "\n")

    def messages(self) -> list[str]:
        return [json.loads(line)["msg"] for line in self.entries.read_text().splitlines()]

    def stop(self) -> None:
        """Gone, with whatever it had not read yet."""
        assert self.server is not None and self.conn is not None
        self.conn.close()
        self.server.close()
        self.partial = b""
        self.path.unlink()


@pytest.fixture
def journald(tmp_path: Path) -> Journald:
    return Journald(tmp_path)


def stream(j: Journald) -> JournalStream:
    s = JournalStream(str(j.path), "farmnode-stdout", 6, journalctl=str(j.journalctl))
    s.connect()
    j.accept()
    return s


def pump_until(s: JournalStream, done: object, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not done():  # type: ignore[operator]
        assert time.monotonic() < deadline
        s.pump(time.monotonic())
        time.sleep(0.01)


LINES = [b"<6>one\n", b"<6>two\n", b"<6>three\n"]


def test_lines_in_flight_when_journald_stops_are_sent_again_once(journald: Journald) -> None:
    s = stream(journald)
    s.add(b"".join(LINES), 30)
    s.pump(time.monotonic())
    assert s.written == len(b"".join(LINES)) and s.pending  # written, not known read
    journald.take(len(LINES[0] + LINES[1]))  # took two lines, then stopped
    journald.stop()
    s.pump(time.monotonic())
    assert s.sock is None and s.unresolved and s.down_since is not None
    s.pump(time.monotonic() + 5)  # journald still away: nothing freed, nothing dropped
    assert s.pending and s.taken_raw == 0
    journald.start()
    s.pump(time.monotonic() + 10)
    journald.accept()
    journald.take(len(LINES[2]))
    pump_until(s, lambda: not s.pending)
    assert journald.messages() == ["<6>one", "<6>two", "<6>three"]
    assert s.taken_raw == 30
    assert len(s.outages) == 1 and s.outages[0][0] <= s.outages[0][1]


def test_nothing_unread_at_the_stop_needs_no_count(journald: Journald) -> None:
    s = stream(journald)
    s.add(b"".join(LINES), 30)
    s.pump(time.monotonic())
    journald.take(len(b"".join(LINES)))
    journald.stop()
    pump_until(s, lambda: not s.pending)
    assert s.sock is None and not s.unresolved and s.taken_raw == 30
    s.add(b"<6>four\n", 40)  # written on a new stream once journald is back
    s.pump(time.monotonic())
    assert s.pending
    journald.start()
    s.pump(time.monotonic() + 10)
    journald.accept()
    journald.take(len(b"<6>four\n"))
    pump_until(s, lambda: not s.pending)
    assert journald.messages() == ["<6>one", "<6>two", "<6>three", "<6>four"]
    assert not journald.calls.exists()  # the kernel said journald had read everything


def test_a_line_journald_read_only_half_of_is_sent_again_whole(journald: Journald) -> None:
    s = stream(journald)
    s.add(b"".join(LINES), 30)
    s.pump(time.monotonic())
    journald.take(len(LINES[0]) + 3)  # "<6>one\n<6>" read: the second line is not whole
    journald.stop()
    s.pump(time.monotonic())
    journald.start()
    s.pump(time.monotonic() + 10)
    journald.accept()
    journald.take(len(LINES[1] + LINES[2]))
    pump_until(s, lambda: not s.pending)
    assert journald.messages() == ["<6>one", "<6>two", "<6>three"]


FIELDS = TaskLogFields("farmnode-task-7.scope", 3, "a1", (7, 8), "command")


def spooled_stream(j: Journald, tmp: Path) -> tuple[JournalStream, str]:
    """A stream that had two of three lines taken when journald stopped, then held two more
    lines in its spool while journald was away: and then the shim was killed."""
    status = str(tmp / "a1.json")
    s = stream(j)
    s.spool_path = spool_paths(status, s.identifier)[0]
    s.add(b"".join(LINES), 30)
    s.pump(time.monotonic())
    j.take(len(LINES[0] + LINES[1]))
    j.stop()
    s.pump(time.monotonic())
    s.spool(time.monotonic())
    s.add(b"<3>four\n<6>f\xc3\xbcnf\n", 50)
    s.pump(time.monotonic())
    s.spool(time.monotonic(), force=True)
    assert s.pending and s.spool_current
    os.close(s.spool_fd)  # SIGKILL: what is on disk is all there is
    return s, status


def test_spool_holds_what_journald_did_not_take_and_is_replayed_once(
        journald: Journald, tmp_path: Path) -> None:
    _, status = spooled_stream(journald, tmp_path)
    sent: list[tuple[str, ...]] = []
    done = spool.replay(status, FIELDS, journalctl=str(journald.journalctl),
                        send=lambda *f: sent.append(f))
    messages = [f[0] for f in sent if "SYSLOG_IDENTIFIER=farmnode-stdout" in f]
    # "one" and "two" are in the journal already (counted there), the rest comes once.
    assert messages == ["MESSAGE=three", "MESSAGE=four", "MESSAGE=fünf"]
    assert [f[1] for f in sent[:3]] == ["PRIORITY=6", "PRIORITY=3", "PRIORITY=6"]
    for f in sent:
        assert "OBJECT_SYSTEMD_UNIT=farmnode-task-7.scope" in f
        assert {"FARMNODE_TASK=7", "FARMNODE_TASK=8", "FARMNODE_JOB=3"} <= set(f)
    assert done.lines == 3 and done.bytes == len("three\nfour\nfünf\n".encode())
    note = done.describe()
    assert note is not None and "3 output lines" in note
    assert sent[-1][0] == f"MESSAGE={note}" and "SYSLOG_IDENTIFIER=farmnode-shim" in sent[-1]
    assert spool.spools(status) == [] and not list(tmp_path.glob("a1.json.*"))


def test_spool_stays_while_journald_is_away(journald: Journald, tmp_path: Path) -> None:
    _, status = spooled_stream(journald, tmp_path)
    Path(f"{journald.journalctl}.down").touch()
    sent: list[tuple[str, ...]] = []
    with pytest.raises(OSError):
        spool.replay(status, FIELDS, journalctl=str(journald.journalctl),
                     send=lambda *f: sent.append(f))
    assert sent == [] and len(spool.spools(status)) == 1


def test_spool_is_removed_once_journald_has_taken_all(journald: Journald, tmp_path: Path) -> None:
    s, status = spooled_stream(journald, tmp_path)
    s.spool_fd = os.open(s.spool_path, os.O_WRONLY)  # the shim lives on after all
    journald.start()
    s.pump(time.monotonic() + 10)
    journald.accept()
    journald.take(len(b"<6>three\n<3>four\n<6>f\xc3\xbcnf\n"))
    pump_until(s, lambda: not s.pending)
    s.spool(time.monotonic())
    assert s.spool_fd < 0 and spool.spools(status) == []
    assert not Path(s.spool_path).exists()
