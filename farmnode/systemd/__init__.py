"""systemd: everything farmnode says to systemd and journald.

Owns the D-Bus proxies for org.freedesktop.systemd1 (transient scopes, stop, kill), the
per-task shim that runs first inside each scope, and journald writing. May import only the
standard library, sdbus and systemd-python: the agent core calls this package, never the
other way round.
"""
