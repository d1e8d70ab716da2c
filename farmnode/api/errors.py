"""Every error the API returns is JSON `{"error": message, ...}` with the right status."""

from __future__ import annotations

import re
from typing import Any

import falcon

from farmnode.bus.interface import rejected_task_ids


class ApiError(falcon.HTTPError):
    """An error response; `extra` keys sit beside "error" (PyFarm's rejected_task_ids, ...)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None,
                 **extra: Any) -> None:
        super().__init__(falcon.code_to_http_status(status), description=message,
                         headers=headers)
        self.message = message
        self.extra = extra

    def to_dict(self, obj_type: type = dict) -> dict[str, Any]:
        return {"error": self.message, **self.extra}


def body_of(error: falcon.HTTPError) -> dict[str, Any]:
    """The JSON body for any falcon error (ours, or falcon's own 404/405/...)."""
    if isinstance(error, ApiError):
        return error.to_dict()
    message = error.description or error.title or "error"
    return {"error": str(message)}


_RESOURCES = re.compile(r"Not enough (\w+): agent_\1=(\S+) requires_\1=(\S+)")


def _number(text: str) -> float | int:
    value = float(text)
    return int(value) if value.is_integer() else value


def from_dbus(exc: Exception) -> ApiError:
    """Map an error from org.farmnode.Agent1 (or the bus) to PyFarm's status codes."""
    name = str(getattr(exc, "dbus_error_name", ""))
    message = str(exc.args[0]) if exc.args else str(exc)
    short = name.rsplit(".", 1)[-1]
    if short == "InvalidAssignment":
        field = message.split(":", 1)[0] if ":" in message else None
        return ApiError(400, message, field=field)
    if short == "PartialOverlap":
        return ApiError(409, "Partial overlap of tasks",
                        rejected_task_ids=rejected_task_ids(message))
    if short == "NotEnoughResources":
        m = _RESOURCES.search(message)
        if m:
            what = m.group(1)
            extra: dict[str, Any] = {f"agent_{what}": _number(m.group(2)),
                                     f"requires_{what}": _number(m.group(3))}
            return ApiError(400, f"Not enough {what}", None, **extra)
        return ApiError(400, message)
    if short == "NotAccepting":
        return ApiError(503, message)
    if short == "UnknownTask":
        return ApiError(404, message)
    if short == "InvalidArgument":
        return ApiError(400, message)
    if short in ("ServiceUnknown", "NameHasNoOwner", "NoReply", "Disconnected", "Timeout",
                 "UnknownObject", "NoServer"):
        return ApiError(503, f"the farmnode agent is not reachable: {message}")
    if short == "AccessDenied":
        # The API runs in group farmnode; this means the installation is broken.
        return ApiError(500, f"the bus policy refused the API's call: {message}")
    return ApiError(502, f"the agent failed: {message}")
