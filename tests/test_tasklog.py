"""Task logs in PyFarm's CSV: identifiers, the agent's own lines, the size cap."""

from __future__ import annotations

import csv
import io
import re
import uuid

from farmnode.tasks import tasklog
from farmnode.tasks.tasklog import InternalLine, OutputLine, TaskEnd


def rows(entries: list[tasklog.LogEntry]) -> list[list[str]]:
    return list(csv.reader(io.StringIO("".join(tasklog.csv_rows(entries)))))


def test_identifier_is_pyfarms_file_name_and_names_the_assignment() -> None:
    aid = str(uuid.uuid4())
    ident = tasklog.identifier(12, aid, 1_795_344_890.5)
    # PyFarm: $YEAR-$MONTH-$DAY_$HOUR-$MINUTE-$SECOND_$JOB_$PROCESS.csv, UTC
    assert ident == f"2026-11-22_10-54-50_12_{uuid.UUID(aid).hex}.csv"
    assert tasklog.assignment_of(ident) == aid
    assert "/" not in ident and "\\" not in ident
    for other in ("../x.csv", f"{aid}.csv", ident + "x", "1"):
        assert tasklog.assignment_of(other) is None


def test_exit_lines_say_what_pyfarm_said_and_why_a_task_failed() -> None:
    ok = tasklog.end_lines([TaskEnd(1, "done", None, 0, None, 10.0)], 7)
    assert [(e.message, e.pid) for e in ok] == [
        ("Process has terminated successfully, code 0", 7)]
    killed = tasklog.end_lines([TaskEnd(1, "failed", "timeout: ran longer", None, 9, 10.0),
                                TaskEnd(2, "done", None, None, 9, 9.0)], 7)
    assert [e.message for e in killed] == [
        "Process has not terminated successfully, code None (signal 9)",
        "Task 1 failed: timeout: ran longer"]
    never = tasklog.end_lines([TaskEnd(1, "failed", "user 'x' does not exist", None, None,
                                       3.0)], None)
    assert [e.message for e in never] == ["Task 1 failed: user 'x' does not exist"]
    assert tasklog.end_lines([TaskEnd(1, "running", None, None, None, None)], 7) == []


def test_a_log_over_the_cap_keeps_head_marker_tail_and_exit() -> None:
    output = (OutputLine(1000.0 + i, 0, f"line {i:05d} " + "x" * 80) for i in range(20000))
    start = [InternalLine(999.0, "Spawning process. Command: render")]
    end = [InternalLine(3000.0, "Process has terminated successfully, code 0", 5)]
    cap = 100_000
    got = list(tasklog.entries(start, output, end, pid=5, max_bytes=cap, where="journalctl X"))
    text = "".join(tasklog.csv_rows(got))
    assert len(text.encode()) < cap + 1000  # the cap, plus the agent's lines and the marker
    table = rows(got)
    assert table[0][4].startswith("Spawning process") and table[-1][4].startswith("Process has")
    (marker,) = [r for r in table if r[4].startswith("Log truncated")]
    first_left_out, last_left_out = map(int, re.findall(r"lines (\d+) to (\d+)", marker[4])[0])
    assert "journalctl X" in marker[4] and marker[2] == "internal"
    numbers = [int(r[3]) for r in table if r is not marker]
    # every kept row has its number in the full log; the gap is exactly what was left out
    kept_output = [int(r[3]) for r in table if r[2] == "0"]
    assert kept_output[0] == 2 and kept_output[-1] == 20001
    assert set(range(2, 20002)) - set(kept_output) == set(range(first_left_out,
                                                               last_left_out + 1))
    assert numbers == sorted(numbers)
    # the tail is kept too: the end of a failed render is what says why
    assert table[-2][4].startswith("line 19999")


def test_a_log_under_the_cap_is_whole() -> None:
    output = [OutputLine(1.0, 1, "only line")]
    got = list(tasklog.entries([], output, [], pid=None, max_bytes=1000))
    assert rows(got) == [["1970-01-01T00:00:01.000000", "None", "1", "1", "only line"]]


def test_building_a_huge_log_holds_a_bounded_amount_of_memory() -> None:
    """A log many times the cap is streamed: the peak is the kept tail, not the log."""
    import time
    import tracemalloc

    n, cap = 100_000, 1024 * 1024  # ~10 MB of CSV through a 1 MB cap
    output = (OutputLine(1000.0 + i, i % 2, f"frame {i} sample {i * 7} " + "y" * 60)
              for i in range(n))
    tracemalloc.start()
    t0 = time.perf_counter()
    size = sum(len(r.encode()) for r in tasklog.csv_rows(
        tasklog.entries([], output, [], pid=1, max_bytes=cap)))
    elapsed = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert cap - 1024 <= size < cap + 4096
    assert peak < cap, peak  # the tail's rows, with their overhead
    print(f"\n{n} lines through a {cap >> 20} MB cap: {size} bytes out, "
          f"peak {peak >> 10} KiB traced, {n / elapsed:,.0f} lines/s")
