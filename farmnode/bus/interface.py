"""org.farmnode.Agent1: declaration shared by the server and every client.

In systemd's style: typed properties that emit PropertiesChanged, one org.farmnode.Task1
object per task under this object's ObjectManager (farmnode.bus.task1). JSON stays where
PyFarm's schema is the payload (an assignment) and in the older calls that return records
(GetStatus, ListTasks, GetTask); everything GetStatus's record holds is a property too
(farmnode.bus.client.status_record writes the record back from them). Errors carry D-Bus
names under org.farmnode.Agent1.Error (mapped in farmnode.bus.errors); TryAssign returns a
refusal's detail typed.
"""

from __future__ import annotations

import os
from typing import Any

from sdbus import (
    DbusObjectManagerInterfaceAsync,
    DbusPropertyConstFlag,
    DbusPropertyEmitsChangeFlag,
    DbusUnprivilegedFlag,
    dbus_method_async,
    dbus_property_async,
    dbus_signal_async,
)
from sdbus.dbus_exceptions import DbusFailedError

from farmnode.bus.views import AgentFigures, AgentView

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


class Agent1Interface(DbusObjectManagerInterfaceAsync, interface_name=INTERFACE):
    """The agent; its ObjectManager lists the task objects (farmnode.bus.task1)."""

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

    @dbus_method_async(flags=OPEN)
    async def note_master_contact(self) -> None:
        """The HTTP API saw a request from the master (PyFarm's User-Agent)."""
        raise NotImplementedError

    # ---- control for the HTTP API ----------------------------------------------------
    @dbus_method_async(input_signature="xi", result_signature="b", flags=OPEN,
                       input_args_names=("task_id", "signal"), result_args_names=("sent",))
    async def signal_task(self, task_id: int, signal: int) -> bool:
        """Send a signal to every process of the task's scope; false if it is not running."""
        raise NotImplementedError

    @dbus_method_async(flags=OPEN)
    async def stop(self) -> None:
        """Stop farmnode.service (tasks are stopped gracefully); returns once queued."""
        raise NotImplementedError

    @dbus_method_async(input_signature="b", result_signature="b", flags=OPEN,
                       input_args_names=("immediately",), result_args_names=("now",))
    async def restart(self, immediately: bool) -> bool:
        """Restart farmnode.service now (idle or immediately) or once idle; true if now."""
        raise NotImplementedError

    @dbus_method_async(input_signature="s", flags=OPEN, input_args_names=("version",))
    async def update(self, version: str) -> None:
        """Record that the master asked for this version (the package manager applies it)."""
        raise NotImplementedError

    @dbus_method_async(result_signature="s", flags=OPEN, result_args_names=("config_json",))
    async def get_config(self) -> str:
        """The effective configuration, secrets redacted."""
        raise NotImplementedError

    @dbus_method_async(input_signature="s", result_signature="s", flags=OPEN,
                       input_args_names=("patch_json",), result_args_names=("config_json",))
    async def patch_config(self, patch_json: str) -> str:
        """JSON merge patch of the editable keys, persisted as a conf.d drop-in."""
        raise NotImplementedError

    @dbus_method_async(input_signature="s", result_signature="h", flags=OPEN,
                       input_args_names=("identifier",), result_args_names=("entries",))
    async def task_log(self, identifier: str) -> int:
        """A task's or assignment's output from journald: a file of JSON lines (a memfd, so
        a large log never has to fit in one D-Bus message)."""
        raise NotImplementedError

    # ---- job files (farmnode.jobfile) ---------------------------------------------------
    @dbus_method_async(input_signature="ssais", result_signature="s", flags=OPEN,
                       input_args_names=("name", "yaml", "source_lines", "submission"),
                       result_args_names=("jobs_json",))
    async def submit_jobs(self, name: str, yaml: str, source_lines: list[int],
                          submission: str) -> str:
        """A rendered job file (Jinja already applied by the caller) and, per line, its
        line in the source: queued here, or created on the master when one is configured.
        `submission` (the caller's token, "" for none) makes a call again after a lost reply
        answer with the jobs the first one stored instead of storing them twice."""
        raise NotImplementedError

    @dbus_method_async(result_signature="s", flags=OPEN, result_args_names=("jobs_json",))
    async def list_jobs(self) -> str:
        """The job-file jobs this node queued or submitted, with their state."""
        raise NotImplementedError

    @dbus_property_async("s", flags=DbusPropertyEmitsChangeFlag)
    def state(self) -> str:
        raise NotImplementedError

    @dbus_property_async("s", flags=DbusPropertyConstFlag)
    def version(self) -> str:
        raise NotImplementedError

    @dbus_property_async("s", flags=DbusPropertyConstFlag)
    def agent_id(self) -> str:
        raise NotImplementedError

    @dbus_property_async("as")
    def trusted_masters(self) -> list[str]:
        """Networks whose peers may call PyFarm's HTTP endpoints without credentials:
        agent_api_trusted_masters, or the addresses `master` resolves to."""
        raise NotImplementedError

    @dbus_signal_async("sxssd", signal_args_names=(
        "assignment_id", "task_id", "state", "reason", "progress"))
    def task_changed(self) -> tuple[str, int, str, str, float]:
        raise NotImplementedError

    @dbus_signal_async("s", signal_args_names=("state",))
    def state_changed(self) -> str:
        raise NotImplementedError

    # ---- drain ---------------------------------------------------------------------
    @dbus_signal_async("")
    def idle(self) -> None:
        """The last running assignment has ended (and cleaned up): the node runs nothing.
        `farmnode drain` disables the node and awaits this."""
        raise NotImplementedError

    # ---- typed API: properties that emit PropertiesChanged, refusals with detail --------
    @dbus_method_async(input_signature="s", result_signature="sbssa{sv}", flags=OPEN,
                       input_args_names=("assignment_json",),
                       result_args_names=("assignment_id", "created", "error", "message",
                                          "detail"))
    async def try_assign(self, assignment_json: str,
                         ) -> tuple[str, bool, str, str, dict[str, tuple[str, Any]]]:
        """Assign, with a refusal returned rather than raised: the D-Bus error name Assign
        would raise ("" when accepted), its message and its typed detail (rejected_task_ids
        ax, resource s, available d, required d, field s)."""
        raise NotImplementedError

    @dbus_property_async("t", flags=DbusPropertyEmitsChangeFlag, property_name="FreeRAM")
    def free_ram(self) -> int:
        """MiB available; PropertiesChanged once it moved by agent_ram_report_delta."""
        raise NotImplementedError

    @dbus_property_async("t", flags=DbusPropertyEmitsChangeFlag, property_name="TotalRAM")
    def total_ram(self) -> int:
        """MiB the node offers tasks (agent_ram, or the machine's)."""
        raise NotImplementedError

    @dbus_property_async("d", flags=DbusPropertyEmitsChangeFlag, property_name="CPUs")
    def cpus(self) -> float:
        raise NotImplementedError

    @dbus_property_async("u", flags=DbusPropertyEmitsChangeFlag, property_name="RunningTasks")
    def running_tasks(self) -> int:
        """Tasks of the assignments the agent runs."""
        raise NotImplementedError

    @dbus_property_async("as", flags=DbusPropertyEmitsChangeFlag, property_name="Assignments")
    def assignments(self) -> list[str]:
        raise NotImplementedError

    @dbus_property_async("u", flags=DbusPropertyEmitsChangeFlag, property_name="GPUsTotal")
    def gpus_total(self) -> int:
        raise NotImplementedError

    @dbus_property_async("u", flags=DbusPropertyEmitsChangeFlag, property_name="GPUsFree")
    def gpus_free(self) -> int:
        raise NotImplementedError

    @dbus_property_async("s", flags=DbusPropertyEmitsChangeFlag, property_name="MasterLink")
    def master_link(self) -> str:
        """standalone (no master configured), unannounced or announced."""
        raise NotImplementedError

    @dbus_property_async("s", flags=DbusPropertyEmitsChangeFlag,
                         property_name="MasterLastError")
    def master_last_error(self) -> str:
        raise NotImplementedError

    @dbus_property_async("t", flags=DbusPropertyEmitsChangeFlag,
                         property_name="LastMasterContactUSec")
    def last_master_contact(self) -> int:
        """When the master last heard from us or called us, usec since the epoch; 0: never."""
        raise NotImplementedError

    @dbus_property_async("u", flags=DbusPropertyEmitsChangeFlag, property_name="QueuedReports")
    def queued_reports(self) -> int:
        raise NotImplementedError

    @dbus_property_async("s", flags=DbusPropertyEmitsChangeFlag, property_name="StorageError")
    def storage_error(self) -> str:
        """Set while the state directory refuses writes."""
        raise NotImplementedError

    # ---- what GetStatus's record holds besides, typed (read from the service's views) ---
    # Those that change all the time (figures) emit nothing, as systemd's MemoryCurrent.
    def _view(self) -> AgentView:
        raise NotImplementedError

    def _figures(self) -> AgentFigures:
        raise NotImplementedError

    def _started(self) -> int:
        raise NotImplementedError

    @dbus_property_async("u", flags=DbusPropertyConstFlag, property_name="MainPID")
    def main_pid(self) -> int:
        return os.getpid()

    @dbus_property_async("t", flags=DbusPropertyConstFlag, property_name="StartedUSec")
    def started(self) -> int:
        """When the agent process started, usec since the epoch."""
        return self._started()

    @dbus_property_async("s", flags=DbusPropertyEmitsChangeFlag, property_name="AgentHostname")
    def agent_hostname(self) -> str:
        """The FQDN (the kernel's name until it resolved)."""
        return self._view().agent_hostname

    @dbus_property_async("s", flags=DbusPropertyEmitsChangeFlag, property_name="FarmName")
    def farm_name(self) -> str:
        """"": none configured."""
        return self._view().farm_name

    @dbus_property_async("s", flags=DbusPropertyEmitsChangeFlag, property_name="StateReason")
    def state_reason(self) -> str:
        """Why the node is disabled when not by the admin (health, workstation); "": it is not."""
        return self._view().state_reason

    @dbus_property_async("ax", flags=DbusPropertyEmitsChangeFlag, property_name="Jobs")
    def jobs(self) -> list[int]:
        """The jobs of the assignments it runs."""
        return list(self._view().jobs)

    @dbus_property_async("a(ssssass)", flags=DbusPropertyEmitsChangeFlag, property_name="GPUs")
    def gpus(self) -> list[tuple[str, str, str, str, list[str], str]]:
        """(id, PCI slot, name, UUID or "", its /dev nodes, the assignment holding it or "")."""
        return list(self._view().gpus)

    @dbus_property_async("s", flags=DbusPropertyEmitsChangeFlag, property_name="Master")
    def master(self) -> str:
        """The master's API URL; "": standalone."""
        return self._view().master

    @dbus_property_async("s", flags=DbusPropertyEmitsChangeFlag, property_name="MasterAgentId")
    def master_agent_id(self) -> str:
        """The id the master knows this node by."""
        return self._view().master_agent_id

    @dbus_property_async("t", flags=DbusPropertyEmitsChangeFlag, property_name="LastAnnounceUSec")
    def last_announce(self) -> int:
        """usec since the epoch; 0: never."""
        return self._view().last_announce

    @dbus_property_async("t", flags=DbusPropertyEmitsChangeFlag,
                         property_name="MasterLastErrorUSec")
    def master_last_error_at(self) -> int:
        """When MasterLastError happened; 0: never."""
        return self._view().master_last_error_at

    @dbus_property_async("x", flags=DbusPropertyEmitsChangeFlag, property_name="MasterTimeOffset")
    def master_time_offset(self) -> int:
        """Seconds the master's clock is ahead of ours."""
        return self._view().master_time_offset

    @dbus_property_async("b", flags=DbusPropertyEmitsChangeFlag, property_name="HealthEnabled")
    def health_enabled(self) -> bool:
        """false: no farmnode-health.target, nothing gates work."""
        return self._view().health_enabled

    @dbus_property_async("b", flags=DbusPropertyEmitsChangeFlag, property_name="HealthPassedOnce")
    def health_passed_once(self) -> bool:
        return self._view().health_passed_once

    @dbus_property_async("d", flags=DbusPropertyEmitsChangeFlag, property_name="HealthInterval")
    def health_interval(self) -> float:
        """Seconds between rounds of the checks."""
        return self._view().health_interval

    @dbus_property_async("a(ssbbsasd)", flags=DbusPropertyEmitsChangeFlag,
                         property_name="HealthChecks")
    def health_checks(self) -> list[tuple[str, str, bool, bool, str, list[str], float]]:
        """(name, unit, ran, ok, detail, output lines, when: s since the epoch, 0 until it ran)."""
        return list(self._view().health_checks)

    @dbus_property_async("b", flags=DbusPropertyEmitsChangeFlag, property_name="Workstation")
    def workstation(self) -> bool:
        """Workstation mode or a render schedule is in effect."""
        return self._view().workstation

    @dbus_property_async("b", flags=DbusPropertyEmitsChangeFlag, property_name="WorkstationMode")
    def workstation_mode(self) -> bool:
        return self._view().workstation_mode

    @dbus_property_async("s", flags=DbusPropertyEmitsChangeFlag, property_name="RenderSchedule")
    def render_schedule(self) -> str:
        return self._view().render_schedule

    @dbus_property_async("s", flags=DbusPropertyEmitsChangeFlag, property_name="WorkstationPause")
    def workstation_pause(self) -> str:
        """freeze or cpu-idle."""
        return self._view().workstation_pause

    @dbus_property_async("b", flags=DbusPropertyEmitsChangeFlag, property_name="Rendering")
    def rendering(self) -> bool:
        """false while workstation mode or the schedule pauses tasks."""
        return self._view().rendering

    @dbus_property_async("s", flags=DbusPropertyEmitsChangeFlag, property_name="RenderingReason")
    def rendering_reason(self) -> str:
        return self._view().rendering_reason

    @dbus_property_async("d", flags=DbusPropertyEmitsChangeFlag, property_name="PausedSince")
    def paused_since(self) -> float:
        """s since the epoch; 0: not paused."""
        return self._view().paused_since

    @dbus_property_async("as", flags=DbusPropertyEmitsChangeFlag, property_name="PausedUnits")
    def paused_units(self) -> list[str]:
        return list(self._view().paused_units)

    @dbus_property_async("a{ss}", flags=DbusPropertyEmitsChangeFlag, property_name="PauseErrors")
    def pause_errors(self) -> dict[str, str]:
        """Scope: why it could not be paused or resumed."""
        return self._view().pause_errors

    @dbus_property_async("d", flags=DbusPropertyEmitsChangeFlag, property_name="LastPauseSec")
    def last_pause(self) -> float:
        """Seconds the last pause of every scope took; -1: none yet."""
        return self._view().last_pause

    @dbus_property_async("d", flags=DbusPropertyEmitsChangeFlag, property_name="LastResumeSec")
    def last_resume(self) -> float:
        """-1: none yet."""
        return self._view().last_resume

    @dbus_property_async("a(ssssssbbbdb)", flags=DbusPropertyEmitsChangeFlag,
                         property_name="Sessions")
    def sessions(self) -> list[tuple[str, str, str, str, str, str, bool, bool, bool, float, bool]]:
        """logind's sessions: (id, user, type, class, seat, tty, remote, active, idle hint,
        idle since (s since the epoch, 0: never), counted)."""
        return list(self._view().sessions)

    @dbus_property_async("t", flags=0, property_name="UptimeUSec")
    def uptime(self) -> int:
        """How long the agent has run, by its own clock (StartedUSec by a client's clock
        would carry the two clocks' difference)."""
        return self._figures().uptime

    @dbus_property_async("t", flags=0, property_name="AgentProcessRAM")
    def agent_process_ram(self) -> int:
        """MiB, the agent's own RSS."""
        return self._figures().agent_process_ram

    @dbus_property_async("t", flags=0, property_name="ConsumedRAM")
    def consumed_ram(self) -> int:
        """MiB, of the running tasks' scopes."""
        return self._figures().consumed_ram

    @dbus_property_async("t", flags=0, property_name="ChildProcesses")
    def child_processes(self) -> int:
        """Processes in the running tasks' scopes."""
        return self._figures().child_processes

    @dbus_property_async("a(stt)", flags=0, property_name="Disks")
    def disks(self) -> list[tuple[str, int, int]]:
        """(mount point, size, free), bytes."""
        return self._figures().disks

    @dbus_property_async("t", flags=0, property_name="MasterRequests")
    def master_requests(self) -> int:
        """Requests made to the master."""
        return self._figures().master_requests

    @dbus_property_async("t", flags=0, property_name="MasterReportsSent")
    def master_reports_sent(self) -> int:
        return self._figures().master_reports_sent

    @dbus_property_async("t", flags=0, property_name="MasterReportsDropped")
    def master_reports_dropped(self) -> int:
        return self._figures().master_reports_dropped
