"""A task's command when its job has a warm process: hands the task's commands to the job's
host and writes what the interpreter prints to this process's stdout and stderr.

    python3 -I -S .../farmnode/warm/client.py REQUEST_JSON     (socket: $FARMNODE_WARM_SOCKET)

It runs in the task's scope as the job's user, under the task's shim, so the interpreter's
lines are journaled as the task's (its fields, `farmnode logs <task>`). It prints a failed
command's traceback on stderr and, last, one marked line (RECORD and the reason) for the
agent's job type, which makes it the task's reason. Exit status: 0 every command succeeded,
1 one raised, 75 the warm process could not serve the task (it died, or the host was gone).

Its start is what a warm task costs, so it is run by path with -S (no site import), sends
the request as the job type wrote it, and imports neither json nor socket (_socket is the
same sockets without the enum and selectors imports): about 20 ms less on a 2-core node.
"""

from __future__ import annotations

import os
import sys

if not __package__:
    # Run by path: the package root (site-packages, or the checkout) holds farmnode.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))))

import _socket

from farmnode.warm import wire

# As farmnode.jobtypes.remote's records, the ASCII record separator never starts a
# renderer's line.
RECORD = "\x1ewarm "


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


def record(reason: str) -> bytes:
    return (RECORD + " ".join(reason.splitlines()) + "\n").encode()


def run(path: str, request: bytes | str, out: int = 1, err: int = 2) -> tuple[int, str]:
    """Send the request (JSON), copy the output; (exit status, reason: empty on success)."""
    if isinstance(request, str):
        request = request.encode()
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
    try:
        sock.connect(path)
        sock.sendall(request)
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
                if payload[:1] != b"1":
                    _write_all(err, payload[1:])
            elif kind == wire.DONE:
                status, reason = wire.parse_done(payload)
                return wire.EXIT_STATUS.get(status, wire.EXIT_UNAVAILABLE), \
                    "" if status == wire.DONE_OK else reason or "failed"
    finally:
        sock.close()


def main(argv: list[str]) -> int:
    path = os.environ.get(wire.SOCKET_ENV, "")
    if len(argv) != 2 or not path:
        _write_all(2, record(f"usage: client.py REQUEST_JSON with ${wire.SOCKET_ENV} set"))
        return 2
    code, reason = run(path, argv[1])
    if reason:
        _write_all(2, record(reason))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv))
