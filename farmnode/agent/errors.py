"""The agent core's refusals: what `Agent` and its admission checks raise to callers.

Each is an AgentError whose text says what is wrong; the D-Bus edge (farmnode.bus.errors)
maps each class to its D-Bus error and its fields to the error's details. It imports only
farmnode.tasks.schema (the assignment's own validation error).
"""

from __future__ import annotations

from farmnode.tasks.schema import AssignmentError


class AgentError(Exception):
    """Refused request; the message is for the caller."""


class InvalidAssignment(AgentError):
    def __init__(self, err: AssignmentError) -> None:
        super().__init__(str(err))
        self.field = err.field


class PartialOverlap(AgentError):
    def __init__(self, rejected: list[int]) -> None:
        super().__init__(f"Partial overlap of tasks: rejected task ids {rejected}")
        self.rejected_task_ids = rejected


class NotEnoughResources(AgentError):
    def __init__(self, what: str, available: float, required: float,
                 field: str | None = None) -> None:
        super().__init__(f"Not enough {what}: agent_{what}={available:g} requires_{what}="
                         f"{required:g} ({field or 'job.' + what})")
        self.what, self.available, self.required = what, available, required


class NotAccepting(AgentError):
    pass


class StorageFailed(NotAccepting):
    """The state directory refuses writes (full, read-only, I/O error)."""


class UnknownTask(AgentError):
    pass


class InvalidArgument(AgentError):
    pass
