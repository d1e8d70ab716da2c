"""gunicorn's threaded worker (gthread) with what one client can hold bounded.

gthread hands a connection to one of its threads as soon as its first bytes arrive, and the
thread then waits, without any limit, for the rest of the request head: forty connections
that each sent half a head held all 32 threads, and every other request waited behind them.
Here the worker's main loop reads the head itself, without blocking, and a thread gets the
connection only with a whole head in hand (the parser finds it in its buffer). What a
connection may hold is bounded:

- the head must be complete within HEAD_TIMEOUT of the connection's first moment (or of the
  end of its previous request) and fit in MAX_HEAD bytes, else 408 / 431 and closed;
- a peer address may hold MAX_PER_PEER connections at once; more are closed at accept;
- once in a thread, every read and write of the socket waits at most IO_TIMEOUT (a client
  that stops reading its answer or sending its body lets go of the thread);
- a response the app marks `Connection: close` (refusals, errors) closes the connection, and
  closing never lingers in the main loop.

Credentials are only known once the head is parsed, so these bounds apply to everyone; what a
client without credentials may do after that is the app's business (farmnode.api.app).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import selectors
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

from gunicorn.workers.gthread import TConn, ThreadWorker

HEAD_TIMEOUT = 10.0
MAX_HEAD = 16 * 1024
IO_TIMEOUT = 20.0
MAX_PER_PEER = 64
# What a closing connection may still have sent us, read without waiting before the close
# (unread bytes would make the kernel answer with a reset and cut off our last response).
DRAIN_ON_CLOSE = 64 * 1024


def head_complete(data: bytes | bytearray) -> bool:
    """Whether a request head (request line and headers) ends in these bytes."""
    return b"\r\n\r\n" in data or b"\n\n" in data


def peer_of(address: Any) -> str:
    """The key connections are counted under: the peer's IP address (no port)."""
    if isinstance(address, tuple) and address:
        return str(address[0])
    return str(address)  # a Unix socket's peer has no address: they share one count


class PeerCount:
    """Connections held per peer address (taken on the main loop, given back there or by the
    thread that answered the connection's last request)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held: Counter[str] = Counter()
        self._lock = threading.Lock()

    def take(self, peer: str) -> bool:
        with self._lock:
            if self._held[peer] >= self.limit:
                return False
            self._held[peer] += 1
            return True

    def give_back(self, peer: str) -> None:
        with self._lock:
            self._held[peer] -= 1
            if self._held[peer] <= 0:
                del self._held[peer]

    def held(self, peer: str) -> int:
        return self._held[peer]


def refusal(status: str, message: str) -> bytes:
    """A complete HTTP response that closes the connection, with the API's JSON error."""
    body = json.dumps({"error": message}).encode()
    return (f"HTTP/1.1 {status}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


class TimeoutSocket(socket.socket):
    """A connection whose blocking mode waits at most IO_TIMEOUT per read and per write.

    gthread switches a connection to blocking mode for its thread (and back for its poller);
    here "blocking" means a bounded wait, which raises TimeoutError."""

    def setblocking(self, flag: bool) -> None:
        self.settimeout(IO_TIMEOUT if flag else 0.0)


class Conn(TConn):  # type: ignore[misc]
    def __init__(self, cfg: Any, sock: socket.socket, client: Any, server: Any,
                 release: Callable[[], None]) -> None:
        super().__init__(cfg, sock, client, server)
        self.head = bytearray()
        self.head_deadline = 0.0
        self._release: Callable[[], None] | None = release

    def release(self) -> None:
        """The connection no longer counts against its peer's limit (once)."""
        if self._release is not None:
            release, self._release = self._release, None
            release()

    def close(self, graceful: bool = False) -> None:
        try:
            if graceful:
                # gunicorn's graceful close waits up to 2 s for the peer's FIN, on the main
                # loop: every client that does not hang up would stall all the others.
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_WR)
                    self.sock.settimeout(0.0)
                    drained = 0
                    while drained < DRAIN_ON_CLOSE:
                        data = self.sock.recv(DRAIN_ON_CLOSE)
                        if not data:
                            break
                        drained += len(data)
            with contextlib.suppress(OSError):
                self.sock.close()
        finally:
            self.release()


def quiet_timeouts(record: logging.LogRecord) -> bool:
    """gthread logs any socket error but a reset with its traceback; a client that stopped
    reading or sending (our IO_TIMEOUT) is no fault of ours: one line, at debug level."""
    if record.exc_info and isinstance(record.exc_info[1], TimeoutError):
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.msg, record.args, record.exc_info = "a client timed out: %s", (
            record.exc_info[1],), None
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
    return True


def close_on_request(app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
    """Honour the app's `Connection: close` (gunicorn drops hop-by-hop headers it is given)."""

    def wrapped(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            if any(k.lower() == "connection" and v.lower() == "close" for k, v in headers):
                response = getattr(start_response, "__self__", None)
                if response is not None and hasattr(response, "force_close"):
                    response.force_close()
            return start_response(status, headers, exc_info)

        return app(environ, start)

    return wrapped


class Worker(ThreadWorker):  # type: ignore[misc]
    wsgi: Callable[..., Iterable[bytes]]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.peers = PeerCount(MAX_PER_PEER)
        # Connections whose head is being read, oldest first (one timeout for all: the
        # order of insertion is the order of the deadlines).
        self.reading: dict[Conn, None] = {}

    def init_process(self) -> None:
        logging.getLogger("gunicorn.error").addFilter(quiet_timeouts)
        super().init_process()

    def load_wsgi(self) -> None:
        super().load_wsgi()
        self.wsgi = close_on_request(self.wsgi)

    # ---- accepting ------------------------------------------------------------------------

    def accept(self, listener: Any) -> None:
        try:
            raw, address = listener.accept()
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.ECONNABORTED,
                             errno.EMFILE, errno.ENFILE):
                return
            raise
        peer = peer_of(address)
        if not self.peers.take(peer):
            self.log.debug("refused a connection from %s: it holds %d", peer,
                           self.peers.held(peer))
            with contextlib.suppress(OSError):
                raw.setblocking(False)
                raw.send(refusal("503 Service Unavailable",
                                 f"too many connections from {peer} (at most "
                                 f"{MAX_PER_PEER})"))
                raw.shutdown(socket.SHUT_WR)
                raw.recv(DRAIN_ON_CLOSE)  # what came already: unread, it would reset
            raw.close()
            return
        try:
            sock = TimeoutSocket(raw.family, raw.type, raw.proto, fileno=raw.detach())
            conn = Conn(self.cfg, sock, address, listener.getsockname(),
                        partial(self.peers.give_back, peer))
        except OSError:
            self.peers.give_back(peer)
            raw.close()
            return
        self.nr_conns += 1
        self.read_head(conn)

    # ---- the request head, read by the main loop ---------------------------------------------

    def read_head(self, conn: Conn) -> None:
        conn.sock.setblocking(False)
        conn.head_deadline = time.monotonic() + HEAD_TIMEOUT
        self.reading[conn] = None
        self.poller.register(conn.sock, selectors.EVENT_READ,
                             partial(self.on_head_readable, conn))

    def on_head_readable(self, conn: Conn, _sock: Any = None) -> None:
        try:
            data = conn.sock.recv(MAX_HEAD - len(conn.head))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client went away
            self.drop(conn)
            return
        conn.head += data
        if head_complete(conn.head):
            self._stop_reading(conn)
            self.dispatch(conn)
        elif len(conn.head) >= MAX_HEAD:
            self.drop(conn, refusal("431 Request Header Fields Too Large",
                                    f"the request head is larger than {MAX_HEAD} bytes"))

    def dispatch(self, conn: Conn) -> None:
        """A whole head is in: to a thread, the head in the parser's buffer."""
        head = bytes(conn.head)
        conn.head.clear()
        conn.init()  # the parser (plain HTTP/1: no I/O); a kept-alive connection has one
        conn.parser.unreader.unread(head)
        conn.data_ready = True
        self.enqueue_req(conn)

    def _stop_reading(self, conn: Conn) -> None:
        self.reading.pop(conn, None)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.poller.unregister(conn.sock)

    def drop(self, conn: Conn, answer: bytes = b"") -> None:
        self._stop_reading(conn)
        if answer:
            with contextlib.suppress(OSError):
                conn.sock.send(answer)  # non-blocking: what fits, or nothing
        self.nr_conns -= 1
        conn.close()

    def murder_pending(self) -> None:
        super().murder_pending()
        now = time.monotonic()
        while self.reading:
            conn = next(iter(self.reading))
            if conn.head_deadline > now:
                break
            self.drop(conn, refusal("408 Request Timeout",
                                    f"the request head did not arrive within "
                                    f"{HEAD_TIMEOUT:g}s") if conn.head else b"")

    # ---- kept-alive connections: their next head is read the same way ---------------------

    def on_client_socket_readable(self, conn: Conn, client: Any) -> None:
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        self.read_head(conn)
        self.on_head_readable(conn)

    def handle(self, conn: Conn) -> Any:
        result = super().handle(conn)
        if result is False:
            # Its last response is out and the connection ends: the peer holds it no longer.
            # The main loop closes it only once it gets to the finished future, under a flood
            # after the peer's next connects, which would count against the peer's limit
            # (a client that never held 64 connections was refused for holding them).
            conn.release()
        return result

    def finish_request(self, conn: Conn, fs: Any) -> None:
        # A request read ahead into the next one (pipelining, a drained body): gthread would
        # hand it straight back to a thread, which would then wait for the rest of the head.
        if (self.alive and not fs.cancelled() and fs.exception() is None
                and fs.result() is True and conn.parser is not None
                and conn.parser.unreader.buf.getvalue()):
            conn.head = bytearray(conn.parser.unreader.take_buffered())
            self.read_head(conn)
            if head_complete(conn.head):
                self._stop_reading(conn)
                self.dispatch(conn)
            return
        super().finish_request(conn, fs)
