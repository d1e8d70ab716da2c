"""PyFarm's import paths for the job types a PyFarm master serves, written from PyFarm's docs.

A PyFarm job type starts with ``from pyfarm.jobtypes.core.jobtype import JobType``. `install()`
registers every module of this package under its PyFarm name (``pyfarm.jobtypes.core.jobtype``
is ``farmnode.jobtypes.pyfarm.jobtypes.core.jobtype``), so such source imports unchanged. Only
the in-scope host (`farmnode.jobtypes.remote_host`) installs it: the agent never imports job
type source, and nothing here is shared with a real ``pyfarm`` distribution.

The API is PyFarm 0.8's documented ``JobType`` (pyfarm.agent documentation, "pyfarm.jobtypes
package"), for job types that run one process per assignment through `get_command_data`.
"""

from __future__ import annotations

import importlib
import sys

# The PyFarm module names this package provides, below ``pyfarm``.
MODULES: tuple[str, ...] = (
    "core",
    "core.enums",
    "agent",
    "agent.config",
    "agent.logger",
    "jobtypes",
    "jobtypes.core",
    "jobtypes.core.internals",
    "jobtypes.core.process",
    "jobtypes.core.jobtype",
)


def provided() -> list[str]:
    """The importable PyFarm module names, for error messages."""
    return ["pyfarm", *(f"pyfarm.{m}" for m in MODULES)]


def install() -> None:
    """Make ``import pyfarm.…`` resolve to this package (idempotent)."""
    sys.modules["pyfarm"] = sys.modules[__name__]
    for name in MODULES:
        sys.modules[f"pyfarm.{name}"] = importlib.import_module(f"{__name__}.{name}")
