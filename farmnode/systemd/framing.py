"""Lines for journald's stdout stream with the level prefix on: every line it reads starts
with our "<N>", so a job's own output can never choose its priority.

journald reads "<N>" at the start of each line of such a stream as that line's priority, and
a line ends not only at a newline: a NUL ends it too, and a line reaching journald's LineMax
(48K by default) is cut there, the remainder read as a new line. A job that printed
"x\\0<0>..." or 48K of text and then "<0>..." would otherwise write entries at PRIORITY 0
under the task's (trusted) stream. So a NUL becomes U+FFFD, and a line is cut here, at
LINE_BYTES, before journald would cut it, each piece with our prefix.

Standard library only, no dataclasses: the shim imports this once per task.
"""

from __future__ import annotations

# Well below journald's default LineMax (48K; LineMax= in journald.conf lowers it, to 79 at
# least): a journald configured below this would cut lines itself again.
LINE_BYTES = 16 * 1024
REPLACEMENT = "\ufffd".encode()


def prefix_of(priority: int) -> bytes:
    return b"<%d>" % min(max(priority, 0), 7)


class Framer:
    """Frames one stream's raw bytes, chunk by chunk, as prefixed journald lines."""

    __slots__ = ("broke", "col", "prefix")

    def __init__(self, priority: int) -> None:
        self.prefix = prefix_of(priority)
        self.col = 0  # bytes of the current line written so far (0: at a line start)
        self.broke = False  # the last line was cut at LINE_BYTES: its newline is written

    def feed(self, data: bytes) -> bytes:
        if b"\0" in data:
            data = data.replace(b"\0", REPLACEMENT)
        out = bytearray()
        prefix = self.prefix
        for i, part in enumerate(data.split(b"\n")):
            if i:
                # The job's newline; after a cut exactly at its end the cut's newline is it.
                if self.col or not self.broke:
                    if not self.col:
                        out += prefix
                    out += b"\n"
                self.col, self.broke = 0, False
            pos = 0
            while pos < len(part):
                if not self.col:
                    out += prefix
                take = min(len(part) - pos, LINE_BYTES - self.col)
                out += part[pos:pos + take]
                pos += take
                self.col += take
                self.broke = False
                if self.col >= LINE_BYTES:
                    out += b"\n"
                    self.col, self.broke = 0, True
        return bytes(out)

    def finish(self) -> bytes:
        """The newline a last unterminated line needs."""
        if not self.col:
            return b""
        self.col = 0
        return b"\n"


def frame_text(priority: int, raw: bytes) -> bytes:
    """One formatted line (may hold newlines: each becomes an entry with the same priority)."""
    framer = Framer(priority)
    return framer.feed(raw + b"\n")
