"""Jinja pre-processing of a job file, keeping track of which source line each output
line came from.

The template runs in Jinja's immutable sandbox with StrictUndefined: a job file is data, so
it may not call methods that change objects or reach Python internals, and a misspelt
variable is an error, not an empty string. Output is capped (a loop can make a file of any
size) and no template can include or import another (there is no loader).

Line numbers survive the rendering: before rendering, every newline that belongs to the
template's text (not to a tag) gets a marker naming its source line; after rendering the
markers are taken out and remembered per output line. A macro's lines thus point at the
macro's body, where the text that went wrong was written.
"""

from __future__ import annotations

import re
import traceback
from collections.abc import Mapping
from dataclasses import dataclass

import jinja2
import jinja2.sandbox
from jinja2 import lexer

MAX_OUTPUT = 16 * 1024 * 1024  # characters of rendered YAML
# Control characters (refused by YAML itself), so no job file can contain one by accident.
_MARK_OPEN, _MARK_CLOSE = "\x1e", "\x1f"
_MARK = re.compile(f"{_MARK_OPEN}([0-9]+){_MARK_CLOSE}")


class RenderError(ValueError):
    """The template is wrong; `line` is the source line where Jinja found it (if known)."""

    def __init__(self, name: str, line: int | None, message: str) -> None:
        super().__init__(name, line, message)
        self.name, self.line, self.message = name, line, message

    def __str__(self) -> str:
        where = f"{self.name}:{self.line}" if self.line is not None else self.name
        return f"{where}: {self.message}"


@dataclass(frozen=True)
class Rendered:
    """The YAML text and, for each of its lines (0-based), the source line (1-based)."""

    text: str
    source_lines: tuple[int, ...]

    def source_line(self, output_line: int) -> int | None:
        """The source line of a 0-based output line."""
        if 0 <= output_line < len(self.source_lines):
            return self.source_lines[output_line]
        return self.source_lines[-1] if self.source_lines else None


def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    return jinja2.sandbox.ImmutableSandboxedEnvironment(
        undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True,
        loader=None)


def _marked(env: jinja2.Environment, source: str, name: str) -> str:
    """The source with a marker before every newline of template text."""
    try:
        tokens = list(env.lex(source, name))
    except jinja2.TemplateSyntaxError as exc:
        raise RenderError(name, exc.lineno, f"Jinja syntax error: {exc.message}") from None
    # A data token starting on line L with k newlines ends lines L .. L+k-1; newlines inside
    # tags and comments are not text and get no marker (it would break the tag).
    text_ends: set[int] = set()
    for lineno, kind, value in tokens:
        if kind == lexer.TOKEN_DATA:
            text_ends.update(range(lineno, lineno + value.count("\n")))
    lines = source.split("\n")
    return "\n".join(f"{text}{_MARK_OPEN}{n}{_MARK_CLOSE}" if n in text_ends else text
                     for n, text in enumerate(lines, start=1))


def _template_line(exc: BaseException, name: str) -> int | None:
    # Jinja rewrites tracebacks so that template frames carry the template's name and line.
    lines = [f.lineno for f in traceback.extract_tb(exc.__traceback__) if f.filename == name]
    return lines[-1] if lines else getattr(exc, "lineno", None)


def render(source: str, name: str, variables: Mapping[str, object] | None = None) -> Rendered:
    """Render `source` (a job file named `name`) with `variables`; raises RenderError."""
    if _MARK_OPEN in source or _MARK_CLOSE in source:
        line = source[:max(source.find(_MARK_OPEN), source.find(_MARK_CLOSE))].count("\n") + 1
        raise RenderError(name, line, "control character in the file")
    env = _environment()
    marked = _marked(env, source, name)
    try:
        # Compiled under the file's name, so tracebacks (and _template_line) name it.
        code = env.compile(marked, name=name, filename=name)
    except jinja2.TemplateSyntaxError as exc:
        raise RenderError(name, exc.lineno, f"Jinja syntax error: {exc.message}") from None
    template = env.template_class.from_code(env, code, env.make_globals(None))
    chunks: list[str] = []
    size = 0
    try:
        for chunk in template.generate(**dict(variables or {})):
            size += len(chunk)
            if size > MAX_OUTPUT:
                raise RenderError(name, None, f"renders to more than {MAX_OUTPUT} characters")
            chunks.append(chunk)
    except RenderError:
        raise
    except jinja2.UndefinedError as exc:
        raise RenderError(name, _template_line(exc, name), f"Jinja: {exc.message}") from None
    except jinja2.TemplateError as exc:
        raise RenderError(name, _template_line(exc, name),
                          f"Jinja: {exc.message or type(exc).__name__}") from None
    except Exception as exc:  # an expression that raises (1/0, int('x')) is the file's fault
        raise RenderError(name, _template_line(exc, name),
                          f"Jinja: {type(exc).__name__}: {exc}") from None
    lines: list[int] = []
    text: list[str] = []
    last = 1
    for out_line in "".join(chunks).split("\n"):
        found = _MARK.findall(out_line)
        if found:
            last = int(found[0])
        lines.append(last)
        text.append(_MARK.sub("", out_line))
    return Rendered("\n".join(text), tuple(lines))
