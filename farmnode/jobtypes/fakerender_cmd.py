"""``farmnode-fakerender``: a stand-in renderer for tests, after PyFarm's pyfarm-dev-fakerender.

Owns: the CLI only. Imports the standard library only (no farmnode modules): it is spawned for
every fake task, inside memory-limited scopes, and must start fast and small.

Output protocol (stdout, one flushed line each; parsed by farmnode.jobtypes.fakerender)::

    fakerender: frame 3 started
    fakerender: frame 3 progress 0.50
    fakerender: frame 3 done

Randomness comes from one ``random.Random(--seed)``, drawn in a fixed order: the segfault draw
first (crash when < 0.25), then the return code, then the RAM jitter, then one duration jitter
per frame; so a seed reproduces a run exactly.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import signal
import sys
import time

PREFIX = "fakerender:"
PROGRESS_STEPS = 4
PAGE = 4096
SEGFAULT_CHANCE = 0.25


def _fmt(frame: float) -> str:
    return str(int(frame)) if float(frame).is_integer() else repr(float(frame))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="farmnode-fakerender",
        description="Very basic command line tool which vaguely simulates a render.",
    )
    p.add_argument("--ram", type=int, default=0, help="megabytes of RAM to allocate and touch")
    p.add_argument("--duration", type=float, default=0.0, help="seconds per frame")
    p.add_argument(
        "--return-code",
        type=int,
        action="append",
        dest="return_codes",
        help="exit code; repeat the flag for a random choice [default: 0]",
    )
    p.add_argument("--duration-jitter", type=float, default=0.0, help="± seconds per frame")
    p.add_argument("--ram-jitter", type=int, default=0, help="± megabytes")
    p.add_argument("-s", "--start", type=float, required=True, help="start frame")
    p.add_argument("-e", "--end", type=float, help="end frame [default: start]")
    p.add_argument("-b", "--by", type=float, default=1.0, help="frame step [default: 1]")
    p.add_argument(
        "--spew", action="store_true", help="write random lines instead of sleeping (log stress)"
    )
    p.add_argument(
        "--segfault",
        action="store_true",
        # %% : argparse %-formats help texts
        help=f"{SEGFAULT_CHANCE:.0%}% chance of a real SIGSEGV during the first frame",
    )
    p.add_argument(
        "--lines", type=int, default=0, help='print N numbered lines "line <frame>:<k>" per frame'
    )
    p.add_argument("--seed", type=int, help="seed for every random choice")
    p.add_argument("--error-lines", action="store_true", help="also write lines to stderr")
    return p


def frame_list(start: float, end: float, by: float) -> list[float]:
    # Multiply rather than accumulate so float steps (0.1) do not drift past the end frame.
    count = int((end - start) / by + 1e-9) + 1
    return [start + i * by for i in range(count)]


def allocate(megabytes: int) -> bytearray:
    """Allocate and write every page, so the memory is resident and charged to the cgroup."""
    size = max(0, megabytes) * 1024 * 1024
    buf = bytearray(size)
    if size:
        # An extended-slice assignment touches one byte per page in C: fast even for gigabytes.
        buf[::PAGE] = b"\x01" * len(range(0, size, PAGE))
    return buf


def segfault() -> None:
    # Reset first: faulthandler (PYTHONFAULTHANDLER) or an inherited handler would otherwise
    # turn this into a Python traceback instead of a death by signal. No core file: a test
    # crash should not fill /var/lib/systemd/coredump.
    import resource

    sys.stdout.flush()
    _, hard = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (0, hard))
    signal.signal(signal.SIGSEGV, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGSEGV)
    time.sleep(10)  # the signal is delivered before this returns; never reached in practice
    os._exit(139)


def _spew(rng: random.Random, frame: str, until: float) -> None:
    k = 0
    write = sys.stdout.write
    while time.monotonic() < until:
        for _ in range(100):
            k += 1
            write(f"spew {frame}:{k} {rng.getrandbits(256):064x}\n")


def main(argv: list[str] | None = None) -> int:
    # Die like a real renderer on a closed pipe or ^C instead of printing a Python traceback.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)
    if isinstance(sys.stderr, io.TextIOWrapper):
        sys.stderr.reconfigure(line_buffering=True)

    parser = build_parser()
    args = parser.parse_args(argv)
    end = args.start if args.end is None else args.end
    codes: list[int] = args.return_codes or [0]
    if args.by <= 0:
        parser.error("--by must be > 0")
    if end < args.start:
        parser.error("--end must be >= --start")
    if args.duration < 0 or args.duration_jitter < 0 or args.ram < 0 or args.ram_jitter < 0:
        parser.error("--ram, --duration and their jitters must be >= 0")
    if args.lines < 0:
        parser.error("--lines must be >= 0")
    if not all(0 <= c <= 255 for c in codes):
        parser.error("--return-code must be 0..255")

    rng = random.Random(args.seed)
    crash = rng.random() < SEGFAULT_CHANCE and args.segfault
    code = rng.choice(codes)
    ram = args.ram + (rng.randint(-args.ram_jitter, args.ram_jitter) if args.ram_jitter else 0)
    frames = frame_list(args.start, end, args.by)

    out = sys.stdout
    print(
        f"{PREFIX} pid {os.getpid()} frames {' '.join(_fmt(f) for f in frames)} "
        f"ram {max(0, ram)} MB return code {code}",
        file=out,
    )
    memory = allocate(ram)
    if ram > 0:
        print(f"{PREFIX} allocated {len(memory) // (1024 * 1024)} MB", file=out)

    for index, frame in enumerate(frames):
        f = _fmt(frame)
        jitter = rng.uniform(-args.duration_jitter, args.duration_jitter)
        duration = max(0.0, args.duration + jitter)
        print(f"{PREFIX} frame {f} started", file=out)
        for k in range(1, args.lines + 1):
            print(f"line {f}:{k}", file=out)
        if args.error_lines:
            print(f"{PREFIX} frame {f} warning: simulated warning", file=sys.stderr)
            print(f"{PREFIX} frame {f} error: simulated error", file=sys.stderr)
        for step in range(1, PROGRESS_STEPS + 1):
            until = time.monotonic() + duration / PROGRESS_STEPS
            if args.spew:
                _spew(rng, f, until)
            else:
                time.sleep(max(0.0, until - time.monotonic()))
            print(f"{PREFIX} frame {f} progress {step / PROGRESS_STEPS:.2f}", file=out)
            if crash and index == 0 and step == PROGRESS_STEPS // 2:
                print(f"{PREFIX} frame {f} segfaulting", file=out)
                segfault()
        print(f"{PREFIX} frame {f} done", file=out)

    print(f"{PREFIX} exiting with code {code}", file=out)
    out.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
