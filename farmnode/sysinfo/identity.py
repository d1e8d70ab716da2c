"""The node's client-chosen UUID, derived from /etc/machine-id by systemd itself.

`sd_id128_get_machine_app_specific()` (systemd-python's `id128`) hashes the machine ID with
farmnode's fixed application ID: the machine ID never leaves the host (it is meant to stay
secret: machine-id(5)), and another application on the same host derives an unrelated ID.
Re-imaging a node keeps its farm identity exactly when the image keeps /etc/machine-id.
"""

from __future__ import annotations

import uuid

from systemd import id128

# farmnode's application ID (random, fixed forever: changing it renames every node).
APP_ID = uuid.UUID("585c1b91-8cfc-4fe2-829a-54f1b81f1728")


def node_uuid() -> uuid.UUID:
    """The node's UUID; a random one when the host has no machine ID (the caller stores it).

    sd-id128 refuses an empty or "uninitialized" /etc/machine-id (first boot, systemd 247+)
    with an OSError, as it does a missing one.
    """
    try:
        app_id: uuid.UUID = id128.get_machine_app_specific(APP_ID)
        return app_id
    except OSError:
        return uuid.uuid4()
