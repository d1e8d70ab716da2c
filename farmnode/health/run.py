"""`farmnode-health NAME`: one health check, run by farmnode-health@NAME.service.

An executable /etc/farmnode/health.d/NAME is exec'd in place (its output and exit status are
the unit's); otherwise NAME is a built-in check. Exit status 0 is a pass; the last lines of
output are the reason the agent shows when it fails.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from farmnode.config import Config, ConfigError, load_config
from farmnode.health import checks
from farmnode.health.checks import CheckResult

HEALTH_D = Path("/etc/farmnode/health.d")
EXIT_FAILED, EXIT_USAGE = 1, 2


def _network(config: Config) -> CheckResult:
    from farmnode.health import network  # pyroute2: only this check's process loads it

    return network.check(config.master)


BUILTINS: dict[str, Callable[[Config], CheckResult]] = {
    "scratch": lambda c: checks.scratch(c.health_scratch_path, c.health_scratch_min_free),
    "state": lambda c: checks.state_dir(c.agent_state_dir),
    "journald": lambda c: checks.journald(),
    "gpu": lambda c: checks.gpus(),
    "network": _network,
}


def dropin(name: str, directory: Path | None = None) -> Path | None:
    """The admin's executable of that name, if there is one."""
    path = (directory or HEALTH_D) / name
    if "/" in name or name.startswith(".") or not path.is_file():
        return None
    return path if os.access(path, os.X_OK) else None


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: farmnode-health NAME (a built-in check or an executable in "
              f"{HEALTH_D})", file=sys.stderr)
        return EXIT_USAGE
    name = args[0]
    program = dropin(name)
    if program is not None:
        os.execv(program, [str(program)])
    check = BUILTINS.get(name)
    if check is None:
        print(f"no health check {name!r}: not built in ({', '.join(BUILTINS)}) and no "
              f"executable {HEALTH_D / name}")
        return EXIT_USAGE
    try:
        config = load_config()
    except ConfigError as exc:
        print(f"the configuration does not load: {exc}")
        return EXIT_FAILED
    result = check(config)
    print(result.message, flush=True)
    return 0 if result.ok else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
