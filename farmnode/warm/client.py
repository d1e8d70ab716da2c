"""A task's command when its job has a warm process: hands the task's commands to the job's
host and writes what the interpreter prints to this process's stdout and stderr.

    python3 -I -S .../farmnode/warm/client.py REQUEST_JSON     (socket: $FARMNODE_WARM_SOCKET)

It runs in the task's scope as the job's user, under the task's shim, so the interpreter's
lines are journaled as the task's (its fields, `farmnode logs <task>`). It prints a failed
command's traceback on stderr and, last, one marked record (MARK + JSON {"warm": reason})
for the agent's job type, which makes it the task's reason. Exit status: 0 every command
succeeded, 1 one raised, 75 the warm process could not serve the task (it died, or the host
was gone). Run by path with -S: a task's start pays for no site import.
"""

from __future__ import annotations

import json
import os
import socket
import sys

if not __package__:
    # Run by path: the package root (site-packages, or the checkout) holds farmnode.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))))

from farmnode.warm import wire

MARK = "\x1e"  # as farmnode.jobtypes.remote's records: never the start of a renderer's line


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


def record(reason: str) -> bytes:
    return (MARK + json.dumps({"warm": reason}) + "\n").encode()


def run(path: str, request: dict[str, object], out: int = 1, err: int = 2) -> tuple[int, str]:
    """Send the request, copy the output; (exit status, reason: empty when all succeeded)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.connect(path)
        sock.sendall(json.dumps(request).encode())
    except OSError as exc:
        sock.close()
        return wire.EXIT_UNAVAILABLE, f"the job's warm process is not there ({path}): " \
                                      f"{exc.strerror or exc}"
    try:
        while True:
            packet = sock.recv(wire.CHUNK + 1024 * 1024)
            if not packet:
                return wire.EXIT_UNAVAILABLE, "the job's warm process left without an answer"
            kind, payload = packet[:1], packet[1:]
            if kind == wire.OUT:
                _write_all(out, payload)
            elif kind == wire.ERR:
                _write_all(err, payload)
            elif kind == wire.RESULT:
                result = json.loads(payload)
                if not result.get("ok"):
                    _write_all(err, str(result.get("traceback") or "").encode())
            elif kind == wire.DONE:
                done = json.loads(payload)
                if done.get("ok"):
                    return 0, ""
                code = wire.EXIT_UNAVAILABLE if done.get("died") else wire.EXIT_COMMAND_FAILED
                return code, str(done.get("reason") or "failed")
    finally:
        sock.close()


def main(argv: list[str]) -> int:
    path = os.environ.get(wire.SOCKET_ENV, "")
    if len(argv) != 2 or not path:
        _write_all(2, record(f"usage: client.py REQUEST_JSON with ${wire.SOCKET_ENV} set"))
        return 2
    request = json.loads(argv[1])
    code, reason = run(path, request)
    if reason:
        _write_all(2, record(reason))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv))
