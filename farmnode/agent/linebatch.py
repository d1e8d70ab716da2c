"""What the agent hands the shim of a run's output: each stream's state on the agent's side,
and the packets that journal whole lines (WRITE for link protocol 2; for protocol 1 the agent
journals each line itself and ACKs).

The line splitting and the job type's hooks are the run's (farmnode.agent.runner); these
only batch what it made of the lines. It may import farmnode.systemd only.
"""

from __future__ import annotations

from dataclasses import dataclass

from farmnode.systemd import link
from farmnode.systemd.journal import TaskLogFields, format_line, legacy_write_line


@dataclass
class StreamState:
    """One output stream on the agent's side: what is handed to the shim, what awaits a
    newline."""

    index: int
    journaled: int = 0  # bytes of the stream covered by WRITEs sent to the shim
    line_no: int = 0  # link protocol 1 only (FARMNODE_LINE)
    pending: bytes = b""  # received, not yet a whole line
    resuming: bool = False  # RESUME sent, RESUMED not yet seen: stale DATA may be queued

    @property
    def received(self) -> int:
        return self.journaled + len(self.pending)


class WriteBatch:
    """WRITE packets for the shim, each ≤ MAX_PAYLOAD and ending on a whole line, so that a
    packet is journaled whole or (lost with a dying agent) resent whole."""

    def __init__(self, stream: int) -> None:
        self.stream = stream
        self.packets: list[bytes] = []
        self._parts: list[bytes] = []
        self._size = 0
        self._end = -1

    def add_line(self, st: StreamState, priority: int, text: str | None, end: int) -> None:
        self.add(format_line(priority, text) if text is not None else b"", end)

    def add(self, formatted: bytes, end: int) -> None:
        if len(formatted) > link.MAX_PAYLOAD:
            # Only a formatter can make a line this long (the run splits lines at MAX_LINE).
            formatted = formatted[:link.MAX_PAYLOAD - 16] + b" [truncated]\n"
        if self._size + len(formatted) > link.MAX_PAYLOAD:
            self._close()
        if formatted:
            self._parts.append(formatted)
            self._size += len(formatted)
        self._end = end

    def _close(self) -> None:
        if self._end >= 0:
            self.packets.append(link.pack(link.WRITE, self.stream, self._end,
                                          b"".join(self._parts)))
        self._parts, self._size, self._end = [], 0, -1

    def done(self) -> list[bytes]:
        self._close()
        return self.packets


class NativeBatch(WriteBatch):
    """Link protocol 1 (a shim an older agent started): the agent journals each line itself
    and acknowledges the offset journaled up to."""

    def __init__(self, stream: int, fields: TaskLogFields) -> None:
        super().__init__(stream)
        self.fields = fields

    def add_line(self, st: StreamState, priority: int, text: str | None, end: int) -> None:
        st.line_no += 1
        if text is not None:
            legacy_write_line(self.fields, st.index, st.line_no, st.journaled, end, priority,
                              text)
        self._end = end

    def done(self) -> list[bytes]:
        return [link.pack(link.ACK, self.stream, self._end)] if self._end >= 0 else []
