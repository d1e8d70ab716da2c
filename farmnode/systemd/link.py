"""The shim ↔ agent link: packets on an AF_UNIX SOCK_SEQPACKET socketpair.

The shim (inside the task's scope) reads the job's stdout/stderr and forwards every byte with
its offset in the stream, keeping what the agent has not acknowledged. The agent journals
whole lines and acknowledges the offset journaled up to. The agent's end of the socket lives
in systemd's fd store, so when the agent dies or restarts the shim simply waits; the new agent
reads, from the journal itself, how far each stream was journaled and sends RESUME with that
offset; the shim resends from there and the agent drops anything below it. The journal is
the only record of progress, so a line is journaled exactly once whatever moment the agent
dies at. SEQPACKET keeps packet boundaries: a packet half-read by a dying agent is simply
gone and resent, never a torn frame.

Standard library only (the shim imports this).
"""

from __future__ import annotations

import struct

HEADER = struct.Struct("!cBQ")  # kind, stream, offset
MAX_PAYLOAD = 60 * 1024  # below the default socket buffer, so one packet always fits

# shim → agent
DATA = b"D"  # stream, offset of the first byte, payload: the bytes
STARTED = b"S"  # the gate opened and the job was spawned; payload: {"pid": n} JSON
EXIT = b"X"  # payload: the status record (JSON); offset unused; sent after all DATA
RESUMED = b"Z"  # stream, offset: answer to RESUME; DATA from here on restarts at offset.
# DATA queued before RESUMED (read by no one when the old agent died) may lie beyond what the
# journal has; the agent drops such packets until RESUMED says where the resend begins.
# agent → shim
RESUME = b"R"  # stream, offset: resend everything from offset (the journal's end)
ACK = b"A"  # stream, offset: journaled up to offset; the shim may free what is below
EXIT_ACK = b"K"  # the agent has recorded the exit: the shim may go

STDOUT, STDERR = 0, 1


def pack(kind: bytes, stream: int = 0, offset: int = 0, payload: bytes = b"") -> bytes:
    return HEADER.pack(kind, stream, offset) + payload


def unpack(packet: bytes) -> tuple[bytes, int, int, bytes]:
    kind, stream, offset = HEADER.unpack_from(packet)
    return kind, stream, offset, packet[HEADER.size:]
