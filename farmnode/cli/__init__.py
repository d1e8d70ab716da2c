"""cli: the `farmnode` command — a D-Bus client of org.farmnode.Agent1, plus `run` (the agent).

May import the client side of farmnode.bus (the proxy and its views), farmnode.tasks.schema (to
read files), farmnode.jobfile, farmnode.fleet, farmnode.systemd.journal (task logs),
farmnode.config and farmnode.agent.main (only for `run`); see tests/test_architecture.py.
"""
