"""Headless Chromium (Debian's `chromium`) driven over the DevTools protocol on a pipe
(--remote-debugging-pipe: NUL-separated JSON on fds 3 and 4), so a test needs no WebSocket
client; and a PNG decoder for its screenshots (zlib and the five PNG filters, stdlib only).

Waits are the browser's own: a script given to `wait_for` is a promise that resolves when the
DOM shows what the test waits for (a MutationObserver), never a sleep.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import itertools
import json
import os
import queue
import shutil
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CHROMIUM = "chromium"


class DevToolsError(Exception):
    pass


class Browser:
    def __init__(self, profile: Path, width: int, height: int) -> None:
        if shutil.which(CHROMIUM) is None:
            raise RuntimeError("chromium is not installed: `make apt` installs it")
        to_child_r, self._out = os.pipe()
        self._in, from_child_w = os.pipe()
        # The browser reads fd 3 and writes fd 4; moved out of 3/4's way before dup2.
        r = fcntl.fcntl(to_child_r, fcntl.F_DUPFD_CLOEXEC, 10)
        w = fcntl.fcntl(from_child_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(to_child_r)
        os.close(from_child_w)

        def fds() -> None:
            os.dup2(r, 3)
            os.dup2(w, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-extensions", "--disable-background-networking", "--mute-audio",
             f"--user-data-dir={profile}", f"--window-size={width},{height}",
             "--remote-debugging-pipe", "about:blank"],
            # Not close_fds: it would close 3 and 4 after fds() ran; every other descriptor
            # of ours is close-on-exec already (Python's default).
            close_fds=False, preexec_fn=fds, stdout=subprocess.DEVNULL,
            stderr=open(profile.parent / "chromium.log", "wb"))  # noqa: SIM115
        os.close(r)
        os.close(w)
        self._ids = itertools.count(1)
        self._replies: dict[int, queue.Queue[dict[str, Any]]] = {}
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()  # what the browser told
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.session = ""

    def _read(self) -> None:
        buf = b""
        with os.fdopen(self._in, "rb", buffering=0) as f:
            while chunk := f.read(65536):
                buf += chunk
                *messages, buf = buf.split(b"\0")
                for raw in messages:
                    msg = json.loads(raw)
                    if "id" in msg:
                        with self._lock:
                            q = self._replies.get(msg["id"])
                        if q is not None:
                            q.put(msg)
                    else:
                        self.events.put(msg)

    def send(self, method: str, wait: float = 30, session: bool = True,
             **params: Any) -> dict[str, Any]:
        i = next(self._ids)
        q: queue.Queue[dict[str, Any]] = queue.Queue()
        with self._lock:
            self._replies[i] = q
        msg: dict[str, Any] = {"id": i, "method": method, "params": params}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self._out, json.dumps(msg).encode() + b"\0")
        try:
            reply = q.get(timeout=wait)
        except queue.Empty:
            raise DevToolsError(f"{method}: no answer within {wait}s") from None
        finally:
            with self._lock:
                self._replies.pop(i, None)
        if "error" in reply:
            raise DevToolsError(f"{method}: {reply['error']}")
        result: dict[str, Any] = reply.get("result", {})
        return result

    def attach(self) -> None:
        targets = self.send("Target.getTargets", session=False)["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        self.session = self.send("Target.attachToTarget", session=False,
                                 targetId=page["targetId"], flatten=True)["sessionId"]

    def navigate(self, url: str, timeout: float = 60) -> None:
        """Open `url` and return once its load event fired (its deferred scripts ran)."""
        while not self.events.empty():
            self.events.get_nowait()
        self.send("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        while True:
            try:
                event = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise DevToolsError(f"{url}: not loaded within {timeout}s") from None
            if event.get("method") == "Page.loadEventFired":
                return

    def evaluate(self, expression: str, timeout: float = 30) -> Any:
        """The value of a script; a promise is awaited (in the page, up to `timeout`)."""
        r = self.send("Runtime.evaluate", wait=timeout + 5, expression=expression,
                      awaitPromise=True, returnByValue=True, timeout=timeout * 1000)
        if "exceptionDetails" in r:
            raise DevToolsError(f"script failed: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(self, condition: str, timeout: float) -> Any:
        """Until `condition` (a JS expression) is truthy; re-checked on every DOM change."""
        script = f"""new Promise((resolve, reject) => {{
            const check = () => {{ let v;
                try {{ v = ({condition}); }} catch (e) {{ v = null; }} // not there yet
                if (v) {{ observer.disconnect(); clearTimeout(timer); resolve(v); }} }};
            const observer = new MutationObserver(check);
            const timer = setTimeout(() => {{ observer.disconnect();
                reject(new Error("timed out: " + document.body.innerText.slice(0, 2000))); }},
                {int(timeout * 1000)});
            observer.observe(document, {{subtree: true, childList: true, attributes: true,
                                        characterData: true}});
            check(); }})"""
        return self.evaluate(script, timeout=timeout + 5)

    def screenshot(self) -> bytes:
        return base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"])

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.send("Browser.close", session=False, wait=5)
        os.close(self._out)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def browser(profile: Path, width: int = 390, height: int = 844) -> Iterator[Browser]:
    """A phone-sized headless Chromium, attached to its page."""
    b = Browser(profile, width, height)
    try:
        b.attach()
        b.send("Page.enable")
        b.send("Runtime.enable")
        b.send("Emulation.setDeviceMetricsOverride", width=width, height=height,
               deviceScaleFactor=1, mobile=True)
        yield b
    finally:
        b.close()


# ---- PNG -----------------------------------------------------------------------------------


def png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """Width, height and the rows of an 8-bit RGB or RGBA PNG (what Chromium writes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, colour, _c, _f, interlace = struct.unpack(">IIBBBBB", header)
    if depth != 8 or colour not in (2, 6) or interlace:
        raise ValueError(f"PNG depth {depth} colour type {colour} interlace {interlace}: "
                         "only 8-bit RGB/RGBA, not interlaced")
    bpp = 3 if colour == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        kind = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for x in range(stride):
            a = line[x - bpp] if x >= bpp else 0
            b = prev[x]
            c = prev[x - bpp] if x >= bpp else 0
            if kind == 1:
                line[x] = (line[x] + a) & 0xFF
            elif kind == 2:
                line[x] = (line[x] + b) & 0xFF
            elif kind == 3:
                line[x] = (line[x] + (a + b) // 2) & 0xFF
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
                line[x] = (line[x] + pred) & 0xFF
        rows.append(b"".join(bytes(line[i:i + 3]) for i in range(0, stride, bpp)))
        prev = line
    return width, height, rows


def colours(data: bytes) -> dict[tuple[int, int, int], int]:
    """How many pixels of each RGB colour the PNG has."""
    _w, _h, rows = png_pixels(data)
    counts: dict[tuple[int, int, int], int] = {}
    for row in rows:
        for i in range(0, len(row), 3):
            px = (row[i], row[i + 1], row[i + 2])
            counts[px] = counts.get(px, 0) + 1
    return counts
