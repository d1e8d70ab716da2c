"""Request and response plumbing shared by every resource: PyFarm's content rules (415/406),
body limits, JSON bodies and responses (pretty or compact as agent_pretty_json says).
"""

from __future__ import annotations

import json
from typing import Any

import falcon

from farmnode.api import settings
from farmnode.api.errors import ApiError

JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"
# An assignment with thousands of tasks and job data is well under this; anything bigger is
# refused before it is read.
MAX_BODY = 4 * 1024 * 1024


def media_type(header: str | None) -> str | None:
    if not header:
        return None
    return header.split(";", 1)[0].strip().lower() or None


def check_content_type(req: falcon.Request, accepted: tuple[str, ...] = (JSON,)) -> None:
    """PyFarm: a body is JSON, or comes without Content-Type; anything else is 415."""
    kind = media_type(req.content_type)
    if kind is not None and kind not in accepted:
        raise ApiError(415, f"unsupported Content-Type {kind!r}: send {' or '.join(accepted)}")


def check_accept(req: falcon.Request, produces: tuple[str, ...]) -> None:
    """PyFarm: Accept absent, */* or application/json, else 406 (per route's media types)."""
    accept = req.get_header("Accept")
    if not accept:
        return
    try:
        ok = any(req.client_accepts(kind) for kind in produces)
    except ValueError:
        ok = False
    if not ok:
        raise ApiError(406, f"cannot produce any of {accept[:100]!r}: this resource serves "
                            f"{', '.join(produces)}")


def read_json(req: falcon.Request, *, required: bool) -> Any:
    """The request body as JSON; None for no body when not `required`."""
    length = req.content_length
    if length is not None and length > MAX_BODY:
        raise ApiError(413, f"request body too large: {length} bytes, at most {MAX_BODY}")
    raw = req.bounded_stream.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise ApiError(413, f"request body too large: more than {MAX_BODY} bytes")
    if not raw.strip():
        if required:
            raise ApiError(400, "No data provided")
        return None
    try:
        return json.loads(raw)
    except UnicodeDecodeError:
        raise ApiError(400, "Failed to decode json data: not UTF-8") from None
    except ValueError as exc:
        raise ApiError(400, f"Failed to decode json data: {exc}") from None


def dumps(obj: Any) -> str:
    if settings.current().pretty:
        return json.dumps(obj, indent=2, sort_keys=False) + "\n"
    return json.dumps(obj, separators=(",", ":"))


def send_json(resp: falcon.Response, obj: Any, status: int = 200) -> None:
    resp.status = falcon.code_to_http_status(status)
    resp.content_type = JSON
    resp.text = dumps(obj)


def object_body(req: falcon.Request, fields: dict[str, type]) -> dict[str, Any]:
    """A small optional JSON object body with known keys of known types (stop, restart,
    update, signal): unknown keys and wrong types are 400s that name the key."""
    body = read_json(req, required=False)
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    for key, value in body.items():
        if key not in fields:
            raise ApiError(400, f"{key}: unknown key (expected {', '.join(fields) or 'none'})",
                           field=key)
        kind = fields[key]
        if kind is bool and not isinstance(value, bool):
            raise ApiError(400, f"{key}: expected true or false", field=key)
        if kind is str and not isinstance(value, str):
            raise ApiError(400, f"{key}: expected a string", field=key)
    return body
