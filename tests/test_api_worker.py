"""The API's gunicorn worker (farmnode.api.worker) in a real gunicorn on the host, with a
probe app: half-sent heads hold no thread, a peer's connections are capped, slow heads time
out, chunked bodies arrive, and the app's `Connection: close` closes."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from farmnode.api.worker import PeerCount, head_complete, peer_of, refusal

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    port: int

    def connect(self, source: str = "127.0.0.1") -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=30,
                                     source_address=(source, 0))
        return s

    def request(self, raw: bytes, source: str = "127.0.0.1") -> bytes:
        """Send a whole request and read the answer until the server closes."""
        with self.connect(source) as s:
            s.sendall(raw)
            chunks = []
            while data := s.recv(65536):
                chunks.append(data)
            return b"".join(chunks)


def read_response(s: socket.socket) -> bytes:
    """One response, its body sized by Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    while len(body) < length:
        chunk = s.recv(65536)
        assert chunk, data
        body += chunk
    return head + b"\r\n\r\n" + body


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    port = free_port()
    conf = tmp_path / "conf.py"
    # Read by gunicorn's master before it forks the worker: the patched limits hold there.
    conf.write_text(f"""
import farmnode.api.worker as w
w.HEAD_TIMEOUT = 1.5
w.MAX_PER_PEER = 30
worker_class = "farmnode.api.worker.Worker"
threads = 2
workers = 1
bind = ["127.0.0.1:{port}"]
keepalive = 5
control_socket_disable = True
""")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", str(conf), "tests.wsgi_probe:app"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        # Ready once it answers (connection refused until it listens).
        for _ in range(300):
            with contextlib.suppress(OSError):
                if Server(port).request(get("/")).startswith(b"HTTP/1.1 200"):
                    break
            if proc.poll() is not None:
                raise AssertionError(proc.stderr.read().decode() if proc.stderr else "")
            import time

            time.sleep(0.05)
        yield Server(port)
    finally:
        proc.terminate()
        proc.wait(10)


def test_half_sent_heads_hold_no_thread(server: Server) -> None:
    # ten times the two threads, from two addresses, each stopping mid-header
    held = [server.connect(source) for source in ("127.0.0.2", "127.0.0.3") for _ in range(10)]
    for s in held:
        s.sendall(b"GET /a HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    answer = server.request(get("/now"))
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"/now 0")
    # kept-alive connections that send half of their next head hold none either
    kept = []
    for _ in range(6):
        s = server.connect("127.0.0.4")
        s.sendall(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(s).endswith(b"/first 0")
        s.sendall(b"GET /second HTTP/1.1\r\nHo")
        kept.append(s)
    answer = server.request(get("/still"))
    assert answer.endswith(b"/still 0")
    for s in held + kept:
        s.close()


def test_a_slow_head_times_out_with_408(server: Server) -> None:
    with server.connect() as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        answer = b""
        while data := s.recv(65536):  # the server closes it (the socket's timeout is 30 s)
            answer += data
    assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within" in answer


def test_a_peer_holds_a_bounded_number_of_connections(server: Server) -> None:
    held = [server.connect("127.0.0.5") for _ in range(30)]
    for s in held:
        s.sendall(b"GET / HTTP/1.1\r\n")
    # one more from the same address is refused at once, with a reason (read before the
    # request is sent: the refusal comes at accept)
    with server.connect("127.0.0.5") as s:
        answer = b""
        while data := s.recv(65536):
            answer += data
    assert answer.startswith(b"HTTP/1.1 503") and b"too many connections" in answer
    # another address is served
    assert server.request(get("/other"), "127.0.0.6").endswith(b"/other 0")
    held.pop().close()
    # a closed one is given back (the server sees the close when it next reads)
    for _ in range(100):
        answer = server.request(get("/again"), "127.0.0.5")
        if answer.endswith(b"/again 0"):
            break
    assert answer.endswith(b"/again 0"), answer
    for s in held:
        s.close()


def test_chunked_body_and_connection_close(server: Server) -> None:
    raw = (b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    with server.connect() as s:
        s.sendall(raw)
        assert read_response(s).endswith(b"/up 11")
        # kept alive: the next request on the same connection; the app's close is honoured
        s.sendall(b"GET /close HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while data := s.recv(65536):
            answer += data
    assert b"Connection: close" in answer and answer.endswith(b"/close 0")


def test_pure_parts() -> None:
    assert head_complete(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert head_complete(b"GET / HTTP/1.0\n\n")
    assert not head_complete(b"GET / HTTP/1.1\r\nHost: x\r\n")
    assert peer_of(("::ffff:10.0.0.5", 4711, 0, 0)) == "::ffff:10.0.0.5"
    assert peer_of(("10.0.0.5", 4711)) == "10.0.0.5"
    count = PeerCount(2)
    assert count.take("a") and count.take("a") and not count.take("a") and count.take("b")
    count.give_back("a")
    assert count.held("a") == 1 and count.take("a")
    head, _, body = refusal("408 Request Timeout", "slow").partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408") and b"Connection: close" in head
    assert body == b'{"error": "slow"}' and f"Content-Length: {len(body)}".encode() in head
