"""Writing task output to journald, attributed to the task's scope.

journald attributes a stream to its opener, so lines are sent as native entries by the agent
(root) with OBJECT_SYSTEMD_UNIT naming the scope, which `journalctl -u <scope>` honours.
FARMNODE_TASK is repeated for every task of a batch so that `journalctl FARMNODE_TASK=<id>`
finds the lines of any of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from systemd import journal


@dataclass(frozen=True)
class TaskLogFields:
    unit: str
    job_id: int
    assignment_id: str
    task_ids: tuple[int, ...]

    def static_fields(self) -> list[str]:
        fields = [
            f"OBJECT_SYSTEMD_UNIT={self.unit}",
            f"FARMNODE_JOB={self.job_id}",
            f"FARMNODE_ASSIGNMENT={self.assignment_id}",
            "SYSLOG_IDENTIFIER=farmnode-task",
        ]
        fields += [f"FARMNODE_TASK={t}" for t in self.task_ids]
        return fields


STREAM_NAMES = ("stdout", "stderr")


def write_line(static: list[str], stream: int, line_no: int, offset: int, next_offset: int,
               priority: int, message: str) -> None:
    """One output line. FARMNODE_OFFSET/FARMNODE_NEXT are the bytes of the stream it came
    from: the last entry's FARMNODE_NEXT is where a restarted agent resumes (link.py)."""
    journal.sendv(
        f"MESSAGE={message}",
        f"PRIORITY={priority}",
        f"FARMNODE_STREAM={STREAM_NAMES[stream]}",
        f"FARMNODE_LINE={line_no}",
        f"FARMNODE_OFFSET={offset}",
        f"FARMNODE_NEXT={next_offset}",
        *static,
    )


def resume_point(assignment_id: str, stream: int) -> tuple[int, int]:
    """(offset, line number) after the last line journaled for the stream, (0, 0) if none.

    The caller must have made journald process what was sent to it (journalctl --sync)."""
    reader = journal.Reader()
    try:
        reader.add_match(FARMNODE_ASSIGNMENT=assignment_id,
                         FARMNODE_STREAM=STREAM_NAMES[stream])
        reader.seek_tail()
        entry = reader.get_previous()
        if not entry:
            return 0, 0
        return int(entry["FARMNODE_NEXT"]), int(entry["FARMNODE_LINE"])
    finally:
        reader.close()
