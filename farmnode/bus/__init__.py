"""bus: org.farmnode.Agent1, the agent's one control surface, on the system bus.

interface.py declares the interface (used as-is as the client proxy by the CLI and the HTTP
API); service.py binds it to the agent core. Only service.py and what it alone uses
(agent_props, errors, tasks) may import farmnode.agent; the clients' side (interface, client,
task1, views) imports no core, so the CLI and the HTTP API never load it.
"""
