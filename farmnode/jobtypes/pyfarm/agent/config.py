"""``pyfarm.agent.config``: ``config``, the agent's settings as a job type sees them.

Filled by the host from what the agent hands it (master_api, agent_id, hostname, cpus, ram,
jobtype_expandvars, jobtype_default_environment); reading it changes nothing on the agent.
"""

from __future__ import annotations

from typing import Any

config: dict[str, Any] = {
    "jobtype_expandvars": True,
    "jobtype_default_environment": {},
}
