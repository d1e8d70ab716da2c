"""Core refusals → org.farmnode.Agent1 errors: the one place they are mapped.

A refusal becomes the DbusFailedError subclass of its kind (sdbus maps it by its
dbus_error_name on both sides), and its structured detail a{sv} (the rejected task ids, the
resource and its figures, the field) for the calls that return it typed (TryAssign), so no
client reads the message text.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from sdbus.dbus_exceptions import DbusFailedError

from farmnode.agent import core
from farmnode.bus.interface import (
    InvalidArgumentError,
    InvalidAssignmentError,
    NotAcceptingError,
    NotEnoughResourcesError,
    PartialOverlapError,
    UnknownTaskError,
)

T = TypeVar("T")
Detail = dict[str, tuple[str, Any]]

_ERRORS: list[tuple[type[core.AgentError], type[DbusFailedError]]] = [
    (core.InvalidAssignment, InvalidAssignmentError),
    (core.PartialOverlap, PartialOverlapError),
    (core.NotEnoughResources, NotEnoughResourcesError),
    (core.NotAccepting, NotAcceptingError),
    (core.UnknownTask, UnknownTaskError),
    (core.InvalidArgument, InvalidArgumentError),
]


def error_class(exc: core.AgentError) -> type[DbusFailedError]:
    for ours, theirs in _ERRORS:
        if isinstance(exc, ours):
            return theirs
    return InvalidArgumentError


def detail(exc: core.AgentError) -> Detail:
    """What a client needs besides the error's name, typed."""
    if isinstance(exc, core.PartialOverlap):
        return {"rejected_task_ids": ("ax", list(exc.rejected_task_ids))}
    if isinstance(exc, core.NotEnoughResources):
        return {"resource": ("s", exc.what), "available": ("d", float(exc.available)),
                "required": ("d", float(exc.required))}
    if isinstance(exc, core.InvalidAssignment) and exc.field:
        return {"field": ("s", exc.field)}
    return {}


async def translated(call: Callable[[], Awaitable[T]]) -> T:
    try:
        return await call()
    except core.AgentError as exc:
        raise error_class(exc)(str(exc)) from None
