"""``pyfarm.agent.logger``: `getLogger`, whose records become lines of the task's log.

The host routes the ``pyfarm`` logger hierarchy into the task's output (journald, and the
task log the master shows) with a syslog priority per level; see remote_host.
"""

from __future__ import annotations

import logging


def getLogger(name: str) -> logging.Logger:
    return logging.getLogger(f"pyfarm.{name}")
