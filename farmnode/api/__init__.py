"""api: the socket-activated HTTP API the master talks to.

A Falcon WSGI app under gunicorn in farmnode-api.service: no state, no privilege, a client of
org.farmnode.Agent1 only. May import farmnode.bus.interface and farmnode.config.
"""
