"""A WSGI app for the worker's host tests: answers `<path> <body length>`."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ["PATH_INFO"]
    body = environ["wsgi.input"].read()
    answer = f"{path} {len(body)}".encode()
    headers = [("Content-Type", "text/plain"), ("Content-Length", str(len(answer)))]
    if path == "/close":
        headers.append(("Connection", "close"))
    start_response("200 OK", headers)
    return [answer]
