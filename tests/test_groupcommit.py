"""The group commit in isolation: grouping, ordering, retries of failed writes, flush on close."""

from __future__ import annotations

import logging
import threading

from celery_batches.models import RunStatus
from celery_batches.store import RunEvent
from celery_batches.worker.groupcommit import GroupCommit


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


def test_events_are_committed_in_groups_in_order():
    write = Recorder()
    gc = GroupCommit(write, interval=0.05, max_events=1000, max_delay=0.1)
    for e in events(200):
        gc.add(e)
    assert gc.flush(10)
    committed = [run_id for group in write.groups for run_id in group]
    assert committed == [f"r{i}" for i in range(200)]
    assert len(write.groups) < 200  # grouped, not one write per event
    gc.close()


def test_a_full_group_is_committed_without_waiting_for_the_interval():
    write = Recorder()
    gc = GroupCommit(write, interval=3600, max_events=10, max_delay=0.1)
    for e in events(10):
        gc.add(e)
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
    gc = GroupCommit(write, interval=3600, max_events=1000, max_delay=0.1)
    for e in events(3):
        gc.add(e)
    gc.close(timeout=5)
    assert write.groups == [["r0", "r1", "r2"]]
    gc.add(RunEvent("late", RunStatus.COMPLETED))  # adding after close starts a writer again
    assert gc.flush(5)
    assert write.groups[-1] == ["late"]
    gc.close(timeout=5)
