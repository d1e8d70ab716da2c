"""Finding job types: the ``farmnode.jobtypes`` entry-point group is the only registry.

Owns: load_jobtype, available_jobtypes, UnknownJobType, JobTypeLoadError.
May import: farmnode.tasks.model and farmnode.config only (and this package's base).

Third-party job types install a distribution that declares an entry point in the group. A name
not found here may be one the master serves (PyFarm's way): the agent downloads it and runs it
inside the task's scope as the job's user, never in the agent (farmnode.jobtypes.remote).
"""

from __future__ import annotations

import inspect
from importlib.metadata import EntryPoint, entry_points

from farmnode.jobtypes.base import JobType

GROUP = "farmnode.jobtypes"


class UnknownJobType(LookupError):
    """No installed job type has this name, or it refuses the requested version."""

    def __init__(self, name: str, version: int, known: list[str], detail: str | None = None):
        self.name = name
        self.version = version
        self.known = known
        shown = ", ".join(known) if known else "none installed"
        message = detail or f"unknown job type {name!r} (version {version})"
        super().__init__(f"{message}; known job types: {shown}")


class JobTypeLoadError(Exception):
    """An entry point exists but does not yield a usable JobType subclass."""


def _entry_points() -> dict[str, list[EntryPoint]]:
    found: dict[str, list[EntryPoint]] = {}
    for ep in entry_points(group=GROUP):
        same = found.setdefault(ep.name, [])
        # The same distribution can be visible twice (an editable install plus a stray
        # egg-info on sys.path); identical targets are not a conflict.
        if all(other.value != ep.value for other in same):
            same.append(ep)
    return found


def available_jobtypes() -> list[str]:
    """Names of the installed job types, sorted."""
    return sorted(_entry_points())


def load_jobtype(name: str, version: int) -> type[JobType]:
    """The JobType subclass registered as ``name`` that accepts ``version``.

    Raises UnknownJobType (a LookupError) for an unknown name or refused version, and
    JobTypeLoadError when the entry point is ambiguous, fails to import, or is not a concrete
    JobType subclass.
    """
    eps = _entry_points()
    candidates = eps.get(name)
    if not candidates:
        raise UnknownJobType(name, version, sorted(eps))
    if len(candidates) > 1:
        targets = ", ".join(ep.value for ep in candidates)
        raise JobTypeLoadError(f"job type {name!r} is registered more than once: {targets}")
    ep = candidates[0]
    try:
        obj = ep.load()
    except Exception as exc:
        raise JobTypeLoadError(f"job type {name!r} ({ep.value}) failed to load: {exc}") from exc
    if not (isinstance(obj, type) and issubclass(obj, JobType)):
        raise JobTypeLoadError(
            f"job type {name!r} ({ep.value}) is {obj!r}, not a subclass of "
            f"{JobType.__module__}.{JobType.__qualname__}"
        )
    if inspect.isabstract(obj):
        raise JobTypeLoadError(f"job type {name!r} ({ep.value}) is abstract")
    supported = obj.supported_versions
    if supported is not None and version not in supported:
        versions = ", ".join(str(v) for v in sorted(supported))
        raise UnknownJobType(
            name,
            version,
            sorted(eps),
            detail=f"job type {name!r} does not support version {version} (supports {versions})",
        )
    return obj
