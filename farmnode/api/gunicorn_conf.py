"""gunicorn settings for farmnode-api.service (`python3 -m farmnode.api -c
python:farmnode.api.gunicorn_conf ...`, see farmnode.api.__main__).

The listening sockets come from systemd (LISTEN_FDS): no `bind` here. Threads rather than
processes: requests mostly wait on D-Bus, and an event stream holds one thread.
"""

from __future__ import annotations

import gc
from typing import Any

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
    """In the master, after the app is loaded and before the worker is forked: keep what
    the start imported out of the garbage collector's reach (it is never garbage; the
    worker's collector then neither scans nor copies those pages) and switch the collector
    back on, which `python3 -m farmnode.api` switched off for the start."""
    gc.freeze()
    gc.enable()
