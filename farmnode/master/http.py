"""The HTTP client for the master: stdlib http.client, one request at a time, in one thread.

Why not aiohttp/httpx: the master sees a few requests a minute from a node, one at a time
(reports go out in order anyway), so an event-loop-native client buys nothing but a
dependency. http.client handles keep-alive, chunked replies and TLS; it runs in a dedicated
single-thread executor so a slow master never blocks the agent's loop. Cancellation (agent
stopping) shuts the socket down from the loop's thread, which ends the blocked call at once
instead of leaving a thread that holds the process's exit until its timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import logging
import os
import socket
import ssl
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, Any

log = logging.getLogger(__name__)

# PyFarm's master fills in `remote_ip` from the peer only for this User-Agent, and an agent
# that sends another one is treated as some other client editing the agent.
USER_AGENT = "PyFarm/1.0 (agent)"
MASTER_USER_AGENT = "PyFarm/1.0 (master)"


class TransportError(Exception):
    """No HTTP answer: refused, reset, timed out, DNS. Always worth retrying."""


@dataclass(frozen=True)
class Response:
    status: int
    body: Any  # parsed JSON, or the text when the master did not send JSON

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def error_text(self) -> str:
        if isinstance(self.body, dict) and "error" in self.body:
            return f"{self.status} {self.body['error']}"
        return f"{self.status} {str(self.body)[:200]}"


class MasterHTTP:
    def __init__(self, base_url: str, timeout: float = 30.0) -> None:
        url = urllib.parse.urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self._scheme = url.scheme
        self._host = url.hostname
        self._port = url.port
        self._prefix = url.path.rstrip("/")
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="farmnode-master")

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        if self._conn is None:
            if self._scheme == "https":
                self._conn = http.client.HTTPSConnection(
                    self._host, self._port, timeout=timeout,
                    context=ssl.create_default_context())
            else:
                self._conn = http.client.HTTPConnection(self._host, self._port, timeout=timeout)
        self._conn.timeout = timeout
        if self._conn.sock is not None:
            self._conn.sock.settimeout(timeout)
        return self._conn

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _request_blocking(self, method: str, path: str, body: bytes | IO[bytes] | None,
                          timeout: float, content_type: str = "application/json",
                          ) -> Response:
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        start = 0
        if body is not None and not isinstance(body, bytes):
            # A file is sent as it is read, with its length: without one http.client would
            # send it chunked, which PyFarm's master (Werkzeug 0.10, HTTP/1.0) reads as empty.
            start = body.tell()
            headers["Content-Length"] = str(os.fstat(body.fileno()).st_size - start)
        # A kept-alive connection the master closed meanwhile fails on first use: retry that
        # once on a fresh one (PyFarm retried such "broken connection" errors at once).
        for attempt in (1, 2):
            reused = self._conn is not None and self._conn.sock is not None
            conn = self._connection(timeout)
            if body is not None and not isinstance(body, bytes):
                body.seek(start)
            try:
                conn.request(method, self._prefix + path, body=body, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
            except (http.client.RemoteDisconnected, BrokenPipeError,
                    ConnectionResetError) as exc:
                self._drop()
                if reused and attempt == 1:
                    continue
                raise TransportError(f"{type(exc).__name__}: {exc}") from None
            except (OSError, http.client.HTTPException) as exc:
                self._drop()
                raise TransportError(f"{type(exc).__name__}: {exc}".rstrip(": ")) from None
            if resp.will_close:
                self._drop()
            text = raw.decode("utf-8", "replace")
            try:
                parsed: Any = json.loads(text) if text else None
            except ValueError:
                parsed = text
            return Response(resp.status, parsed)
        raise AssertionError("unreachable")

    async def request(self, method: str, path: str, data: Any = None,
                      timeout: float | None = None) -> Response:
        """One request; raises TransportError when no HTTP answer came back in time."""
        limit = self.timeout if timeout is None else max(0.1, min(timeout, self.timeout))
        body = None if data is None else json.dumps(data).encode()
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._pool, self._request_blocking, method, path, body, limit)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            self._abort()
            raise

    async def send_file(self, method: str, path: str, body: IO[bytes], content_type: str,
                        timeout: float | None = None) -> Response:
        """One request whose body is a file (from its current position to its end), read
        as it is sent; raises TransportError as request() does."""
        limit = self.timeout if timeout is None else max(0.1, min(timeout, self.timeout))
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._pool, self._request_blocking, method, path, body, limit,
                                   content_type)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            self._abort()
            raise

    def _abort(self) -> None:
        # Called from the loop's thread while the worker may sit in recv(): shutdown() makes
        # that recv return at once; the worker then closes the connection itself.
        conn = self._conn
        sock = conn.sock if conn is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._abort()
        self._pool.shutdown(wait=False, cancel_futures=True)
