"""bus: org.farmnode.Agent1, the agent's one control surface, on the system bus.

interface.py declares the interface (used as-is as the client proxy by the CLI and the HTTP
API); service.py binds it to the agent core. May import farmnode.agent (service only) and sdbus.
"""
