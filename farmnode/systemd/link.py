"""The shim ↔ agent link: packets on an AF_UNIX SOCK_SEQPACKET socketpair.

The shim (inside the task's scope) reads the job's stdout/stderr and forwards every byte with
its offset in the stream, keeping what has not been journaled yet. The agent splits lines,
runs the job type's hooks and answers WRITE: the bytes to hand to journald (formatted lines
with their priority prefix) and the stream offset they cover up to. The shim writes them to
its journald stream connection and frees what is below that offset. So the shim is the only
writer to journald and knows exactly how far each stream is journaled: nothing is written
twice or skipped, whatever moment the agent dies at. The agent's end of the socket lives in
systemd's fd store, so when the agent dies or restarts the shim simply waits (WRITEs the old
agent sent are still queued and are carried out); the new agent sends RESUME, the shim answers
RESUMED with its journaled offset and resends from there. SEQPACKET keeps packet boundaries:
a packet half-read by a dying agent is simply gone and resent, never a torn frame.

Standard library only (the shim imports this).
"""

from __future__ import annotations

import struct

VERSION = 2  # of this protocol; version 1 (before WRITE) is in the note at the end
HEADER = struct.Struct("!cBQ")  # kind, stream, offset
MAX_PAYLOAD = 60 * 1024  # below the default socket buffer, so one packet always fits

# shim → agent
DATA = b"D"  # stream, offset of the first byte, payload: the bytes
STARTED = b"S"  # the gate opened and the job was spawned; payload: {"pid": n} JSON
EXIT = b"X"  # payload: the status record (JSON); offset unused; sent after all DATA
RESUMED = b"Z"  # stream, offset: answer to RESUME: journaled up to offset, DATA resent from it;
# payload: the RESUME's nonce (8 bytes). Packets queued before it (read by no one when the old
# agent died: DATA, EXIT, even the RESUMED of an agent that died while resuming) are stale:
# the agent drops them until the RESUMED that carries its own nonce.
# agent → shim
RESUME = b"R"  # stream, offset: a new agent; the offset field carries its nonce
WRITE = b"W"  # stream, offset: journal the payload; it covers the stream up to offset
EXIT_ACK = b"K"  # the agent has recorded the exit: the shim may go
# Version 1: the agent journaled lines itself (native entries carrying FARMNODE_OFFSET/NEXT),
# sent RESUME with the offset after the last journaled line and ACK(stream, offset) instead
# of WRITE. A shim of version 1 keeps running through an upgrade; the agent still speaks it.
ACK = b"A"

STDOUT, STDERR = 0, 1


def pack(kind: bytes, stream: int = 0, offset: int = 0, payload: bytes = b"") -> bytes:
    return HEADER.pack(kind, stream, offset) + payload


def unpack(packet: bytes) -> tuple[bytes, int, int, bytes]:
    kind, stream, offset = HEADER.unpack_from(packet)
    return kind, stream, offset, packet[HEADER.size:]
