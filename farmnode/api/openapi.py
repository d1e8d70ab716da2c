"""The OpenAPI 3 document of the HTTP API, served at GET /api/v1/openapi.json.

Paths and methods must be exactly the app's routes (tests/test_api_pure.py checks), and
constraints are only those the code enforces: a fuzzer sending data that breaks one must get a
4xx, and data that keeps them all must never get a 5xx.
"""

from __future__ import annotations

import copy
from typing import Any

from farmnode import __version__
from farmnode.config.model import PATCHABLE_CONFIG_KEYS as EDITABLE_KEYS

INT64 = {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}
NULLABLE_STR = {"type": ["string", "null"]}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _error(description: str, schema: str = "Error") -> dict[str, Any]:
    return {"description": description, "content": _json(_ref(schema))}


def _ok(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": _json(schema)}


MUTATING: list[dict[str, list[str]]] = [{"basicAuth": []}, {"bearerAuth": []}]
# Reads need credentials only with agent_api_read_requires_auth: true.
READ: list[dict[str, list[str]]] = [{}, {"basicAuth": []}, {"bearerAuth": []}]
# Task output and the event stream need them unless agent_api_output_requires_auth: false.
OUTPUT = MUTATING

TASK_ID = {"name": "task_id", "in": "path", "required": True, "schema": INT64,
           "description": "A task id (PyFarm's task ids are integers)."}

COMMON = {
    "401": _error("Missing or wrong credentials (nothing was changed)."),
    "406": _error("The Accept header names nothing this resource serves."),
    "415": _error("A Content-Type other than JSON."),
    "503": _error("The agent is not running, not reachable, or takes no work now."),
}
WITH_BODY = {
    "400": _error("Malformed JSON, JSON nested more than 64 levels, or a body that breaks "
                  "the schema (the error names the field)."),
    "408": _error("The body did not arrive in time (60 s)."),
    "413": _error("Body larger than 4 MiB."),
}


def _bool_body(key: str, description: str) -> dict[str, Any]:
    return {"required": False, "content": _json({
        "type": "object", "additionalProperties": False,
        "properties": {key: {"type": "boolean", "description": description}}})}


ASSIGNMENT: dict[str, Any] = {
    "type": "object",
    "description": "PyFarm's assignment: one job's tasks for this node.",
    "required": ["job", "jobtype", "tasks"],
    "additionalProperties": False,
    "properties": {
        "job": {
            "type": "object", "required": ["id", "by"], "additionalProperties": False,
            "properties": {
                "id": INT64,
                "by": {"type": "number", "exclusiveMinimum": 0},
                "title": NULLABLE_STR, "user": NULLABLE_STR,
                "ram": {"type": ["integer", "null"], "minimum": 1},
                "cpus": {"type": ["number", "null"], "exclusiveMinimum": 0},
                "ram_warning": {"type": ["integer", "null"], "minimum": 1},
                "ram_max": {"type": ["integer", "null"], "minimum": 1},
                "batch": {"type": ["integer", "null"], "minimum": 1},
                "data": {"type": ["object", "null"]},
                "environ": {"type": ["object", "null"],
                            "additionalProperties": {"type": "string"}},
                "notified_users": {"type": ["array", "null"], "items": {
                    "type": "object", "required": ["username"], "additionalProperties": False,
                    "properties": {"username": {"type": "string"},
                                   "on_success": {"type": ["boolean", "null"]},
                                   "on_failure": {"type": ["boolean", "null"]},
                                   "on_deletion": {"type": ["boolean", "null"]}}}},
                "priority": {"type": ["integer", "null"]},
                "job_group_id": {"type": ["integer", "null"], "minimum": 0},
                "job_group": NULLABLE_STR, "notes": NULLABLE_STR,
                "tags": {"type": ["array", "null"], "items": {"type": "string"}},
                "num_tiles": {"type": ["integer", "null"], "minimum": 1},
                "agent_id": {"type": ["integer", "null"], "minimum": 0},
            },
        },
        "jobtype": {
            "type": "object", "required": ["name", "version"], "additionalProperties": False,
            "properties": {"name": {"type": "string", "minLength": 1},
                           "version": INT64},
        },
        "tasks": {
            "type": "array", "minItems": 1,
            "items": {
                "type": "object", "required": ["id", "frame"], "additionalProperties": False,
                "properties": {"id": INT64, "frame": {"type": "number"},
                               "tile": {"type": ["integer", "null"], "minimum": 0},
                               "attempt": {"type": ["integer", "null"], "minimum": 0}},
            },
        },
    },
}

TASK: dict[str, Any] = {
    "type": "object",
    "description": "PyFarm's keys (id, frame, attempt, tile, local_state), then the agent's "
                   "record; its cgroup figures are under `accounting` when the agent has them.",
    "required": ["id", "frame", "attempt", "tile", "local_state"],
    "properties": {
        "id": {"type": "integer"}, "frame": {"type": "number"},
        "attempt": {"type": "integer"}, "tile": {"type": ["integer", "null"]},
        "local_state": {"type": "string"},
        "assignment_id": {"type": "string"}, "job_id": {"type": "integer"},
        "state": {"type": "string",
                  "enum": ["queued", "running", "done", "failed", "cancelled"]},
        "progress": {"type": "number"}, "reason": NULLABLE_STR,
        "accounting": {"type": "object", "additionalProperties": {"type": "integer"}},
    },
}

STATS: dict[str, Any] = {
    "type": "object", "required": ["task_id", "state"],
    "properties": {
        "task_id": {"type": "integer"}, "state": {"type": "string"},
        "memory_current": {"type": ["integer", "null"], "description": "bytes"},
        "memory_peak": {"type": ["integer", "null"], "description": "bytes"},
        "cpu_usage_usec": {"type": ["integer", "null"], "description": "microseconds"},
        "tasks_current": {"type": ["integer", "null"]},
    },
}

_SETTING_SCHEMAS: dict[str, dict[str, Any]] = {
    "agent_pretty_json": {"type": ["boolean", "null"]},
    "agent_api_read_requires_auth": {"type": ["boolean", "null"]},
    "agent_api_output_requires_auth": {"type": ["boolean", "null"]},
    "farm_name": {"type": ["string", "null"], "minLength": 1},
    "agent_log_level": {"type": ["string", "null"]},
    "agent_master_reannounce": {"type": ["number", "null"], "exclusiveMinimum": 0},
    "agent_ram_check_interval": {"type": ["number", "null"], "exclusiveMinimum": 0},
    "agent_ram_report_delta": {"type": ["integer", "null"], "minimum": 0},
    "agent_ram_max_report_frequency": {"type": ["number", "null"], "exclusiveMinimum": 0},
    "task_stop_grace": {"type": ["number", "null"], "exclusiveMinimum": 0},
    "task_journal_grace": {"type": ["number", "null"], "exclusiveMinimum": 0},
    "jobtype_path_map": {"type": ["array", "null"], "items": {"type": "string"},
                         "description": "rules SOURCE => TARGET, see farmnode.yaml(5)"},
}

CONFIG_PATCH: dict[str, Any] = {
    "type": "object", "additionalProperties": False,
    "description": "JSON merge patch (RFC 7396) of the runtime-editable keys; null resets a "
                   "key to the value of the files. Kept in conf.d/90-http-api.yaml.",
    "properties": {k: _SETTING_SCHEMAS[k] for k in EDITABLE_KEYS},
}

SIGNAL_BODY: dict[str, Any] = {
    "type": "object", "required": ["signal"], "additionalProperties": False,
    "properties": {"signal": {
        "description": "A signal number or name (TERM, SIGTERM, usr1).",
        "oneOf": [{"type": "integer", "minimum": 1, "maximum": 64},
                  {"type": "string", "pattern": "^[A-Za-z0-9+]{1,16}$"}]}},
}

OPERATIONS: dict[str, dict[str, dict[str, Any]]] = {
    "/api/versions": {"get": {
        "operationId": "versions", "summary": "API versions this agent speaks (PyFarm).",
        "security": [{}],
        "responses": {"200": _ok("The versions.", {
            "type": "object", "required": ["versions"],
            "properties": {"versions": {"type": "array", "items": {"type": "integer"}}}})}}},
    "/api/v1/assign": {"post": {
        "operationId": "assign", "summary": "Run an assignment (PyFarm's schema).",
        "security": MUTATING,
        "requestBody": {"required": True, "content": _json(ASSIGNMENT)},
        "responses": {
            "202": _ok("Accepted (also an identical repeat): the assignment's id.", {
                "type": "object", "required": ["id"],
                "properties": {"id": {"type": "string", "format": "uuid"}}}),
            "400": _error("Bad JSON, a field breaking the schema (named), or not enough "
                          "RAM/CPUs/GPUs free now (with agent_ram and requires_ram, or cpus, "
                          "gpus likewise); more GPUs than the node has (job.data.gpus)."),
            "409": _error("Some tasks are already running here.", "Overlap"),
            "413": WITH_BODY["413"]}}},
    "/api/v1/tasks/": {"get": {
        "operationId": "listTasks", "summary": "Tasks of the running assignments.",
        "security": READ,
        "responses": {"200": _ok("The tasks.", {"type": "array", "items": TASK})}}},
    "/api/v1/tasks/{task_id}": {
        "get": {
            "operationId": "getTask", "summary": "A task's record with its cgroup stats.",
            "security": READ, "parameters": [TASK_ID],
            "responses": {"200": _ok("The task.", {**TASK, "properties": {
                **TASK["properties"], "stats": STATS}}),
                "400": _error("Not an integer task id."),
                "404": _error("No such task on this node.")}},
        "delete": {
            "operationId": "deleteTask",
            "summary": "Stop the whole assignment holding the task (PyFarm).",
            "security": MUTATING, "parameters": [TASK_ID],
            "responses": {"202": {"description": "Stopping."},
                          "204": {"description": "Not running here: nothing to stop."},
                          "400": _error("Not an integer task id.")}}},
    "/api/v1/tasks/{task_id}/stats": {"get": {
        "operationId": "taskStats",
        "summary": "A task's memory, CPU and process figures from its cgroup.",
        "security": READ, "parameters": [TASK_ID],
        "responses": {"200": _ok("The figures; null where the agent has none.", STATS),
                      "400": _error("Not an integer task id."),
                      "404": _error("No such task on this node.")}}},
    "/api/v1/tasks/{task_id}/signal": {"post": {
        "operationId": "signalTask",
        "summary": "Send a signal to every process of the task's scope.",
        "security": MUTATING, "parameters": [TASK_ID],
        "requestBody": {"required": True, "content": _json(SIGNAL_BODY)},
        "responses": {"202": _ok("Sent.", {
            "type": "object", "required": ["task_id", "signal", "number"],
            "properties": {"task_id": {"type": "integer"}, "signal": {"type": "string"},
                           "number": {"type": "integer"}}}),
            "404": _error("No such task on this node."),
            "409": _error("The task is not running.")}}},
    "/api/v1/status": {"get": {
        "operationId": "status", "summary": "The agent's state and resources (PyFarm).",
        "security": READ,
        "responses": {"200": _ok("The status.", {
            "type": "object", "required": ["state", "agent_id", "free_ram"],
            "properties": {"state": {"type": "string"}, "agent_id": {"type": "string"},
                           "free_ram": {"type": "integer"},
                           "health": {"type": ["object", "null"], "description": (
                               "The health checks (farmnode-health.target): each one's last "
                               "verdict and output; null where none are installed."),
                               "properties": {
                                   "passed_once": {"type": "boolean"},
                                   "interval": {"type": "number"},
                                   "checks": {"type": "array", "items": {
                                       "type": "object", "properties": {
                                           "name": {"type": "string"},
                                           "unit": {"type": "string"},
                                           "ok": {"type": ["boolean", "null"]},
                                           "detail": {"type": "string"},
                                           "output": {"type": "array",
                                                      "items": {"type": "string"}},
                                           "at": {"type": ["number", "null"]}}}}}},
                           "gpus": {"type": "array", "description": (
                               "The GPUs tasks may get and the assignment holding each."),
                               "items": {"type": "object", "properties": {
                                   "id": {"type": "string"}, "pci_slot": {"type": "string"},
                                   "name": {"type": "string"},
                                   "uuid": {"type": ["string", "null"]},
                                   "devices": {"type": "array", "items": {"type": "string"}},
                                   "assignment": {"type": ["string", "null"]}}}},
                           "state_reason": {"type": ["string", "null"], "description": (
                               "Why the node is disabled when the admin did not disable it "
                               "(workstation mode: a user at the node, the schedule; a failing "
                               "health check).")},
                           "workstation": {"type": ["object", "null"], "description": (
                               "Workstation mode: the verdict, logind's sessions, the "
                               "paused task scopes; null when it is off.")}}})}}},
    "/api/v1/stop": {"post": {
        "operationId": "stop", "summary": "Stop the agent; its tasks are stopped gracefully.",
        "security": MUTATING,
        "requestBody": _bool_body("wait", "answer only once the agent has stopped"),
        "responses": {"200": _ok("Stopped (wait).", {"type": "object"}),
                      "202": _ok("Stopping.", {"type": "object"})}}},
    "/api/v1/restart": {"post": {
        "operationId": "restart",
        "summary": "Restart the agent now if idle or immediately, else once idle.",
        "security": MUTATING,
        "requestBody": _bool_body("immediately", "restart even while tasks run"),
        "responses": {"202": _ok("Restarting now or when idle.", {
            "type": "object", "required": ["restart"],
            "properties": {"restart": {"type": "string", "enum": ["now", "when idle"]}}})}}},
    "/api/v1/update": {"post": {
        "operationId": "update",
        "summary": "Record the version the master wants; the package manager installs it.",
        "security": MUTATING,
        "requestBody": {"required": True, "content": _json({
            "type": "object", "required": ["version"], "additionalProperties": False,
            "properties": {"version": {"type": "string",
                                       "pattern": "^[A-Za-z0-9][A-Za-z0-9.+~:_-]{0,63}$"}}})},
        "responses": {"202": _ok("Recorded.", {"type": "object", "required": ["version"]})}}},
    "/api/v1/config": {
        "get": {
            "operationId": "getConfig", "summary": "The effective config, secrets redacted.",
            "security": READ,
            "responses": {"200": _ok("The config.", {"type": "object"})}},
        "patch": {
            "operationId": "patchConfig", "summary": "Change runtime-editable keys.",
            "security": MUTATING,
            "requestBody": {"required": True, "content": {
                "application/json": {"schema": CONFIG_PATCH},
                "application/merge-patch+json": {"schema": CONFIG_PATCH}}},
            "responses": {"200": _ok("The new config.", {"type": "object"})}}},
    "/api/v1/task_logs/{identifier}": {"get": {
        "operationId": "taskLog",
        "summary": "A task's output from journald: CSV (time, pid, stream, line, message) as "
                   "PyFarm wrote it, or plain text.",
        "security": OUTPUT,
        "parameters": [
            {"name": "identifier", "in": "path", "required": True,
             "description": "A task id, an assignment id, or <assignment id>.csv.",
             "schema": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,128}$"}},
            {"name": "format", "in": "query", "required": False,
             "schema": {"type": "string", "enum": ["csv", "text"]}},
            {"name": "tail", "in": "query", "required": False,
             "description": "Only the last lines of the log, this many.",
             "schema": {"type": "integer", "minimum": 1, "maximum": 10000}}],
        "responses": {
            "200": {"description": "The log.", "content": {
                "text/csv": {"schema": {"type": "string"}},
                "text/plain": {"schema": {"type": "string"}}}},
            "400": _error("Not an identifier (a path, a separator, a bad format)."),
            "404": _error("No such log on this node.")}}},
    "/api/v1/events": {"get": {
        "operationId": "events",
        "summary": "Server-sent events: `task` (assignment_id, task_id, state, reason, "
                   "progress) and `agent` (state), as they happen; `node` (the status "
                   "page's figures of GET /api/v1/status) when they change, sampled at "
                   "least every 5 s.",
        "security": OUTPUT,
        "responses": {"200": {"description": "An endless event stream.", "content": {
            "text/event-stream": {"schema": {"type": "string"}}}}}}},
    "/api/v1/openapi.json": {"get": {
        "operationId": "openapi", "summary": "This document.", "security": [{}],
        "responses": {"200": _ok("The OpenAPI document.", {"type": "object"})}}},
    "/": {"get": {
        "operationId": "statusPage",
        "summary": "The node's status page (HTML; its data comes from the endpoints here).",
        "security": OUTPUT,
        "responses": {"200": {"description": "The page.", "content": {
            "text/html": {"schema": {"type": "string"}}}}}}},
    "/static/{name}": {"get": {
        "operationId": "staticFile", "summary": "The status page's stylesheet and script.",
        "security": [{}],
        "parameters": [{"name": "name", "in": "path", "required": True,
                        "schema": {"type": "string", "enum": ["page.css", "page.js"]}}],
        "responses": {"200": {"description": "The file.", "content": {
            "text/css": {"schema": {"type": "string"}},
            "text/javascript": {"schema": {"type": "string"}}}},
            "404": _error("No such file.")}}},
    "/metrics": {"get": {
        "operationId": "metrics",
        "summary": "Prometheus metrics: tasks by state, RAM, per-task memory and CPU.",
        "security": READ,
        "responses": {"200": {"description": "Prometheus text format 0.0.4.", "content": {
            "text/plain": {"schema": {"type": "string"}}}}}}},
}


def _with_common(path: str, method: str, op: dict[str, Any]) -> dict[str, Any]:
    op = copy.deepcopy(op)
    responses = op["responses"]
    extra: dict[str, Any] = {}
    if path not in ("/api/versions", "/api/v1/openapi.json", "/static/{name}"):
        extra.update(COMMON)
    else:
        extra.update({k: COMMON[k] for k in ("406", "415")})
    if "requestBody" in op:
        extra.update(WITH_BODY)
    for code, response in extra.items():
        responses.setdefault(code, response)
    return op


def document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "farmnode agent API",
            "version": __version__,
            "description": "PyFarm's agent API (a master speaking PyFarm's protocol works "
                           "unchanged), plus signals, per-task stats, events and metrics. "
                           "Errors are always JSON {\"error\": ...}.",
        },
        "paths": {path: {m: _with_common(path, m, op) for m, op in ops.items()}
                  for path, ops in OPERATIONS.items()},
        "components": {
            "schemas": {
                "Error": {"type": "object", "required": ["error"],
                          "properties": {"error": {"type": "string"}}},
                "Overlap": {"type": "object", "required": ["error", "rejected_task_ids"],
                            "properties": {"error": {"type": "string"},
                                           "rejected_task_ids": {"type": "array",
                                                                 "items": {"type": "integer"}}}},
            },
            "securitySchemes": {
                "basicAuth": {"type": "http", "scheme": "basic",
                              "description": "agent_api_username / agent_api_password"},
                "bearerAuth": {"type": "http", "scheme": "bearer",
                               "description": "a line of agent_api_tokens_file"},
            },
        },
    }
