"""agent: the core of farmnode.service — assignments, task states, the run loop.

core.py is the way in (`Agent`); its docstring says which module holds which concern.

May import farmnode.config, farmnode.tasks, farmnode.jobtypes, farmnode.warm, farmnode.systemd,
farmnode.sysinfo and farmnode.pathmap; never the bus, the CLI, the HTTP API or the master link
(they are its clients; what it needs of them it declares as Protocols). main.py, the daemon's
entry point, is the exception: it joins every part. tests/test_architecture.py holds the rules.
"""
