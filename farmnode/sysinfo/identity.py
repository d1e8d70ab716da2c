"""The node's client-chosen UUID, derived from /etc/machine-id the way systemd does it.

systemd's `sd_id128_get_machine_app_specific()`: HMAC-SHA256 keyed by the machine ID over a
fixed application ID, truncated to 128 bits and stamped as a version-4 UUID. The machine ID
itself never leaves the host (it is meant to stay secret: machine-id(5)), and another
application on the same host derives an unrelated ID. Re-imaging a node keeps its farm
identity exactly when the image keeps /etc/machine-id.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from pathlib import Path

# farmnode's application ID (random, fixed forever: changing it renames every node).
APP_ID = uuid.UUID("585c1b91-8cfc-4fe2-829a-54f1b81f1728")
MACHINE_ID_PATH = Path("/etc/machine-id")


class NoMachineId(Exception):
    pass


def read_machine_id(path: Path = MACHINE_ID_PATH) -> bytes:
    text = path.read_text().strip() if path.exists() else ""
    # "uninitialized" (first boot, systemd 247+) or empty: not an identity yet.
    if len(text) != 32:
        raise NoMachineId(f"{path}: no machine ID ({text!r})")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise NoMachineId(f"{path}: not a machine ID ({text!r})") from None


def app_specific_uuid(machine_id: bytes, app_id: uuid.UUID = APP_ID) -> uuid.UUID:
    digest = bytearray(hmac.new(machine_id, app_id.bytes, hashlib.sha256).digest()[:16])
    # sd_id128_make_v4_uuid(): version 4, variant RFC 4122
    digest[6] = (digest[6] & 0x0F) | 0x40
    digest[8] = (digest[8] & 0x3F) | 0x80
    return uuid.UUID(bytes=bytes(digest))


def node_uuid(path: Path = MACHINE_ID_PATH) -> uuid.UUID:
    """The node's UUID; a random one when the host has no machine ID (the caller stores it)."""
    try:
        return app_specific_uuid(read_machine_id(path))
    except (NoMachineId, OSError):
        return uuid.uuid4()
