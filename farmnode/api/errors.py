"""Every error the API returns is JSON `{"error": message, ...}` with the right status."""

from __future__ import annotations

from typing import Any

import falcon


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


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


def from_refusal(name: str, message: str, detail: dict[str, Any]) -> ApiError:
    """PyFarm's answer to a refused assignment, from TryAssign's typed detail."""
    short = name.rsplit(".", 1)[-1]
    if short == "InvalidAssignment":
        return ApiError(400, message, field=detail.get("field"))
    if short == "PartialOverlap":
        return ApiError(409, "Partial overlap of tasks",
                        rejected_task_ids=list(detail.get("rejected_task_ids", [])))
    if short == "NotEnoughResources" and "resource" in detail:
        what = str(detail["resource"])
        return ApiError(400, f"Not enough {what}", None,
                        **{f"agent_{what}": _number(detail["available"]),
                           f"requires_{what}": _number(detail["required"])})
    return from_dbus_name(name, message)


def from_dbus(exc: Exception) -> ApiError:
    """Map an error from org.farmnode.Agent1 (or the bus) to PyFarm's status codes."""
    name = str(getattr(exc, "dbus_error_name", ""))
    message = str(exc.args[0]) if exc.args else str(exc)
    return from_dbus_name(name, message)


def from_dbus_name(name: str, message: str) -> ApiError:
    short = name.rsplit(".", 1)[-1]
    if short in ("InvalidAssignment", "PartialOverlap", "NotEnoughResources"):
        return ApiError(409 if short == "PartialOverlap" else 400, message)
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
