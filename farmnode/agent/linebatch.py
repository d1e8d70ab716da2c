"""What the agent makes of a run's output: each stream's state on the agent's side, the
lines split out of it and run through the job type's line hooks (LineSplitter), and the
packets that journal whole lines (WRITE for link protocol 2; for protocol 1 the agent
journals each line itself and ACKs).

Reading the link is the run's (farmnode.agent.runner). It may import farmnode.systemd and
farmnode.jobtypes.base only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from farmnode.jobtypes.base import JobType, Stream
from farmnode.systemd import link
from farmnode.systemd.journal import (
    DEFAULT_PRIORITIES,
    TaskLogFields,
    format_line,
    legacy_write_line,
)

log = logging.getLogger(__name__)

MAX_LINE = 16 * 1024  # longer lines are split; journald's own LineMax is 48K


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
            # Only a formatter can make a line this long (lines are split at MAX_LINE).
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


@dataclass
class LineSplitter:
    """Whole lines out of a stream's bytes, run through the job type's line hooks, and the
    packets that hand them to the shim (one per link reading: the job type and the link's
    protocol are known by the time the link is read)."""

    assignment_id: str
    jobtype_name: str  # for the log, when a hook fails
    link_version: int
    log_fields: TaskLogFields | None  # link protocol 1: the agent journals the lines itself
    jobtype: JobType | None  # None: lines go as they are, at the stream's priority

    def take(self, st: StreamState, offset: int, payload: bytes) -> list[bytes]:
        """The WRITEs for the whole lines in a DATA packet; bytes already had are skipped."""
        if st.resuming:
            return []  # queued before our RESUME; the shim resends it after RESUMED
        if offset + len(payload) <= st.received:
            return []  # already had it
        batch = self._batch(st)
        if offset > st.received:
            log.error("assignment %s stream %d: bytes %d..%d lost", self.assignment_id,
                      st.index, st.received, offset)
            self._flush_into(batch, st)
            st.journaled = offset
        buf = st.pending + payload[st.received - offset:]
        start = 0
        while True:
            nl = buf.find(b"\n", start, start + MAX_LINE + 1)
            if nl != -1:
                self._line(batch, st, buf[start:nl], st.journaled + nl - start + 1)
                start = nl + 1
            elif len(buf) - start > MAX_LINE:
                self._line(batch, st, buf[start:start + MAX_LINE], st.journaled + MAX_LINE)
                start += MAX_LINE
            else:
                break
        st.pending = buf[start:]
        return batch.done()

    def flush_pending(self, st: StreamState) -> list[bytes]:
        """A last line with no newline (end of output)."""
        batch = self._batch(st)
        self._flush_into(batch, st)
        return batch.done()

    def _batch(self, st: StreamState) -> WriteBatch:
        if self.link_version == 1:
            assert self.log_fields is not None
            return NativeBatch(st.index, self.log_fields)
        return WriteBatch(st.index)

    def _flush_into(self, batch: WriteBatch, st: StreamState) -> None:
        if st.pending:
            pending, st.pending = st.pending, b""
            self._line(batch, st, pending, st.journaled + len(pending))

    def _line(self, batch: WriteBatch, st: StreamState, raw: bytes, next_offset: int) -> None:
        text = raw.decode("utf-8", errors="replace").rstrip("\r")
        out: str | None = text
        priority = DEFAULT_PRIORITIES[st.index]
        if self.jobtype is not None:
            stream = Stream(st.index)
            try:
                out = self.jobtype.handle_line(stream, text)
                if out is not None:
                    priority = self.jobtype.line_priority(stream, text)
            except Exception as exc:
                log.warning("job type %s line hook failed: %s", self.jobtype_name,
                            exc)
                out, priority = text, DEFAULT_PRIORITIES[st.index]
        batch.add_line(st, priority, out, next_offset)
        st.journaled = next_offset
