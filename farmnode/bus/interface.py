"""org.farmnode.Agent1: declaration shared by the server and every client.

Complex values travel as JSON strings: the schema of an assignment or a task record grows
with the protocol, and busctl users can still read and write them. Errors carry D-Bus names
under org.farmnode.Agent1.Error so clients can map them (the HTTP API to 400/409/503).
"""

from __future__ import annotations

import re

from sdbus import (
    DbusInterfaceCommonAsync,
    DbusUnprivilegedFlag,
    dbus_method_async,
    dbus_property_async,
    dbus_signal_async,
)
from sdbus.dbus_exceptions import DbusFailedError

BUS_NAME = "org.farmnode.Agent1"
OBJECT_PATH = "/org/farmnode/Agent1"
INTERFACE = "org.farmnode.Agent1"

# The bus policy (dbus/org.farmnode.Agent1.conf) decides who may call what; sd-bus would
# otherwise refuse every caller without CAP_SYS_ADMIN before the policy is consulted.
OPEN = DbusUnprivilegedFlag


class InvalidAssignmentError(DbusFailedError):
    dbus_error_name = f"{INTERFACE}.Error.InvalidAssignment"


class PartialOverlapError(DbusFailedError):
    dbus_error_name = f"{INTERFACE}.Error.PartialOverlap"


class NotEnoughResourcesError(DbusFailedError):
    dbus_error_name = f"{INTERFACE}.Error.NotEnoughResources"


class NotAcceptingError(DbusFailedError):
    dbus_error_name = f"{INTERFACE}.Error.NotAccepting"


class UnknownTaskError(DbusFailedError):
    dbus_error_name = f"{INTERFACE}.Error.UnknownTask"


class InvalidArgumentError(DbusFailedError):
    dbus_error_name = f"{INTERFACE}.Error.InvalidArgument"


def rejected_task_ids(message: str) -> list[int]:
    """The ids named by a PartialOverlap error's message."""
    m = re.search(r"rejected task ids \[([0-9, ]*)\]", message)
    return [int(x) for x in m.group(1).split(",") if x.strip()] if m else []


class Agent1Interface(DbusInterfaceCommonAsync, interface_name=INTERFACE):
    @dbus_method_async(input_signature="s", result_signature="s", flags=OPEN,
                       result_args_names=("assignment_id",))
    async def assign(self, assignment_json: str) -> str:
        """Start an assignment (PyFarm's schema, as JSON); returns its id."""
        raise NotImplementedError

    @dbus_method_async(input_signature="x", result_signature="b", flags=OPEN,
                       result_args_names=("stopped",))
    async def cancel_task(self, task_id: int) -> bool:
        """Stop the assignment holding the task; false if it was not running."""
        raise NotImplementedError

    @dbus_method_async(input_signature="b", result_signature="s", flags=OPEN,
                       result_args_names=("tasks_json",))
    async def list_tasks(self, active_only: bool) -> str:
        raise NotImplementedError

    @dbus_method_async(input_signature="x", result_signature="s", flags=OPEN,
                       result_args_names=("task_json",))
    async def get_task(self, task_id: int) -> str:
        raise NotImplementedError

    @dbus_method_async(result_signature="s", flags=OPEN, result_args_names=("status_json",))
    async def get_status(self) -> str:
        raise NotImplementedError

    @dbus_method_async(input_signature="s", flags=OPEN, input_args_names=("state",))
    async def set_state(self, state: str) -> None:
        """online or disabled (a disabled node takes no new work)."""
        raise NotImplementedError

    @dbus_property_async("s")
    def state(self) -> str:
        raise NotImplementedError

    @dbus_property_async("s")
    def version(self) -> str:
        raise NotImplementedError

    @dbus_property_async("s")
    def agent_id(self) -> str:
        raise NotImplementedError

    @dbus_signal_async("sxssd", signal_args_names=(
        "assignment_id", "task_id", "state", "reason", "progress"))
    def task_changed(self) -> tuple[str, int, str, str, float]:
        raise NotImplementedError

    @dbus_signal_async("s", signal_args_names=("state",))
    def state_changed(self) -> str:
        raise NotImplementedError
