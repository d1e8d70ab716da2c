"""Host tests of request bodies as the API reads them: sized by Content-Length or chunked,
bounded in size, time and nesting; every bad shape is a 4xx that says what is wrong."""

from __future__ import annotations

import io
import json
from typing import Any

import falcon
import falcon.testing
import pytest

from farmnode.api.errors import ApiError
from farmnode.api.http import MAX_BODY, MAX_DEPTH, depth_error, read_json


def request(body: bytes, *, chunked: bool = False) -> falcon.Request:
    env = falcon.testing.create_environ(method="POST", path="/api/v1/assign", body=body,
                                        headers={"Content-Type": "application/json"})
    if chunked:  # as gunicorn hands over a chunked body: decoded, no CONTENT_LENGTH
        env.pop("CONTENT_LENGTH", None)
        env["HTTP_TRANSFER_ENCODING"] = "chunked"
        env["wsgi.input"] = io.BytesIO(body)
    return falcon.Request(env)


def status_of(req: falcon.Request) -> tuple[int, str]:
    with pytest.raises(ApiError) as info:
        read_json(req, required=True)
    return int(info.value.status_code), info.value.message


def nested(depth: int, key: str = "a") -> Any:
    value: Any = {}
    for _ in range(depth - 1):
        value = {key: value}
    return value


def test_a_chunked_body_is_read() -> None:
    body = {"job": {"id": 1}, "tasks": list(range(1000))}
    assert read_json(request(json.dumps(body).encode(), chunked=True), required=True) == body
    assert status_of(request(b"", chunked=True)) == (400, "No data provided")
    code, message = status_of(request(b"x" * (MAX_BODY + 1), chunked=True))
    assert code == 413 and "too large" in message


def test_a_body_sized_by_content_length() -> None:
    assert read_json(request(b'{"a": [1, 2]}'), required=True) == {"a": [1, 2]}
    assert read_json(request(b""), required=False) is None
    assert status_of(request(b'{"a": '))[0] == 400


def test_nesting_is_bounded_with_the_place_named() -> None:
    assert depth_error(nested(MAX_DEPTH)) is None
    assert depth_error(nested(MAX_DEPTH + 1)) == ".".join(["a"] * MAX_DEPTH)
    assert depth_error({"job": {"data": [[{"x": nested(10)}]]}}, limit=5) == \
        "job.data[0][0].x"
    assert depth_error([1, "two", None]) is None and depth_error(3) is None
    long_key = "k" * 10_000
    where = depth_error(nested(MAX_DEPTH + 1, long_key))
    assert where is not None and len(where) <= 200  # the message stays readable
    code, message = status_of(request(json.dumps({"job": {"data": nested(600)}}).encode()))
    assert code == 400 and message.startswith("job.data.a.a")
    assert f"nested more than {MAX_DEPTH} levels deep" in message


def test_brackets_beyond_the_decoders_limit_are_a_400() -> None:
    code, message = status_of(request(b"[" * 100_000))
    assert code == 400 and "nested" in message
    code, message = status_of(request(b"[" * 100_000, chunked=True))
    assert code == 400 and "nested" in message
