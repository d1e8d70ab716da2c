"""The framings of warm processes. No imports at all: the task's client imports it, and a
task's start must stay cheap. The executor, which runs in the job's own interpreter and so
imports nothing of farmnode, implements the interpreter's side below by itself.

host ↔ peer (a task's client or the agent): one AF_UNIX SOCK_SEQPACKET connection per
request. The peer's first packet is the request, JSON: {"op": "run", "tasks": [ids],
"commands": [str, ...], "items": [{"label": frame, "vars": {...}}, ...]} (the commands run
once per item, with its vars), {"op": "hold"} or {"op": "stop", "teardown": bool}. The host
answers packets of a kind byte and a payload: OUT and ERR carry the interpreter's output
while it serves the request, RESULT one command's outcome, DONE the request's end with a
status and a reason. These are not JSON: the client, which a task's start pays for, imports
neither json nor socket (their imports cost more than the rest of its start together).

host → interpreter: each command on the interpreter's stdin as a decimal length, a newline
and that many bytes of JSON {"code": str, "vars": {...}}; closing stdin asks it to leave.
interpreter → host: on the back-channel (a pipe of its own, its fd number in FARMNODE_WARM_FD)
a 4-byte big-endian length and JSON {"ok": bool, "traceback": str} per command.
"""

from __future__ import annotations

OUT = b"O"
ERR = b"E"
RESULT = b"R"  # then b"1" (succeeded) or b"0" (raised) and the traceback's text
DONE = b"D"  # then a status digit (below) and the reason's text
DONE_OK, DONE_FAILED, DONE_UNAVAILABLE = 0, 1, 2
CHUNK = 32 * 1024  # output bytes per packet: well below the socket's buffer
MAX_REQUEST = 128 * 1024  # a request larger than this is refused
BACKCHANNEL_ENV = "FARMNODE_WARM_FD"
SOCKET_ENV = "FARMNODE_WARM_SOCKET"
LENGTH_BYTES = 4  # of the back-channel's length prefix, big-endian
# The task's client's exit status: a command raised (or the request was refused); the warm
# process could not serve it (it died, or the host was gone: EX_TEMPFAIL, the next task gets
# a fresh one).
EXIT_COMMAND_FAILED = 1
EXIT_UNAVAILABLE = 75
EXIT_STATUS = {DONE_OK: 0, DONE_FAILED: EXIT_COMMAND_FAILED, DONE_UNAVAILABLE: EXIT_UNAVAILABLE}


def done(status: int, reason: str = "") -> bytes:
    return DONE + str(status).encode() + reason.encode()


def parse_done(payload: bytes) -> tuple[int, str]:
    """(status, reason) of a DONE's payload (the packet without its kind)."""
    try:
        status = int(payload[:1])
    except ValueError:
        return DONE_UNAVAILABLE, "a garbled answer from the job's warm process"
    return status, payload[1:].decode(errors="replace")


def result(ok: bool, tb: str) -> bytes:
    return RESULT + (b"1" if ok else b"0") + tb.encode()
