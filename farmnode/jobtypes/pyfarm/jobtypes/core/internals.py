"""``pyfarm.jobtypes.core.internals``: the mixins PyFarm's JobType is documented to have.

They carry no behaviour here (the host does the process and cache work); they exist so that
code naming them, or checking ``isinstance``, keeps working.
"""

from __future__ import annotations

from typing import Any, NamedTuple


class ProcessData(NamedTuple):
    protocol: Any
    started: Any
    stopped: Any
    log_identifier: Any


class Cache:
    """Job type caching is the agent's (see farmnode.jobtypes.remote)."""

    cache: dict[Any, Any] = {}


class Process:
    logging: dict[Any, Any] = {}


class System:
    pass


class TypeChecks:
    pass
