"""Runs inside the job's persistent interpreter: reads commands on stdin, runs each in one
namespace that lives as long as the process, reports each outcome on the back-channel.

    python3 executor.py          (or inside a DCC: blender -b scene.blend --python executor.py)

Self-contained, standard library only, no farmnode import: it runs in whatever Python the job
type names (a DCC's own), as the job's user. A command fails when it raises; its traceback goes
back over the back-channel, never to stdout (the host does not parse the output). SystemExit
ends the process like any interpreter: the task in flight fails with the exit status.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
from typing import IO, Any


def _read_exact(f: IO[bytes], n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = f.read(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _report(fd: int, ok: bool, tb: str) -> None:
    body = json.dumps({"ok": ok, "traceback": tb}).encode()
    data = len(body).to_bytes(4, "big") + body
    while data:
        data = data[os.write(fd, data):]


def serve(stdin: IO[bytes], fd: int, namespace: dict[str, Any]) -> int:
    count = 0
    while True:
        header = stdin.readline()
        if not header:
            return 0
        body = _read_exact(stdin, int(header))
        if body is None:
            return 0
        request = json.loads(body)
        namespace.update(request.get("vars") or {})
        count += 1
        ok, tb = True, ""
        try:
            exec(compile(request["code"], f"<command {count}>", "exec"), namespace)
        except Exception:
            ok = False
            kind, value, trace = sys.exc_info()
            # The executor's own frame is noise: the trace starts at the command.
            tb = "".join(traceback.format_exception(kind, value,
                                                    trace.tb_next if trace else None))
        # Everything the command printed is in the pipes before its result is: the host
        # hands the output to the task first.
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        _report(fd, ok, tb)


def main() -> int:
    fd = int(os.environ.pop("FARMNODE_WARM_FD"))
    os.set_inheritable(fd, False)  # the job's own children must not hold the back-channel
    return serve(sys.stdin.buffer, fd, {"__name__": "__farmnode__", "__builtins__": __builtins__})


if __name__ == "__main__":
    sys.exit(main())
