"""The Falcon WSGI app: routes, the guard (auth, 415, 406), JSON errors.

gunicorn loads `farmnode.api.app:create_app()` (see farmnode-api.service and
farmnode.api.gunicorn_conf). ROUTES is the one list of paths: the OpenAPI document must name
exactly these (tests/test_api_pure.py checks).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import falcon

from farmnode.api import client, settings, trusted
from farmnode.api import resources as r
from farmnode.api.auth import CHALLENGE, accepted, parse_authorization
from farmnode.api.errors import ApiError, body_of
from farmnode.api.events import Events
from farmnode.api.http import JSON, check_accept, check_content_type, dumps
from farmnode.api.page import Page, Static

log = logging.getLogger("farmnode.api")

# (path as documented, resource). PyFarm's master writes /api/v1/tasks/ with the slash; the
# app strips trailing slashes, so both spellings reach the same resource.
ROUTES: list[tuple[str, r.Resource]] = [
    ("/api/versions", r.Versions()),
    ("/api/v1/assign", r.Assign()),
    ("/api/v1/tasks/", r.Tasks()),
    ("/api/v1/tasks/{task_id}", r.Task()),
    ("/api/v1/tasks/{task_id}/stats", r.TaskStats()),
    ("/api/v1/tasks/{task_id}/signal", r.TaskSignal()),
    ("/api/v1/status", r.Status()),
    ("/api/v1/stop", r.Stop()),
    ("/api/v1/restart", r.Restart()),
    ("/api/v1/update", r.Update()),
    ("/api/v1/config", r.Config()),
    ("/api/v1/task_logs/{identifier}", r.TaskLogs()),
    ("/api/v1/events", Events()),
    ("/api/v1/openapi.json", r.OpenApi()),
    ("/metrics", r.Metrics()),
    # The status page and its own stylesheet and script (farmnode.api.page).
    ("/", Page()),
    ("/static/{name}", Static()),
]

HTTP_METHODS = ("get", "post", "put", "patch", "delete")
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
TASK_LOGS = "/api/v1/task_logs/"


def methods_of(resource: object) -> list[str]:
    return [m for m in HTTP_METHODS if callable(getattr(resource, f"on_{m}", None))]


MASTER_USER_AGENT = "PyFarm/1.0 (master)"
MASTER_CONTACT_EVERY = 5.0  # seconds: one D-Bus note per burst of master requests


class Guard:
    """Before any responder: credentials (401, nothing runs), then PyFarm's 415 and 406."""

    last_master_note = 0.0

    def _note_master(self, req: falcon.Request, authenticated: bool) -> None:
        # PyFarm counts "last master contact" from requests with the master's User-Agent; the
        # agent's reannounce timer relies on it (a master that polls us has heard from us).
        # Anyone can send that header: only a request from a trusted master's address or
        # with accepted credentials counts, so a stranger cannot hold off the reannounce.
        if req.user_agent != MASTER_USER_AGENT:
            return
        now = time.monotonic()
        if now - Guard.last_master_note < MASTER_CONTACT_EVERY:
            return
        if not (authenticated or trusted.trusted(req.remote_addr)
                or self._credentials_accepted(req, settings.current())):
            return
        Guard.last_master_note = now
        try:
            client.call(lambda agent: agent.note_master_contact())
        except Exception as exc:  # the agent being away must not fail the master's request
            log.debug("could not note the master's contact: %s", exc)

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        # A separator in a log identifier arrives decoded (%2F) and would route nowhere;
        # PyFarm answers 400 for it, so do we, before routing.
        if req.path.startswith(TASK_LOGS):
            rest = req.path[len(TASK_LOGS):].rstrip("/")
            if "/" in rest or "\\" in rest:
                raise ApiError(400, "log_identifier must not contain directory separators")

    def process_resource(self, req: falcon.Request, resp: falcon.Response,
                         resource: Any, params: dict[str, Any]) -> None:
        if resource is None or not callable(getattr(resource, f"on_{req.method.lower()}",
                                                    None)):
            return  # 404 / 405 from falcon
        req.context.authenticated = False
        if not resource.public:
            s = settings.current()
            if s.error:
                raise ApiError(503, s.error)
            if (req.method in MUTATING or s.read_requires_auth
                    or (resource.output and s.output_requires_auth)) \
                    and not (getattr(resource, "pyfarm", False)
                             and trusted.trusted(req.remote_addr)):
                self._authenticate(req, s)
                req.context.authenticated = True
            elif req.get_header("Authorization"):  # counted as theirs where it matters
                req.context.authenticated = accepted(
                    parse_authorization(req.get_header("Authorization")), s.username,
                    s.password, s.tokens)
        self._note_master(req, req.context.authenticated)
        check_content_type(req, resource.consumes)
        check_accept(req, resource.produces)

    @staticmethod
    def _credentials_accepted(req: falcon.Request, s: settings.ApiSettings) -> bool:
        return s.error is None and accepted(parse_authorization(req.get_header("Authorization")),
                                            s.username, s.password, s.tokens)

    @staticmethod
    def _authenticate(req: falcon.Request, s: settings.ApiSettings) -> None:
        # Closed after the answer: a client without credentials keeps nothing open here.
        headers = {"WWW-Authenticate": CHALLENGE, "Connection": "close"}
        if not s.has_credentials:
            raise ApiError(401, "no API credentials are configured on this node: set "
                                "agent_api_username and agent_api_password, or add a token "
                                "to agent_api_tokens_file", headers=headers)
        creds = parse_authorization(req.get_header("Authorization"))
        if not accepted(creds, s.username, s.password, s.tokens):
            raise ApiError(401, "missing or wrong credentials", headers=headers)


def _serialize_error(req: falcon.Request, resp: falcon.Response,
                     error: falcon.HTTPError) -> None:
    resp.content_type = JSON
    resp.text = dumps(body_of(error))


def _unexpected(req: falcon.Request, resp: falcon.Response, exc: Exception,
                params: dict[str, Any]) -> None:
    log.exception("%s %s failed", req.method, req.path)
    raise ApiError(500, f"internal error: {type(exc).__name__}")


def create_app() -> falcon.App[falcon.Request, falcon.Response]:
    app = falcon.App(middleware=[Guard()])
    app.req_options.strip_url_path_trailing_slash = True
    app.set_error_serializer(_serialize_error)
    app.add_error_handler(Exception, _unexpected)
    for path, resource in ROUTES:
        app.add_route(path.rstrip("/") if path != "/" else path, resource)
    return app
