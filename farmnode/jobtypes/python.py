"""The ``python`` job type: Python commands run in one warm interpreter per job on the node.

Owns: PythonJobType. The interpreter is started once for the job (farmnode.warm) and reused by
its next assignments here, so what the setup imports or loads is paid for once.

``job.data``::

    {"commands": ["render(frame)"],           # required: Python source, run once per frame
     "setup": ["import heavy", "scene = heavy.load('/shots/010')"],   # once per process
     "teardown": ["scene.close()"],           # once, before the process leaves
     "interpreter": ["python3"],              # the program (and its options) to run
     "idle_timeout": 300,                     # seconds without a task before it leaves
     "last_frame": 240,                       # the job's last frame: leave after it
     "cwd": "/shots/010", "env": {"K": "V"}}

Each frame's commands see ``frame``, ``task``, ``job`` and ``assignment`` as globals; the
namespace is the process's, so names the setup or a previous task defined are there. A
command that raises fails the task with its exception; the traceback is in the task's log.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from farmnode.warm.jobtype import DEFAULT_IDLE_TIMEOUT, EXECUTOR_PATH, WarmJobType, WarmProcess

_DATA_KEYS = frozenset({"commands", "setup", "teardown", "interpreter", "idle_timeout",
                        "last_frame", "cwd", "env"})


def _source_list(data: dict[str, Any], key: str, required: bool = False) -> list[str]:
    value = data.get(key)
    if value is None:
        if required:
            raise ValueError(f"job.data.{key}: required (Python source: a string or a list "
                             "of strings)")
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"job.data.{key}: must be a string or a list of strings")
    for i, code in enumerate(value):
        try:
            compile(code, f"job.data.{key}[{i}]", "exec")
        except SyntaxError as exc:
            raise ValueError(f"job.data.{key}[{i}]: line {exc.lineno}: {exc.msg}") from None
    return list(value)


def _number(data: dict[str, Any], key: str) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or \
            not math.isfinite(value):
        raise ValueError(f"job.data.{key}: must be a number")
    return float(value)


class PythonJobType(WarmJobType):
    name: ClassVar[str] = "python"

    def _data(self) -> dict[str, Any]:
        return self.checked_data(_DATA_KEYS)

    def commands(self) -> list[str]:
        return _source_list(self._data(), "commands", required=True)

    def warm_process(self) -> WarmProcess:
        data = self._data()
        self.commands()  # refused before anything starts
        interpreter = data.get("interpreter", ["python3"])
        if isinstance(interpreter, str):
            interpreter = [interpreter]
        if not isinstance(interpreter, list) or not interpreter or \
                not all(isinstance(a, str) and a for a in interpreter):
            raise ValueError("job.data.interpreter: must be a program (a string) or a "
                             "non-empty list of strings")
        env = data.get("env") or {}
        if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                for k, v in env.items()):
            raise ValueError("job.data.env: must be an object of strings")
        cwd = data.get("cwd")
        if cwd is not None and (not isinstance(cwd, str) or not cwd.startswith("/")):
            raise ValueError("job.data.cwd: must be an absolute path")
        idle = _number(data, "idle_timeout")
        if idle is not None and idle <= 0:
            raise ValueError("job.data.idle_timeout: must be a positive number of seconds")
        return WarmProcess(
            argv=(*[self.expandvars(a) for a in interpreter], EXECUTOR_PATH),
            setup=tuple(_source_list(data, "setup")),
            teardown=tuple(_source_list(data, "teardown")),
            env={**self.get_environment(), **env},
            cwd=cwd,
            idle_timeout=idle if idle is not None else DEFAULT_IDLE_TIMEOUT,
            last_frame=_number(data, "last_frame"),
        )
