"""`python -m farmnode.api`: gunicorn, as farmnode-api.service starts it.

This is gunicorn's own command line (`gunicorn.app.wsgiapp.run`, the `gunicorn` script's
entry point) with one thing done first: the cyclic garbage collector is switched off before
gunicorn, Falcon, sdbus and the app are imported. The unit runs it directly (no shell that
forks), so LISTEN_PID is still this process and gunicorn takes systemd's socket.

Why: the agent says READY=1 only once this start is over (and a socket started by hand makes
its first request wait for it), and nearly all of it is importing modules (about 120 ms of
CPU in the test container, against about 10 ms for the interpreter). Imports allocate many
objects and make almost no garbage, so the collector's passes over the growing heap are pure
overhead there: about 7 % of the start. gunicorn_conf loads the app in the master
(preload_app) and, once it is loaded, freezes what was imported and switches the collector
back on (`when_ready`), before the worker is forked — CPython's documented recipe for
pre-fork servers (`gc.freeze`), which also keeps the collector from touching, and so copying,
the master's pages in the worker.
"""

from __future__ import annotations

import gc
import os

from farmnode.api.gunicorn_conf import NOTIFY_ENV


def main() -> None:
    gc.disable()  # gunicorn_conf.when_ready switches it back on
    # gunicorn's master says READY=1 before it has forked its worker; the API is ready only
    # once the worker accepts, which gunicorn_conf.post_worker_init says (NotifyAccess=all).
    notify = os.environ.pop("NOTIFY_SOCKET", None)
    if notify:
        os.environ[NOTIFY_ENV] = notify
    from gunicorn.app.wsgiapp import run

    run(prog="python3 -m farmnode.api")


if __name__ == "__main__":
    main()
