"""Job types downloaded from the master: refreshing the on-disk cache a run loads one from
when it is not built in (farmnode.jobtypes.remote keeps and loads the cache).

It may import farmnode.jobtypes; the master is reached through the one method it needs of
the master link (JobTypeSource), never farmnode.master itself.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from farmnode.jobtypes.remote import RemoteJobTypeError, cache_store

log = logging.getLogger(__name__)


class JobTypeSource(Protocol):
    """What this needs of farmnode.master.link.MasterLink."""

    async def fetch_jobtype(self, name: str, version: int) -> dict[str, Any] | str: ...


async def refresh(master: JobTypeSource | None, cache_dir: str, name: str,
                  version: int) -> str | None:
    """Refresh the cache from the master; the run then uses the newest cached source.

    Returns why nothing new was cached (None: cached)."""
    if master is None:
        return "no master is configured to download it from"
    record = await master.fetch_jobtype(name, version)
    if isinstance(record, str):
        return f"the master did not serve it ({record})"
    # PyFarm's master may store no classname: the job type's name is the class then.
    classname = record.get("classname") or name
    code = record.get("code")
    if not isinstance(code, str):
        log.warning("job type %s v%d from the master has no code: %r", name, version,
                    sorted(record))
        return "the master's record of it has no code"
    try:
        cache_store(cache_dir, name, version, str(classname), code)
    except (RemoteJobTypeError, OSError) as exc:
        log.warning("job type %s v%d from the master not usable: %s", name, version, exc)
        return f"the master's record of it is not usable: {exc}"
    return None
