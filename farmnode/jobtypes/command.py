"""The ``command`` job type: run an argv template from ``job.data``, no shell, no progress parsing.

Owns: CommandJobType and the placeholder templating it uses (render_template).
May import: farmnode.tasks.model and farmnode.config only (and this package's base).

``job.data``::

    {"command": ["prog", "--frame", "{frame:04d}"],  # required argv template
     "cwd": "/path", "env": {"K": "V"}, "success_codes": [0, 1]}  # optional

Placeholders: {frame} {start} {end} {by} {tile} {job} {assignment}, each optionally with a
small numeric format spec ({frame:04d}, {frame:.2f}). Attribute and index access, conversions
and nested fields are refused: format strings come from whoever submits jobs, and str.format's
``{x.__class__...}`` walks objects inside the root agent.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from farmnode.jobtypes.base import CommandData, ExitStatus, JobType

# Fill/align, sign, zero, width up to 2 digits, precision up to 2 digits, a numeric or string
# type. Bounded widths keep "{frame:999999999}" from allocating gigabytes in the agent.
_SPEC_RE = re.compile(r"(?:.?[<>=^])?[+\- ]?0?\d{0,2}(?:\.\d{1,2})?[dfFgGeEs]?", re.ASCII)

_DATA_KEYS = frozenset({"command", "cwd", "env", "success_codes"})


def _number(value: float) -> int | float:
    # Integral frames become ints so "{frame}" renders "1", not "1.0", and "{frame:04d}" works.
    return int(value) if math.isfinite(value) and float(value).is_integer() else value


def render_template(
    template: str, values: Mapping[str, Callable[[], Any]], where: str = "template"
) -> str:
    """Substitute ``{name}``/``{name:spec}`` from ``values`` (lazily evaluated) in ``template``.

    Raises ValueError naming ``where`` and the placeholder for anything but a plain known name.
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"{where}: {exc} in {template!r}") from None
    out: list[str] = []
    for literal, field_name, spec, conversion in parsed:
        out.append(literal)
        if field_name is None:
            continue
        shown = "{" + field_name + ("!" + conversion if conversion else "")
        shown += (":" + spec if spec else "") + "}"
        if field_name == "" or not field_name.isidentifier():
            raise ValueError(
                f"{where}: placeholder {shown} is not allowed "
                f"(attribute/index access and positional fields are refused)"
            )
        if field_name not in values:
            known = ", ".join("{" + n + "}" for n in values)
            raise ValueError(f"{where}: unknown placeholder {shown} (known: {known})")
        if conversion:
            raise ValueError(f"{where}: conversion in placeholder {shown} is not allowed")
        if spec and ("{" in spec or not _SPEC_RE.fullmatch(spec)):
            raise ValueError(f"{where}: format spec in placeholder {shown} is not allowed")
        value = values[field_name]()
        try:
            out.append(format(value, spec or ""))
        except ValueError as exc:
            raise ValueError(f"{where}: placeholder {shown}: {exc}") from None
    return "".join(out)


def _str_list(value: object, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where} must be a list of strings")
    return value


class CommandJobType(JobType):
    """Runs ``job.data.command`` once per assignment; success is an exit code in success_codes."""

    name: ClassVar[str] = "command"

    def _placeholder_values(self) -> dict[str, Callable[[], Any]]:
        def frame() -> int | float:
            frames = self.frames
            if len(frames) != 1:
                raise ValueError(
                    "{frame} needs an assignment of one frame, this one has "
                    f"{len(frames)}; use {{start}} {{end}} {{by}}"
                )
            return _number(frames[0])

        def tile() -> int:
            tiles = {t.tile for t in self.tasks}
            if len(tiles) != 1 or None in tiles:
                raise ValueError("{tile} needs every task of the assignment to have one tile")
            (only,) = tiles
            assert only is not None
            return only

        return {
            "frame": frame,
            "start": lambda: _number(self.start),
            "end": lambda: _number(self.end),
            "by": lambda: _number(self.by),
            "tile": tile,
            "job": lambda: self.job.id,
            "assignment": lambda: self.assignment.id,
        }

    def get_command_data(self) -> CommandData:
        data = self.checked_data(_DATA_KEYS)
        if "command" not in data:
            raise ValueError("job.data.command is required (a list: program, arguments...)")
        template = _str_list(data["command"], "job.data.command")
        if not template or not template[0]:
            raise ValueError("job.data.command must start with a non-empty program")

        env = data.get("env", {})
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()
        ):
            raise ValueError("job.data.env must be an object of string to string")

        values = self._placeholder_values()
        argv: list[str] = []
        for i, arg in enumerate(template):
            where = f"job.data.command[{i}]"
            try:
                rendered = render_template(arg, values, where)
            except ValueError as exc:
                msg = str(exc)
                raise ValueError(msg if msg.startswith(where) else f"{where}: {msg}") from None
            # Templating first, then variables: an environment value can then never smuggle in
            # a placeholder. job.data.env is part of the process environment, so it expands too.
            argv.append(self.map_path(rendered, env) if i == 0 else self.expandvars(rendered, env))

        cwd = data.get("cwd")
        if cwd is not None:
            if not isinstance(cwd, str) or not cwd:
                raise ValueError("job.data.cwd must be a non-empty string")
            cwd = self.map_path(cwd, env)

        self.success_codes  # noqa: B018 - validate before anything is spawned
        try:
            return self.make_command_data(argv[0], argv[1:], cwd=cwd, env=env)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"job.data: {exc}") from None

    @property
    def success_codes(self) -> frozenset[int]:
        codes = self.job.data.get("success_codes", [0])
        if (
            not isinstance(codes, list)
            or not codes
            or not all(isinstance(c, int) and not isinstance(c, bool) for c in codes)
            or not all(0 <= c <= 255 for c in codes)
        ):
            raise ValueError("job.data.success_codes must be a non-empty list of ints 0..255")
        return frozenset(codes)

    def is_successful(self, status: ExitStatus) -> bool:
        return status.code is not None and status.code in self.success_codes
