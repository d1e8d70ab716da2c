"""``pyfarm.jobtypes.core.process``: the handle a job type gets for its running process.

PyFarm's ProcessProtocol wrapped a Twisted process; here it wraps the `subprocess.Popen` the
host started, with the documented attributes and controls.
"""

from __future__ import annotations

import os
import signal
import subprocess
import uuid as uuidlib
from collections.abc import MutableMapping
from types import TracebackType
from typing import Any


class ReplaceEnvironment:
    """Swap an environment mapping's contents (default: os.environ) for the with-block."""

    def __init__(self, frozen_environment: dict[str, str],
                 environment: MutableMapping[str, str] | None = None) -> None:
        self.frozen_environment = dict(frozen_environment)
        self.environment: MutableMapping[str, str] = (
            os.environ if environment is None else environment)
        self.original: dict[str, str] = {}

    def __enter__(self) -> ReplaceEnvironment:
        self.original = dict(self.environment)
        self.environment.clear()
        self.environment.update(self.frozen_environment)
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.environment.clear()
        self.environment.update(self.original)


class ProcessProtocol:
    """The job type's view of its one process."""

    def __init__(self, jobtype: Any) -> None:
        self.jobtype = jobtype
        self.uuid = uuidlib.uuid4()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def psutil_process(self) -> Any:
        import psutil

        return psutil.Process(self.pid) if self.pid is not None else None

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _signal(self, signum: int) -> None:
        if self.running():
            assert self.process is not None
            self.process.send_signal(signum)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def interrupt(self) -> None:
        self._signal(signal.SIGINT)

    # Twisted's callbacks, which the host's loop stands in for; kept so overrides that call
    # super() do not fail.
    def connectionMade(self) -> None:
        pass

    def processEnded(self, reason: Any) -> None:
        pass

    def outReceived(self, data: bytes) -> None:
        pass

    def errReceived(self, data: bytes) -> None:
        pass


def pump(proc: subprocess.Popen[bytes], on_output: Any, max_line: int = 64 * 1024) -> None:
    """Read the process's stdout and stderr to their end, in arrival order.

    ``on_output(stream, text)`` gets decoded text (0 stdout, 1 stderr) as it comes, not split
    into lines; UTF-8 sequences cut by a read are joined, undecodable bytes replaced.
    """
    import codecs
    import selectors

    assert proc.stdout is not None and proc.stderr is not None
    sel = selectors.DefaultSelector()
    decoders = {0: codecs.getincrementaldecoder("utf-8")("replace"),
                1: codecs.getincrementaldecoder("utf-8")("replace")}
    sel.register(proc.stdout, selectors.EVENT_READ, 0)
    sel.register(proc.stderr, selectors.EVENT_READ, 1)
    while sel.get_map():
        for key, _ in sel.select():
            stream = int(key.data)
            chunk = os.read(key.fd, max_line)
            if not chunk:
                sel.unregister(key.fileobj)
                tail = decoders[stream].decode(b"", final=True)
                if tail:
                    on_output(stream, tail)
                continue
            text = decoders[stream].decode(chunk)
            if text:
                on_output(stream, text)
    sel.close()


class LineSplitter:
    """Whole lines from text chunks; a line longer than ``max_line`` is cut there."""

    def __init__(self, max_line: int = 16 * 1024) -> None:
        self.max_line = max_line
        self.pending = ""

    def feed(self, text: str) -> list[str]:
        *lines, self.pending = (self.pending + text).split("\n")
        while len(self.pending) > self.max_line:
            lines.append(self.pending[:self.max_line])
            self.pending = self.pending[self.max_line:]
        out: list[str] = []
        for line in lines:
            line = line.rstrip("\r")
            while len(line) > self.max_line:
                out.append(line[:self.max_line])
                line = line[self.max_line:]
            out.append(line)
        return out

    def close(self) -> list[str]:
        rest, self.pending = self.pending, ""
        return [rest.rstrip("\r")] if rest else []
