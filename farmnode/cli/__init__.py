"""cli: the `farmnode` command — a D-Bus client of org.farmnode.Agent1, plus `run` (the agent).

May import farmnode.bus.interface (the proxy), farmnode.tasks.schema (to read files),
farmnode.config and farmnode.agent.main (only for `run`).
"""
