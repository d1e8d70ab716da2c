"""The framings of warm processes. Standard library only: the host, the task's client and
the interpreter's executor import it, and a task's start must stay cheap.

host ↔ peer (a task's client or the agent): one AF_UNIX SOCK_SEQPACKET connection per
request. The peer's first packet is the request, JSON: {"op": "run", "tasks": [ids],
"items": [{"vars": {...}, "commands": [str, ...]}, ...]}, {"op": "hold"} or {"op": "stop",
"teardown": bool}. The host answers packets of a kind byte and a payload: OUT and ERR carry
the interpreter's output while it serves the request, RESULT one command's outcome, DONE the
request's end (JSON {"ok", "reason", "pid", "died"}).

host → interpreter: each command on the interpreter's stdin as a decimal length, a newline
and that many bytes of JSON {"code": str, "vars": {...}}; closing stdin asks it to leave.
interpreter → host: on the back-channel (a pipe of its own, its fd number in FARMNODE_WARM_FD)
a 4-byte big-endian length and JSON {"ok": bool, "traceback": str} per command.
"""

from __future__ import annotations

import json
import struct

OUT = b"O"
ERR = b"E"
RESULT = b"R"
DONE = b"D"
CHUNK = 32 * 1024  # output bytes per packet: well below the socket's buffer
MAX_REQUEST = 4 * 1024 * 1024  # a request larger than this is refused
BACKCHANNEL_ENV = "FARMNODE_WARM_FD"
SOCKET_ENV = "FARMNODE_WARM_SOCKET"
LENGTH = struct.Struct("!I")
# A task's client ends with this status when no command failed but the warm process could not
# serve it (it died, or the host was gone): EX_TEMPFAIL, the next task gets a fresh one.
EXIT_UNAVAILABLE = 75
EXIT_COMMAND_FAILED = 1


def packet(kind: bytes, payload: bytes) -> bytes:
    return kind + payload


def json_packet(kind: bytes, obj: object) -> bytes:
    return kind + json.dumps(obj).encode()


def command_frame(code: str, variables: dict[str, object]) -> bytes:
    body = json.dumps({"code": code, "vars": variables}).encode()
    return str(len(body)).encode() + b"\n" + body


def result_frame(ok: bool, tb: str) -> bytes:
    body = json.dumps({"ok": ok, "traceback": tb}).encode()
    return LENGTH.pack(len(body)) + body
