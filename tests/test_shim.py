"""The task shim's link protocol, driven from the agent's side by hand (no systemd needed).

The system tier shows it surviving real restarts; here each rule is pinned down alone:
output forwarded with offsets, kept until acknowledged, resent from RESUME after RESUMED,
EXIT with the status after all data, and the shim waiting for EXIT_ACK."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from farmnode.systemd import link


class Shim:
    def __init__(self, tmp: Path, argv: list[str]) -> None:
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
                "status_path": str(self.status)}
        with os.fdopen(gate_w, "wb") as gate:
            gate.write(json.dumps(spec).encode())
        self.sock.settimeout(30)

    def packets(self) -> Iterator[tuple[bytes, int, int, bytes]]:
        while True:
            packet = self.sock.recv(65536 + 64)
            if not packet:
                return
            yield link.unpack(packet)

    def send(self, kind: bytes, stream: int = 0, offset: int = 0) -> None:
        self.sock.send(link.pack(kind, stream, offset))


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
    shim.send(link.EXIT_ACK)
    assert shim.proc.wait(timeout=10) == 3


def test_resume_resends_from_the_offset_after_resumed(tmp: Path) -> None:
    # The job prints, then waits for the agent to say go (a file), so the RESUME happens
    # while the shim still holds the unacknowledged output.
    go = tmp / "go"
    script = f"echo one; echo two; while [ ! -e {go} ]; do sleep 0.01; done; echo three"
    shim = Shim(tmp, ["/bin/sh", "-c", script])
    got = bytearray()
    for kind, _stream, _offset, payload in shim.packets():
        if kind == link.DATA:
            got += payload
        if got == b"one\ntwo\n":
            break
    # As a new agent whose journal ends after "one\n": everything after it comes again.
    shim.send(link.RESUME, 0, 4)
    kind, stream, offset, _ = next(p for p in shim.packets() if p[0] != link.DATA)
    assert (kind, stream, offset) == (link.RESUMED, 0, 4)
    kind, stream, offset, payload = next(shim.packets())
    assert (kind, stream, offset, payload) == (link.DATA, 0, 4, b"two\n")
    shim.send(link.ACK, 0, 8)  # journaled up to "two\n": the shim may free it
    shim.send(link.RESUME, 0, 0)  # below what it still has: it can only resend from 8
    kind, stream, offset, _ = next(p for p in shim.packets() if p[0] != link.DATA)
    assert (kind, stream, offset) == (link.RESUMED, 0, 8)  # the agent learns of the gap
    go.touch()
    kind, _, offset, payload = next(shim.packets())
    assert (kind, offset, payload) == (link.DATA, 8, b"three\n")
    assert next(p for p in shim.packets() if p[0] != link.DATA)[0] == link.EXIT
    shim.send(link.EXIT_ACK)
    assert shim.proc.wait(timeout=10) == 0


def test_exec_failure_is_reported(tmp: Path) -> None:
    shim = Shim(tmp, ["/no/such/renderer", "-f", "1"])
    _data, record, _ = collect_until_exit(shim)
    assert "/no/such/renderer" in str(record["error"])
    shim.send(link.EXIT_ACK)
    assert shim.proc.wait(timeout=10) == 127


def test_gone_agent_leaves_the_status_file(tmp: Path) -> None:
    shim = Shim(tmp, ["/bin/sh", "-c", "echo bye; exit 5"])
    shim.sock.close()  # the service was stopped: its end of the link is gone for good
    assert shim.proc.wait(timeout=10) == 5
    assert json.loads(shim.status.read_text())["exit_code"] == 5
