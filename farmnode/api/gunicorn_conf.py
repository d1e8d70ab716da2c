"""gunicorn settings for farmnode-api.service (`python3 -m farmnode.api -c
python:farmnode.api.gunicorn_conf ...`, see farmnode.api.__main__).

The listening sockets come from systemd (LISTEN_FDS): no `bind` here. Threads rather than
processes: requests mostly wait on D-Bus, and an event stream holds one thread.
"""

from __future__ import annotations

import gc
import os
from typing import Any

# Where `python3 -m farmnode.api` keeps systemd's NOTIFY_SOCKET away from gunicorn's master,
# which would say READY=1 before it has forked its worker: the worker says it instead.
NOTIFY_ENV = "FARMNODE_API_NOTIFY_SOCKET"

# gthread, with the request head read by the main loop and what one client may hold bounded
# (farmnode.api.worker explains the limits).
worker_class = "farmnode.api.worker.Worker"
workers = 1
threads = 32
# Connections open at once, kept-alive and half-read ones included (each peer address at most
# farmnode.api.worker.MAX_PER_PEER); farmnode-api.service's LimitNOFILE= leaves room for them.
worker_connections = 2000
# The app (Falcon, sdbus, the config loader) is imported once, by the master, before the
# worker is forked: an import error fails the start itself (before READY=1, not in a worker
# after systemd was told the service is up), and a worker that dies is replaced without
# importing anything. Nothing in the app opens a file, a thread or a bus connection at
# import time (client.py opens one per thread, on first use): nothing crosses the fork.
preload_app = True
# Event streams would hold a graceful stop for this long; they reconnect (retry: 2000).
graceful_timeout = 5
keepalive = 5
# 8 KiB request line and headers, as gunicorn's defaults; bodies are limited by the app.
limit_request_line = 8190
# gunicorn 27's control socket wants a writable path; the service has none and needs none.
control_socket_disable = True
accesslog = "-"
errorlog = "-"
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(M)sms "%(a)s"'
proc_name = "farmnode-api"


def when_ready(server: Any) -> None:
    """In the master, after the app is loaded and before the worker is forked: do once what
    the first request would otherwise pay for (`_warm`), then keep what the start imported
    out of the garbage collector's reach (it is never garbage; the worker's collector then
    neither scans nor copies those pages) and switch the collector back on, which `python3
    -m farmnode.api` switched off for the start."""
    _warm(server.app.wsgi())
    gc.freeze()
    gc.enable()


def _warm(app: Any) -> None:
    """One request through the app, in process, and the settings read: Falcon compiles its
    router on the first request it routes, the request path imports a few modules of its
    own, and the settings are parsed from the config files on first use. Done here, the
    forked worker inherits all three, and the master's first request after the agent said
    READY=1 costs what any other does. Nothing here touches the bus: /api/versions is
    public, and the worker opens its own connections."""
    from falcon import testing

    from farmnode.api import settings

    testing.simulate_get(app, "/api/versions")
    settings.current()


def post_worker_init(worker: Any) -> None:
    """In the worker, just before it starts accepting: warm one request thread, then
    READY=1. The agent waits for this before its own READY=1, so by the time `systemctl
    start farmnode` returns, a request is accepted at once rather than queued behind the
    worker's fork and start (about 10 ms after gunicorn's own, earlier READY=1). A worker
    that replaces one says it again, which systemd ignores."""
    pool = getattr(worker, "tpool", None)
    if pool is not None:
        # The pool hands the first request to this thread, idle by then.
        try:
            pool.submit(_warm_thread).result(timeout=5)
        except Exception as exc:  # only a slower first request
            worker.log.warning("could not warm a request thread: %s", exc)
    address = os.environ.get(NOTIFY_ENV)
    if address:
        from gunicorn import systemd

        os.environ["NOTIFY_SOCKET"] = address
        systemd.sd_notify("READY=1\nSTATUS=accepting requests", worker.log,
                          unset_environment=True)


def _warm_thread() -> None:
    """What a request thread opens on first use (client.py: one event loop and one bus
    connection per thread) and one round trip on it, to the bus itself: the agent may not
    own its name yet, and nothing here must wait for it."""
    import contextlib

    from farmnode.api import client

    loop, bus = client.connection()
    daemon = client.DbusDaemon.new_proxy(client.DBUS, "/org/freedesktop/DBus", bus)
    with contextlib.suppress(Exception):
        loop.run_until_complete(daemon.get_name_owner(client.DBUS))
