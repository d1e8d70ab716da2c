"""Tasks: what an assignment is (schema, validation) and where task state lives (SQLite store).

May import: farmnode.config and farmnode.describe. Must not import the agent, the bus or
systemd: the agent core builds on this package, not the other way round.
"""
