"""How a value that failed a check is named in an error message, for every reader of input
(the config, assignments, job files, webhooks) alike.

Standard library only and outside every package, as farmnode.pathmap: the config model and
the assignment schema both use it, and the schema is imported inside a task's scope, where
pulling in the whole config package would cost its start-up time.
"""

from __future__ import annotations

from collections.abc import Mapping

_SHOWN = 60  # characters of a string quoted in full; a longer one is cut


def describe(value: object, mapping: str = "a mapping") -> str:
    """`value` as its author would recognise it: null, true/false, a number or a (shortened)
    quoted string as written, else what kind of thing it is. `mapping` is the input format's
    own word for a mapping ("an object" in JSON and in job files)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value if len(value) <= _SHOWN else value[:_SHOWN - 3] + "...")
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Mapping):
        return mapping
    if isinstance(value, list | tuple):
        return "a list"
    return f"a {type(value).__name__}"
