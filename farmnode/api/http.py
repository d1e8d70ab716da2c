"""Request and response plumbing shared by every resource: PyFarm's content rules (415/406),
body limits, JSON bodies and responses (pretty or compact as agent_pretty_json says).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

import falcon
from gunicorn.http.errors import ParseException

from farmnode.api import settings
from farmnode.api.errors import ApiError

JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"
# An assignment with thousands of tasks and job data is well under this; anything bigger is
# refused before it is read.
MAX_BODY = 4 * 1024 * 1024
# Nesting of a JSON body: far above any assignment's (job.data may nest 32 levels) and far
# below what Python's recursion limit lets the agent walk.
MAX_DEPTH = 64
# A body must have arrived this long after its head (each read also has the socket's own
# timeout, farmnode.api.worker): a client trickling bytes would hold a thread.
BODY_TIMEOUT = 60.0
READ_CHUNK = 64 * 1024
CLOSE = {"Connection": "close"}


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


def _path(chain: tuple[Any, ...] | None) -> str:
    keys: list[str] = []
    while chain is not None:
        chain, key = chain
        keys.append(f"[{key}]" if isinstance(key, int) else f".{key[:40]}")
    text = "".join(reversed(keys)).lstrip(".")
    return text if len(text) <= 200 else "..." + text[-197:]


def depth_error(value: Any, limit: int = MAX_DEPTH) -> str | None:
    """Where a decoded JSON value nests more than `limit` arrays and objects deep (a path like
    job.data.a[0]), or None. Iterative: the value may be as deep as the decoder allowed."""
    stack: list[tuple[Any, int, tuple[Any, ...] | None]] = [(value, 1, None)]
    while stack:
        node, depth, chain = stack.pop()
        children: Iterable[tuple[str | int, Any]]
        if isinstance(node, dict):
            children = node.items()
        elif isinstance(node, list):
            children = enumerate(node)
        else:
            continue
        if depth > limit:
            return _path(chain) or "the body"
        for key, child in children:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1, (chain, key)))
    return None


def read_body(req: falcon.Request) -> bytes:
    """The request body, at most MAX_BODY bytes, sized by Content-Length or chunked."""
    length = req.content_length
    if length is not None and length > MAX_BODY:
        raise ApiError(413, f"request body too large: {length} bytes, at most {MAX_BODY}",
                       headers=CLOSE)
    # Falcon's bounded_stream reads nothing without a Content-Length; a chunked body comes
    # from the stream itself (gunicorn decodes the chunks and ends it where the body ends).
    stream = req.bounded_stream if length is not None else req.stream
    deadline = time.monotonic() + BODY_TIMEOUT
    chunks: list[bytes] = []
    size = 0
    try:
        while size <= MAX_BODY:
            chunk = stream.read(min(READ_CHUNK, MAX_BODY + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if time.monotonic() > deadline:
                raise TimeoutError
    except TimeoutError:  # ours, or the socket's
        raise ApiError(408, f"the request body did not arrive within {BODY_TIMEOUT:g}s",
                       headers=CLOSE) from None
    except OSError:  # gunicorn's NoMoreData among them
        raise ApiError(400, "the request body ended early", headers=CLOSE) from None
    except ParseException as exc:  # a malformed chunked encoding
        raise ApiError(400, f"malformed request body: {exc}", headers=CLOSE) from None
    if size > MAX_BODY:
        raise ApiError(413, f"request body too large: more than {MAX_BODY} bytes",
                       headers=CLOSE)
    return b"".join(chunks)


def read_json(req: falcon.Request, *, required: bool) -> Any:
    """The request body as JSON; None for no body when not `required`."""
    raw = read_body(req)
    if not raw.strip():
        if required:
            raise ApiError(400, "No data provided")
        return None
    try:
        value = json.loads(raw)
    except UnicodeDecodeError:
        raise ApiError(400, "Failed to decode json data: not UTF-8") from None
    except RecursionError:
        raise ApiError(400, f"Failed to decode json data: nested more than {MAX_DEPTH} "
                            "levels deep") from None
    except ValueError as exc:
        raise ApiError(400, f"Failed to decode json data: {exc}") from None
    where = depth_error(value)
    if where is not None:
        raise ApiError(400, f"{where}: nested more than {MAX_DEPTH} levels deep")
    return value


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
