"""The group commit in isolation: grouping, ordering, retries of failed writes, flush on close."""

from __future__ import annotations

import logging
import threading

from celery_batches.models import RunStatus
from celery_batches.store import RunEvent
from celery_batches.worker.groupcommit import GroupCommit
from tests.helpers import works_in_a_child_forked_while_held


class Recorder:
    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.groups: list[list[str]] = []
        self.lock = threading.Lock()

    def __call__(self, group) -> None:
        with self.lock:
            if self.failures:
                self.failures -= 1
                raise ConnectionError("registry unreachable")
            self.groups.append([e.run_id for e in group])


def events(n: int, prefix: str = "r") -> list[RunEvent]:
    return [RunEvent(f"{prefix}{i}", RunStatus.COMPLETED) for i in range(n)]


def filled(write: Recorder, n: int, *, interval: float, max_events: int = 1000) -> GroupCommit:
    """A group commit writing to ``write``, with ``n`` events added."""
    gc = GroupCommit(write, interval=interval, max_events=max_events, max_delay=0.1)
    for e in events(n):
        gc.add(e)
    return gc


def test_events_are_committed_in_groups_in_order():
    write = Recorder()
    gc = filled(write, 200, interval=0.05)
    assert gc.flush(10)
    committed = [run_id for group in write.groups for run_id in group]
    assert committed == [f"r{i}" for i in range(200)]
    assert len(write.groups) < 200  # grouped, not one write per event
    gc.close()


def test_a_full_group_is_committed_without_waiting_for_the_interval():
    write = Recorder()
    gc = filled(write, 10, interval=3600, max_events=10)
    assert gc.flush(5)  # would take an hour if the size trigger did not work
    assert write.groups == [[f"r{i}" for i in range(10)]]
    gc.close()


def test_a_failed_write_is_retried_and_logged_until_it_succeeds(caplog):
    write = Recorder(failures=3)
    gc = GroupCommit(write, interval=0.01, max_events=1000, max_delay=0.05)
    with caplog.at_level(logging.WARNING, logger="celery_batches.worker.groupcommit"):
        for e in events(5):
            gc.add(e)
        assert gc.flush(10)
    assert [run_id for group in write.groups for run_id in group] == [f"r{i}" for i in range(5)]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 3 and "failed" in errors[0].getMessage()
    assert any("succeeded after 3 retries" in r.getMessage() for r in caplog.records)
    gc.close()


def test_close_commits_what_is_buffered():
    write = Recorder()
    gc = filled(write, 3, interval=3600)
    gc.close(timeout=5)
    assert write.groups == [["r0", "r1", "r2"]]
    gc.add(RunEvent("late", RunStatus.COMPLETED))  # adding after close starts a writer again
    assert gc.flush(5)
    assert write.groups[-1] == ["late"]
    gc.close(timeout=5)


class Refusing:
    """A registry that refuses, for good, any group holding one of ``bad`` (as PostgreSQL refuses a
    malformed UUID or text it cannot store), and records the groups it committed."""

    def __init__(self, bad: set[str]) -> None:
        self.bad = bad
        self.committed: list[str] = []

    def __call__(self, group) -> None:
        if any(e.run_id in self.bad for e in group):
            raise ValueError("refused")
        self.committed += [e.run_id for e in group]


def test_a_refused_event_is_isolated_and_replaced_and_the_rest_committed_in_order():
    write = Refusing({"r7", "r42"})
    replaced = []

    def replace_refused(event, exc):
        replaced.append((event.run_id, str(exc)))
        return RunEvent(f"failed-{event.run_id}", RunStatus.FAILED, error=str(exc))

    gc = GroupCommit(write, interval=0.05, max_events=1000, max_delay=0.1,
                     refused_for_good=lambda exc: isinstance(exc, ValueError), replace_refused=replace_refused)
    for e in events(100):
        gc.add(e)
    assert gc.flush(10)
    good = [f"r{i}" for i in range(100) if i not in (7, 42)]
    assert [r for r in write.committed if not r.startswith("failed-")] == good
    assert sorted(r for r in write.committed if r.startswith("failed-")) == ["failed-r42", "failed-r7"]
    assert sorted(replaced) == [("r42", "refused"), ("r7", "refused")]
    gc.add(RunEvent("r200", RunStatus.COMPLETED))  # later transitions keep flowing
    assert gc.flush(10) and write.committed[-1] == "r200"
    gc.close()


def test_a_refused_replacement_is_dropped_not_retried_forever(caplog):
    write = Refusing({"r1", "failed-r1"})
    gc = GroupCommit(write, interval=0, max_events=1000, max_delay=0.1,
                     refused_for_good=lambda exc: isinstance(exc, ValueError),
                     replace_refused=lambda e, exc: RunEvent(f"failed-{e.run_id}", RunStatus.FAILED))
    with caplog.at_level(logging.ERROR):
        for e in events(3):
            gc.add(e)
        assert gc.flush(10)
    assert write.committed == ["r0", "r2"]
    assert "dropping it" in caplog.text
    gc.close()


def test_a_passing_failure_is_repeated_not_isolated():
    write = Recorder(failures=3)
    replaced = []
    gc = GroupCommit(write, interval=0.05, max_events=1000, max_delay=0.1,
                     refused_for_good=lambda exc: isinstance(exc, ValueError),
                     replace_refused=lambda e, exc: replaced.append(e))
    for e in events(10):
        gc.add(e)
    assert gc.flush(10)
    assert [r for g in write.groups for r in g] == [f"r{i}" for i in range(10)] and not replaced
    gc.close()


def test_a_forked_child_does_not_inherit_a_lock_held_by_the_parents_thread():
    """The relay thread may hold the group commit's lock at the instant a prefork worker forks;
    the child must still be able to buffer and commit its own transitions."""
    write = Recorder()
    gc = GroupCommit(write, interval=0, max_events=1000, max_delay=0.1)

    def child() -> bool:  # must not block on the lock its parent's thread holds
        gc.add(RunEvent("child", RunStatus.COMPLETED))
        return gc.flush(5) and write.groups == [["child"]]

    assert works_in_a_child_forked_while_held(gc._cond, child)
    gc.close()
