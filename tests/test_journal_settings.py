"""The journald side of task output that needs no journald: the per-scope settings files
(in the layout journald reads for a unit: src/journal/journald-context.c) and the line
format the shim writes with level prefixes. The system tier checks journald honours both."""

from __future__ import annotations

import os
import struct
from pathlib import Path

from farmnode.systemd.journal import (
    TaskLogFields,
    export_unit_settings,
    exported_units,
    format_line,
    remove_unit_settings,
    stream_of,
)


def records(data: bytes) -> list[bytes]:
    out = []
    while data:
        (n,) = struct.unpack_from("<Q", data)
        out.append(data[8:8 + n])
        data = data[8 + n:]
    return out


def test_settings_files_round_trip(tmp_path: Path) -> None:
    fields = TaskLogFields("farmnode-task-7.scope", 3, "a-b", (7, 8), "blender")
    export_unit_settings(fields, tmp_path)
    data = (tmp_path / "log-extra-fields:farmnode-task-7.scope").read_bytes()
    assert records(data) == [b"FARMNODE_JOB=3", b"FARMNODE_ASSIGNMENT=a-b",
                             b"FARMNODE_JOBTYPE=blender", b"FARMNODE_TASK=7",
                             b"FARMNODE_TASK=8"]
    assert os.readlink(tmp_path / "log-rate-limit-interval:farmnode-task-7.scope") == "1000000"
    assert os.readlink(tmp_path / "log-rate-limit-burst:farmnode-task-7.scope") == "1000000000"
    export_unit_settings(fields, tmp_path)  # again (a retried start): replaced, not an error
    (tmp_path / "invocation:farmnode-task-9.scope").symlink_to("x")  # systemd's own: not ours
    assert exported_units(tmp_path) == {"farmnode-task-7.scope"}
    remove_unit_settings("farmnode-task-7.scope", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["invocation:farmnode-task-9.scope"]
    remove_unit_settings("farmnode-task-7.scope", tmp_path)  # gone already: fine


def test_format_line() -> None:
    assert format_line(6, "Fra:1 | Sample 3/10") == b"<6>Fra:1 | Sample 3/10\n"
    assert format_line(3, "") == b"<3>\n"
    assert format_line(12, "x") == b"<7>x\n" and format_line(-1, "x") == b"<0>x\n"
    # a NUL would end the entry inside journald; an embedded newline keeps its priority
    assert format_line(4, "a\0b") == "<4>a\ufffdb\n".encode()
    assert format_line(3, "one\ntwo") == b"<3>one\n<3>two\n"
    assert format_line(6, "caf\u00e9") == "<6>caf\u00e9\n".encode()


def test_stream_of() -> None:
    assert stream_of({"SYSLOG_IDENTIFIER": "farmnode-stdout"}) == "stdout"
    assert stream_of({"SYSLOG_IDENTIFIER": "farmnode-stderr"}) == "stderr"
    assert stream_of({"SYSLOG_IDENTIFIER": "systemd"}) is None and stream_of({}) is None
