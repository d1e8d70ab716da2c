"""api: the socket-activated HTTP API the master talks to.

A Falcon WSGI app under gunicorn in farmnode-api.service: no state, no privilege, a client of
org.farmnode.Agent1 only. May import the client side of farmnode.bus, farmnode.config,
farmnode.tasks (task logs), farmnode.master.trust and farmnode.systemd.manager (to follow an
agent restart); see tests/test_architecture.py.
"""
