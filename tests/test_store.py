"""The state store: assignments, task states moving forward once, accounting, the outbox."""

from __future__ import annotations

from pathlib import Path

from farmnode.tasks.model import TaskState
from farmnode.tasks.schema import parse_assignment
from farmnode.tasks.store import Store


def _assignment(ids: list[int], aid: str = "a1"):  # type: ignore[no-untyped-def]
    return parse_assignment({
        "job": {"id": 7, "by": 1, "ram": 100},
        "jobtype": {"name": "command", "version": 1},
        "tasks": [{"id": i, "frame": n} for n, i in enumerate(ids, 1)],
    }, aid)


def test_states_move_forward_once_and_survive_reopening(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    store = Store(db)
    store.add_assignment(_assignment([1, 2]), "farmnode-task-1.scope")
    assert store.set_task_state("a1", 1, TaskState.RUNNING)
    assert not store.set_task_state("a1", 1, TaskState.RUNNING)  # same state: no change
    assert store.set_task_state("a1", 1, TaskState.DONE, exit_code=0)
    assert not store.set_task_state("a1", 1, TaskState.FAILED, "late")  # finished is final
    assert store.set_task_progress("a1", 2, 0.5)
    assert not store.set_task_progress("a1", 2, 0.5)
    store.set_accounting("a1", {"memory_peak": 123})
    store.close()
    store = Store(db)
    one, two = sorted(store.tasks("a1"), key=lambda r: r.id)
    assert (one.state, one.progress, one.exit_code) == (TaskState.DONE, 1.0, 0)
    assert (two.state, two.progress) == (TaskState.QUEUED, 0.5)
    assert one.accounting == {"memory_peak": 123} and one.unit == "farmnode-task-1.scope"
    assert [a.id for a in store.active_assignments()] == ["a1"]
    store.finish_assignment("a1")
    assert store.active_assignments() == []


def test_retry_of_a_task_is_a_new_row(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    store.add_assignment(_assignment([5], "first"), "u")
    store.set_task_state("first", 5, TaskState.FAILED, "exit code 1")
    store.add_assignment(_assignment([5], "second"), "u")
    latest = store.task(5)
    assert latest is not None and latest.assignment_id == "second"
    assert latest.state is TaskState.QUEUED


def test_outbox_only_with_a_master_in_order_and_progress_coalesced(tmp_path: Path) -> None:
    quiet = Store(tmp_path / "q.db")
    quiet.add_assignment(_assignment([1]), "u")
    quiet.set_task_state("a1", 1, TaskState.RUNNING)
    assert quiet.pending_count() == 0
    store = Store(tmp_path / "s.db", outbox=True)
    store.add_assignment(_assignment([1]), "u")
    store.set_task_state("a1", 1, TaskState.RUNNING)
    for p in (0.1, 0.2, 0.3):
        store.set_task_progress("a1", 1, p)
    store.set_task_state("a1", 1, TaskState.FAILED, "exit code 2")
    reports = store.pending_reports()
    # the log: registered before any state, marked with each state after the task's, its
    # upload queued before the last task's final state (PyFarm's order)
    assert [(r.kind, r.payload.get("state"), r.payload.get("progress")) for r in reports] == [
        ("log_register", None, None),
        ("task_state", "running", None),
        ("log_state", "running", None),
        ("task_progress", None, 0.3),  # only the latest undelivered progress is kept
        ("log_upload", None, None),
        ("task_state", "failed", None),
        ("log_state", "failed", None),
    ]
    assert reports[5].payload["reason"] == "exit code 2" and reports[0].job_id == 7
    log_id = reports[0].payload["identifier"]
    assert {r.payload["identifier"] for r in reports if r.kind.startswith("log_")} == {log_id}
    assert store.task_log_assignment(log_id) == "a1"
    store.ack_report(reports[0].seq)
    assert [r.seq for r in store.pending_reports()] == [r.seq for r in reports[1:]]


def test_database_of_an_older_build_is_migrated_in_place(tmp_path: Path) -> None:
    """A database without the assignments' jobtype column (what builds before it wrote) gains
    it, filled from each payload; a row an older build inserts later still reads right."""
    store = Store(tmp_path / "db")
    store.add_assignment(_assignment([1, 2]), "u1.scope")
    store.db.execute("ALTER TABLE assignments DROP COLUMN jobtype")
    store.close()
    store = Store(tmp_path / "db")
    assert [r.jobtype for r in store.tasks("a1")] == ["command", "command"]
    # an older build's insert names its own columns and leaves the new one empty
    store.add_assignment(_assignment([3], aid="a2"), "u2.scope")
    store.db.execute("UPDATE assignments SET jobtype=NULL WHERE id='a2'")
    assert [r.jobtype for r in store.tasks("a2")] == ["command"]
