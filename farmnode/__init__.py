"""farmnode: the systemd-native render-node agent.

Packages, one per concern; data flows one way, input → agent core → systemd:
config (settings), jobtypes (how a job becomes a command and how its output is read),
tasks (assignment schema and the state store), systemd (scopes and journald), agent (the
core), bus (org.farmnode.Agent1 over D-Bus), cli (a D-Bus client), api (HTTP, a D-Bus client),
master (sync with the farm's master), sysinfo (host facts); pathmap (site path-mapping
rules, a module of its own because config and job types both need it) and describe (how a
refused value is named in errors, for the same reason). tests/test_architecture.py holds
which part may import which.
"""

__version__ = "0.1.0"
