"""Host tests of how farmnode-api.service starts: the unit's command line loads the app, and
the garbage collector is off while gunicorn and the app are imported, back on (with the
imports frozen) before the worker is forked. The real start, under systemd's socket and
sandbox, is tests/system/test_api.py."""

from __future__ import annotations

import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

UNIT = Path(__file__).resolve().parent.parent / "units" / "farmnode-api.service"


def exec_start() -> list[str]:
    lines = [line for line in UNIT.read_text().splitlines() if line.startswith("ExecStart=")]
    assert len(lines) == 1, lines
    return shlex.split(lines[0].removeprefix("ExecStart="))


def test_unit_command_line_loads_the_app() -> None:
    argv = exec_start()
    # Started directly (LISTEN_PID is gunicorn's own), never bound by gunicorn itself.
    assert argv[:4] == ["/opt/farmnode/bin/python3", "-P", "-m", "farmnode.api"], argv
    assert "--bind" not in argv and not any(a.startswith("-b") for a in argv)
    # gunicorn's --check-config imports the app as a start would, then exits.
    r = subprocess.run([sys.executable, *argv[1:], "--check-config"], capture_output=True,
                       text=True, timeout=60, cwd="/")
    assert r.returncode == 0, r.stderr


def test_collector_off_during_the_start_and_on_before_the_fork() -> None:
    # In a child: the collector's state is process-wide.
    script = textwrap.dedent("""
        import gc
        from unittest import mock

        seen = []
        with mock.patch("gunicorn.app.wsgiapp.run", lambda prog: seen.append(gc.isenabled())):
            from farmnode.api.__main__ import main
            main()
        from farmnode.api import gunicorn_conf
        assert gunicorn_conf.preload_app is True  # the app is imported before the fork
        assert seen == [False], seen
        from types import SimpleNamespace
        from farmnode.api.app import create_app
        app = create_app()
        gunicorn_conf.when_ready(SimpleNamespace(app=SimpleNamespace(wsgi=lambda: app)))
        assert gc.isenabled() and gc.get_freeze_count() > 0
        # the master routed a request already: Falcon's router is compiled before the fork
        assert app._router._find != app._router._compile_and_find
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_ready_comes_from_the_worker_not_the_master(tmp_path: Path) -> None:
    # gunicorn's master would say READY=1 before forking the worker; `python3 -m
    # farmnode.api` hides NOTIFY_SOCKET from it, and the worker's post_worker_init says it.
    address = str(tmp_path / "notify")
    script = textwrap.dedent(f"""
        import logging, os, socket
        from types import SimpleNamespace
        from unittest import mock

        os.environ["NOTIFY_SOCKET"] = {address!r}
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind({address!r})
        sock.settimeout(10)
        seen = []
        with mock.patch("gunicorn.app.wsgiapp.run",
                        lambda prog: seen.append(os.environ.get("NOTIFY_SOCKET"))):
            from farmnode.api.__main__ import main
            main()
        assert seen == [None], seen
        from farmnode.api import gunicorn_conf
        gunicorn_conf.post_worker_init(SimpleNamespace(log=logging.getLogger("t")))
        print(sock.recv(4096).decode().replace("\\n", " "))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == "READY=1", r.stdout
