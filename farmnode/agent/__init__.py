"""agent: the core of farmnode.service — assignments, task states, the run loop.

May import farmnode.config, farmnode.tasks, farmnode.jobtypes and farmnode.systemd; never the
bus, the CLI or the HTTP API (they are its clients).
"""
