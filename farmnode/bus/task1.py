"""org.farmnode.Task1: one object per task at /org/farmnode/Agent1/task/<id>.

Declared once for the server and every client. The properties read the object's TaskView
(farmnode.bus.views); a proxy reads them over the bus instead. All of them emit
PropertiesChanged, except the ones that never change once the object exists.
"""

from __future__ import annotations

from sdbus import (
    DbusInterfaceCommonAsync,
    DbusPropertyConstFlag,
    DbusPropertyEmitsChangeFlag,
    dbus_method_async,
    dbus_property_async,
)

from farmnode.bus.interface import OBJECT_PATH, OPEN
from farmnode.bus.views import TaskView

TASK_INTERFACE = "org.farmnode.Task1"
TASK_PATH_PREFIX = f"{OBJECT_PATH}/task"
CHANGES = DbusPropertyEmitsChangeFlag
CONST = DbusPropertyConstFlag


def task_path(task_id: int) -> str:
    """Task ids are PyFarm's non-negative integers: a valid path element as they are."""
    return f"{TASK_PATH_PREFIX}/{task_id}"


def task_id_of(path: str) -> int | None:
    head, _, tail = path.rpartition("/")
    return int(tail) if head == TASK_PATH_PREFIX and tail.isdigit() else None


class Task1Interface(DbusInterfaceCommonAsync, interface_name=TASK_INTERFACE):
    view: TaskView

    @dbus_method_async(result_signature="b", flags=OPEN, result_args_names=("stopped",))
    async def cancel(self) -> bool:
        """Stop the assignment holding the task; false if it was not running."""
        raise NotImplementedError

    @dbus_method_async(input_signature="i", result_signature="b", flags=OPEN,
                       input_args_names=("signal",), result_args_names=("sent",))
    async def signal(self, signal: int) -> bool:
        """kill(2) every process of the task's scope; false if it is not running."""
        raise NotImplementedError

    @dbus_property_async("x", flags=CONST, property_name="Id")
    def id(self) -> int:
        return self.view.id

    @dbus_property_async("s", flags=CHANGES, property_name="AssignmentId")
    def assignment_id(self) -> str:
        return self.view.assignment_id

    @dbus_property_async("x", flags=CHANGES, property_name="JobId")
    def job_id(self) -> int:
        return self.view.job_id

    @dbus_property_async("s", flags=CHANGES, property_name="JobType")
    def job_type(self) -> str:
        return self.view.job_type

    @dbus_property_async("d", flags=CHANGES, property_name="Frame")
    def frame(self) -> float:
        return self.view.frame

    @dbus_property_async("x", flags=CHANGES, property_name="Tile")
    def tile(self) -> int:
        """-1: no tile."""
        return self.view.tile

    @dbus_property_async("u", flags=CHANGES, property_name="Attempt")
    def attempt(self) -> int:
        return self.view.attempt

    @dbus_property_async("s", flags=CHANGES, property_name="State")
    def state(self) -> str:
        """queued, running, done, failed or cancelled."""
        return self.view.state

    @dbus_property_async("s", flags=CHANGES, property_name="Reason")
    def reason(self) -> str:
        return self.view.reason

    @dbus_property_async("d", flags=CHANGES, property_name="Progress")
    def progress(self) -> float:
        return self.view.progress

    @dbus_property_async("s", flags=CHANGES, property_name="Unit")
    def unit(self) -> str:
        return self.view.unit

    @dbus_property_async("i", flags=CHANGES, property_name="ExitCode")
    def exit_code(self) -> int:
        """-1: none (running, or killed by a signal)."""
        return self.view.exit_code

    @dbus_property_async("i", flags=CHANGES, property_name="ExitSignal")
    def exit_signal(self) -> int:
        return self.view.exit_signal

    @dbus_property_async("t", flags=CHANGES, property_name="MemoryCurrent")
    def memory_current(self) -> int:
        """Bytes, of the task's scope while it runs; UINT64_MAX: not measured."""
        return self.view.memory_current

    @dbus_property_async("t", flags=CHANGES, property_name="MemoryPeak")
    def memory_peak(self) -> int:
        return self.view.memory_peak

    @dbus_property_async("t", flags=CHANGES, property_name="CPUUsageUSec")
    def cpu_usage_usec(self) -> int:
        return self.view.cpu_usage_usec

    @dbus_property_async("t", flags=CHANGES, property_name="TasksCurrent")
    def tasks_current(self) -> int:
        return self.view.tasks_current

    @dbus_property_async("t", flags=CHANGES, property_name="TasksPeak")
    def tasks_peak(self) -> int:
        return self.view.tasks_peak

    @dbus_property_async("t", flags=CHANGES, property_name="OOMKills")
    def oom_kills(self) -> int:
        """OOM kills in the scope (memory.events oom_kill)."""
        return self.view.oom_kills

    @dbus_property_async("t", flags=CHANGES, property_name="MemoryMaxEvents")
    def memory_max_events(self) -> int:
        """Times the scope hit its MemoryMax (memory.events max)."""
        return self.view.memory_max_events

    @dbus_property_async("as", flags=CHANGES, property_name="GPUs")
    def gpus(self) -> list[str]:
        return list(self.view.gpus)

    @dbus_property_async("t", flags=CHANGES, property_name="CreatedUSec")
    def created(self) -> int:
        return self.view.created

    @dbus_property_async("t", flags=CHANGES, property_name="StartedUSec")
    def started(self) -> int:
        return self.view.started

    @dbus_property_async("t", flags=CHANGES, property_name="FinishedUSec")
    def finished(self) -> int:
        return self.view.finished
