"""Chaos soak: random batches under SIGKILLs, killed PostgreSQL backends and broker restarts.

For ``--minutes``, several producer processes create batches of random shapes (1-500 jobs, nested
up to three levels, continuations of every kind, continue-with stages, jobs added later, cancels,
retries, failures, members that replace themselves, continuations that retry, fail-fast batches,
windows of running jobs) against two real ``celery worker -P prefork -c 2`` nodes, while a fault
loop SIGKILLs pool processes and whole workers (restarting them), terminates the app's PostgreSQL
backends, restarts PgBouncer (when the registry is reached through it) and restarts the broker.
Then producers and faults stop, the workers keep running, and the soak waits (``--settle-timeout``)
for every batch to finish and checks the reliability contract (docs: "never stuck, never doubled"):
nothing stuck, counters equal the runs' final states at every level, every continuation that
should fire fired exactly once and no other did, no job attempt started twice unless Celery itself
redelivers it (acks_late), no batch_finished signal sent twice (or for a batch not finished, or with
another status). A batch_finished never sent is counted, not judged: the process that finished the
batch was killed (or its connection, as the commit went through) between the commit and the signal. Executions are counted in the shared Redis (127.0.0.1:6379 db 11),
which the broker restarts do not touch. Exit status 0 only if nothing is wrong.

The configuration is one cell of the matrix users deploy:

* ``--broker redis``: a private, non-persistent ``redis-server``; a restart loses its queues.
  ``--broker rabbitmq``: a private virtual host on the local RabbitMQ; a "restart" closes every
  connection to it (durable queues and persistent messages survive a real restart).
* ``--database direct``: PostgreSQL itself. ``--database pgbouncer``: producers and workers reach it
  through a private PgBouncer in transaction pooling mode (Debian's ``pgbouncer``).
* ``--profile defaults``: Celery's settings as shipped (no acks_late, no result backend).
  ``--profile acks-late``: ``task_acks_late`` for every task and a Redis result backend.

    python benchmarks/chaos.py [--minutes 10] [--seed N] [--broker redis|rabbitmq]
                               [--database direct|pgbouncer] [--profile defaults|acks-late]
                               [--producers 3] [--fault-interval 3] [--settle-timeout 600]
                               [--max-jobs 500] [--keep]

Needs PostgreSQL (127.0.0.1:5432, database ``test``, or CHAOS_DATABASE_URL), the shared Redis
(or CHAOS_COUNTER_URL), ``redis-server`` on PATH, and for the other cells ``rabbitmqctl`` and
``pgbouncer``. Everything it creates (``cbchaos_<hex>_`` tables, counter keys, the private broker
or virtual host, the bouncer, workers) is removed at the end; ``--keep`` keeps the tables and
counter keys to debug a violation, and the logs are kept whenever something failed.
"""

from __future__ import annotations

import argparse
import heapq
import json
import logging
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORK_TASKS = ("chaos.work",) * 7 + ("chaos.work_late", "chaos.plain_work", "chaos.work_replace")
CONTINUATION_TASKS = ("chaos.continuation", "chaos.continuation_member", "chaos.continuation_retry")
KINDS = ("success", "failure", "complete")  # continue-with's ``when`` too
CONTINUATION_KINDS = KINDS + ("first_failure",)
FAULTS = ("kill_pool_process", "kill_worker", "kill_pg_backends", "restart_broker")
VIOLATIONS = ("stuck", "doubled", "wrong counters", "continuations not exactly once", "batch_finished signals doubled",
              "metrics disagree")


def poll(check: Callable[[], Any], what: str, timeout: float, interval: float = 0.1) -> Any:
    """Poll until ``check`` returns something truthy; TimeoutError naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
    return result


# -- producers (each in a process of its own) ---------------------------------------------------------
@dataclass
class Node:
    """One batch of a planned tree: jobs (task name, spec), child batches, continuations (kind, task)."""

    jobs: list[tuple[str, dict]] = field(default_factory=list)
    children: list[Node] = field(default_factory=list)
    continuations: list[tuple[str, str]] = field(default_factory=list)
    fail_fast: bool = False  # cancel_on_failure
    window: int | None = None  # max_concurrency
    results: bool = False  # results=True (a root's choice: nested batches inherit it)


class Producer:
    """Creates random batches until ``until`` (epoch seconds) and survives every transient error.

    Each call's outcome is counted in the ``stats`` hash of the counter Redis; created batch ids go
    to the ``roots``/``stages`` sets and attempted cancels to ``cancelled``, so the checker knows
    what was asked for. The seed fixes the shapes; each job's outcome is fixed by its arguments.
    """

    BACKLOG = 1000  # messages waiting in the broker above which a producer waits for the workers

    def __init__(self, index: int, seed: int, until: float, max_jobs: int) -> None:
        from benchmarks import chaosapp

        self.batches, self.r, self.keys = chaosapp.batches, chaosapp.counters, chaosapp.KEYS
        self.max_retries, self.queue = chaosapp.MAX_RETRIES, chaosapp.app.conf.task_default_queue
        self.broker = chaosapp.app.connection_for_write()
        self.rng = random.Random(f"{seed}/producer/{index}")
        self.index, self.until, self.max_jobs = index, until, max_jobs
        self.actions: list[tuple[float, float, str, str]] = []  # heap of (due, tie-break, kind, batch id)

    def run(self) -> None:
        while time.time() < self.until:
            self.run_actions(time.monotonic())
            if self.has_room():
                self.create()
            else:
                time.sleep(0.05)
        self.run_actions(math.inf)  # time is up: do what the last batches planned, then stop

    def has_room(self) -> bool:
        """Don't outpace the workers: wait while the broker holds a long queue. A broker that does not
        answer (it is restarting) is no reason to wait: creating batches then is part of the test."""
        try:
            channel = self.broker.default_channel
            if self.broker.transport.driver_type == "redis":
                return channel.client.llen(self.queue) < self.BACKLOG
            return channel.queue_declare(self.queue, passive=True).message_count < self.BACKLOG
        except Exception:
            self.broker.close()
            self.broker = self.broker.clone()
            return True

    def plan(self, max_jobs: int, depth: int = 3) -> Node:
        """A random tree: 1..max_jobs jobs (log-uniform: mostly small) spread over up to ``depth`` levels."""
        rng, root = self.rng, Node()
        nodes = [root]
        for _ in range(rng.randint(1, 3) if depth > 1 and rng.random() < 0.5 else 0):
            root.children.append(child := Node())
            nodes.append(child)
            for _ in range(rng.randint(1, 2) if depth > 2 and rng.random() < 0.4 else 0):
                child.children.append(grandchild := Node())
                nodes.append(grandchild)
        fail_rate = 0.0 if rng.random() < 0.5 else rng.uniform(0.01, 0.1)
        for _ in range(max(1, min(max_jobs, int(math.exp(rng.uniform(0, math.log(max_jobs + 1))))))):
            rng.choice(nodes).jobs.append(self.job(fail_rate))
        for node in nodes:
            node.continuations += [(rng.choice(CONTINUATION_KINDS), rng.choice(CONTINUATION_TASKS))
                                   for _ in range(rng.choice((0, 0, 1, 2)))]
            node.fail_fast = fail_rate > 0 and rng.random() < 0.2
            node.window = rng.choice((None, None, None, None, 1, 3, 10))
        root.results = rng.random() < 0.3
        return root

    def job(self, fail_rate: float) -> tuple[str, dict]:
        rng = self.rng
        retries = 0 if rng.random() < 0.85 else rng.choice((1, 1, 2))
        if rng.random() < fail_rate / 2:
            retries = self.max_retries + 1  # exhausts its retries: FAILED
        return rng.choice(WORK_TASKS), {"sleep": 0 if rng.random() < 0.6 else round(rng.uniform(0, 0.2), 3),
                                        "retries": retries, "countdown": round(rng.uniform(0, 1), 2),
                                        "fail": rng.random() < fail_rate}

    def write(self, builder: Any, node: Node) -> list[str]:
        """Fill ``builder`` from ``node``; returns the ids of the batches written (its own and nested)."""
        ids = [builder.id]
        for task, spec in node.jobs:
            builder.enqueue(task, spec)
        for i, child in enumerate(node.children):
            with builder.batch(f"nested-{i}", cancel_on_failure=child.fail_fast, max_concurrency=child.window) as sub:
                ids += self.write(sub, child)
        for kind, task in node.continuations:
            getattr(builder, f"on_{kind}")(task, kind)
        return ids

    def create(self) -> None:
        """A new batch; maybe continue-with stages on it; maybe an add and a cancel a little later."""
        rng, node = self.rng, self.plan(self.max_jobs)

        def create_tree() -> list[str]:
            with self.batches.batch(f"chaos-p{self.index}", created_by=f"producer-{self.index}",
                                    cancel_on_failure=node.fail_fast, max_concurrency=node.window,
                                    results=node.results) as b:
                return self.write(b, node)

        ids = self.call("create", create_tree)
        if not ids:
            return
        self.r.sadd(f"{self.keys}:roots", ids[0])
        if rng.random() < 0.25:
            ids += self.stage(ids[0])
            if len(ids) > 1 and rng.random() < 0.3:
                ids += self.stage(ids[-1])
        now = time.monotonic()
        if rng.random() < 0.25:
            heapq.heappush(self.actions, (now + rng.uniform(0, 3), rng.random(), "add", rng.choice(ids)))
        if rng.random() < 0.1:
            heapq.heappush(self.actions, (now + rng.uniform(0, 5), rng.random(), "cancel", rng.choice(ids)))

    def stage(self, antecedent: str) -> list[str]:
        node, when = self.plan(min(self.max_jobs, 100)), self.rng.choice(KINDS)
        stage_id = self.call("stage", lambda: self.batches.continue_batch_with(
            antecedent, f"stage-{when}", lambda b: self.write(b, node), when=when, results=node.results))
        if stage_id:
            self.r.sadd(f"{self.keys}:stages", stage_id)
        return [stage_id] if stage_id else []

    def run_actions(self, now: float) -> None:
        while self.actions and self.actions[0][0] <= now:
            _, _, kind, batch_id = heapq.heappop(self.actions)
            if kind == "add":
                node = self.plan(20, depth=2)
                self.call("add", lambda: self.batches.add_jobs_to_batch(batch_id, lambda b: self.write(b, node)))  # noqa: B023
            else:
                self.r.sadd(f"{self.keys}:cancelled", batch_id)
                self.call("cancel", lambda: self.batches.cancel_batch(batch_id), attempts=5)  # noqa: B023

    def call(self, what: str, fn: Callable[[], Any], attempts: int = 1) -> Any:
        """Run one API call and count its outcome. A closed batch is an expected answer; anything else
        (a killed connection, the broker down) is counted and logged, and the producer moves on."""
        from celery_batches import BatchClosedError

        for attempt in range(1, attempts + 1):
            try:
                result = fn()
                self.r.hincrby(f"{self.keys}:stats", what)
                return result
            except BatchClosedError:
                self.r.hincrby(f"{self.keys}:stats", f"{what} (closed)")
                return None
            except Exception as exc:
                self.r.hincrby(f"{self.keys}:stats", f"{what} error: {type(exc).__name__}")
                print(f"producer {self.index}: {what} attempt {attempt} failed:", file=sys.stderr, flush=True)
                traceback.print_exc()
                time.sleep(0.2 * attempt)
        return None


# -- what the fault loop breaks ------------------------------------------------------------------------
class RedisBroker:
    """The private, non-persistent ``redis-server``: a restart loses every queued message."""

    def __init__(self, logdir: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url, self.logdir = f"redis://127.0.0.1:{self.port}/0", logdir
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        import redis

        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.logdir)], stdout=(self.logdir / "redis.log").open("ab"), stderr=subprocess.STDOUT)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)

        def pings() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        poll(pings, "the private redis-server to answer", 20, 0.05)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self, pause: float) -> None:
        self.kill()
        time.sleep(pause)
        self.start()

    cleanup = kill


class RabbitBroker:
    """A private virtual host on the local RabbitMQ. A "restart" closes every connection to it: what
    clients see when the broker restarts (its durable queues and persistent messages survive)."""

    def __init__(self, run: str) -> None:
        from benchmarks.services import RabbitVhost

        self.vhost = RabbitVhost(f"cbchaos_{run}")
        self.url = self.vhost.url

    def start(self) -> None:
        self.vhost.create()

    def restart(self, pause: float) -> None:
        self.vhost.close_connections()
        time.sleep(pause)

    def cleanup(self) -> None:
        self.vhost.delete()


class Worker:
    """A real ``celery -A benchmarks.chaosapp worker`` node; each (re)start logs to a new file."""

    def __init__(self, slot: int, logdir: Path, env: dict[str, str]) -> None:
        self.slot, self.logdir, self.env, self.starts = slot, logdir, env, 0
        self.proc: subprocess.Popen | None = None
        self.log = logdir / "none.log"

    def start(self) -> None:
        self.starts += 1
        self.log = self.logdir / f"worker-chaos{self.slot}-{self.starts}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "benchmarks.chaosapp", "worker", "-P", "prefork", "-c", "2",
             "-l", "INFO", "--without-gossip", "--without-mingle", "--without-heartbeat", "-n", f"chaos{self.slot}@%h"],
            cwd=ROOT, env=self.env, stdout=self.log.open("wb"), stderr=subprocess.STDOUT)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ready(self) -> bool:
        return self.alive() and " ready." in self.log.read_text(errors="replace")

    def children(self) -> list[int]:
        try:
            return [int(p) for p in Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()]
        except (OSError, AttributeError):
            return []

    def kill(self) -> None:
        """SIGKILL the pool processes, then the main one (stopped first, so it cannot fork a replacement)."""
        if self.alive():
            os.kill(self.proc.pid, signal.SIGSTOP)
            for pid in self.children():
                _kill(pid)
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class Faults:
    """Injects one fault at a time. Kinds come in shuffled rounds, so even a short run injects every
    kind; the seed fixes the sequence."""

    def __init__(self, rng: random.Random, workers: list[Worker], broker: Any, engine: Any,
                 app_names: list[str], bouncer: Any = None) -> None:
        self.rng, self.workers, self.broker, self.engine, self.app_names = rng, workers, broker, engine, app_names
        self.bouncer = bouncer
        self.kinds = FAULTS + (("restart_pgbouncer",) if bouncer is not None else ())
        self.count: Counter[str] = Counter()
        self.backends_killed = self.revived = 0
        self.round: list[str] = []

    def inject(self) -> str:
        self.round = self.round or self.rng.sample(self.kinds, len(self.kinds))
        kind = self.round.pop()
        getattr(self, kind)()
        self.count[kind] += 1
        return kind

    def kill_pool_process(self) -> None:
        """Like an OOM kill of one task's process."""
        if children := self.rng.choice(self.workers).children():
            _kill(self.rng.choice(children))

    def kill_worker(self) -> None:
        """A lost node, replaced after a moment under the same name."""
        worker = self.rng.choice(self.workers)
        worker.kill()
        time.sleep(self.rng.uniform(0.2, 3))
        worker.start()

    def kill_pg_backends(self) -> None:
        """Every connection of the app's workers and producers; never anyone else's."""
        import sqlalchemy as sa

        with self.engine.connect() as conn:
            self.backends_killed += len(conn.execute(sa.text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = ANY(:names) AND pid <> pg_backend_pid()"), {"names": self.app_names}).all())
            conn.commit()

    def restart_broker(self) -> None:
        self.broker.restart(self.rng.uniform(0.2, 3))

    def restart_pgbouncer(self) -> None:
        """Every client connection of producers and workers cut at once, then the bouncer back."""
        self.bouncer.stop()
        time.sleep(self.rng.uniform(0.2, 2))
        self.bouncer.start()

    def revive(self) -> None:
        """Restart a worker that died by itself (counted: it is worth knowing)."""
        for worker in self.workers:
            if not worker.alive():
                print(f"worker chaos{worker.slot} died by itself; see {worker.log}", flush=True)
                self.revived += 1
                worker.start()


# -- the check -----------------------------------------------------------------------------------------
class Checker:
    """Reads the whole registry in one snapshot, and the execution counts, and lists every violation.

    ``stuck``: a batch not finished. ``doubled``: a job attempt that started twice, except for
    acks_late tasks, which Celery redelivers itself. ``wrong counters``: a batch's counters against
    its direct runs and child batches, impossible outcomes, a stage started or cancelled against its
    antecedent's outcome, a kept result that is not what the job returned (``results=True``). ``continuations not exactly once``. The ``notes`` explain, without judging,
    why open runs are open (never sent, sent and lost, ran and the outcome lost) and what was allowed.
    """

    def __init__(self, mod: Any) -> None:
        import sqlalchemy as sa

        from celery_batches import BatchStatus

        self.max_retries, self.redelivered = mod.MAX_RETRIES, mod.redelivered_by_celery
        t, r, keys = mod.batches.transitions.tables, mod.counters, mod.KEYS
        with mod.batches.engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn, conn.begin():
            self.batches = conn.execute(sa.select(t.batches)).all()
            self.runs = conn.execute(sa.select(t.runs.c.id, t.runs.c.batch_id, t.runs.c.task_name, t.runs.c.status,
                                               t.runs.c.args, t.runs.c.published, t.runs.c.result)).all()
            self.conts = conn.execute(sa.select(t.continuations.c.id, t.continuations.c.batch_id,
                                                t.continuations.c.kind, t.continuations.c.status,
                                                t.continuations.c.task_name)).all()
        self.status = {row.id: BatchStatus(row.status) for row in self.batches}
        self.keeps = {row.id: bool(row.results) for row in self.batches}
        self.starts, self.ends, self.cont_runs, self.sent, self.replaced, self.cont_done, self.redelivered_by_broker = (
            {k.decode(): int(n) for k, n in r.hgetall(f"{keys}:{name}").items()}
            for name in ("starts", "ends", "continuations", "published", "replaced", "continuations_done",
                         "redelivered"))
        self.recorded = {kind: {m.decode() for m in r.smembers(f"{keys}:{kind}")}
                         for kind in ("roots", "stages", "cancelled")}
        self.publog = lambda: r.lrange(f"{keys}:publog", 0, -1)
        self.signals: dict[str, list[list[str]]] = defaultdict(list)  # batch id -> [status, app name, pid]
        for item in r.lrange(mod.FINISHED, 0, -1):
            batch_id, *rest = item.decode().split()
            self.signals[batch_id].append(rest)
        self.violations: dict[str, list[str]] = {kind: [] for kind in VIOLATIONS}
        self.notes: Counter[str] = Counter()
        self.check_batches()
        self.check_runs()
        self.check_continuations()
        self.check_signals()
        self.check_metrics(mod.batches)

    def check_metrics(self, batches: Any) -> None:
        """The metrics' maintained counts (triggers on ``batches``, store/tallies.py) against the rows,
        once everything settled: batches and runs by status."""
        from celery_batches import BatchStatus, RunStatus, metrics

        snap = metrics.snapshot(batches)
        rows = ({s.name.lower(): sum(1 for b in self.batches if b.status == s) for s in BatchStatus},
                {s.name.lower(): sum(1 for r in self.runs if r.status == s) for s in RunStatus})
        for kind, said, counted in (("batches", snap.batches, rows[0]), ("runs", snap.runs, rows[1])):
            if said != counted:
                self.violations["metrics disagree"].append(f"{kind}: metrics {said}, rows {counted}")

    def check_batches(self) -> None:
        from celery_batches import BatchStatus, RunStatus

        units: dict[str, Counter[str]] = defaultdict(Counter)  # direct runs and child batches, by final state
        for run in self.runs:
            s = RunStatus(run.status)
            units[run.batch_id].update(["total", s.name if s.is_final else "open"])
        for row in self.batches:
            if row.parent_id:
                s = self.status[row.id]
                units[row.parent_id].update(["total", s.name if s.is_final else "open"])
        fires = {"success": ("COMPLETED",), "failure": ("FAILED",), "complete": ("COMPLETED", "FAILED")}
        for row in self.batches:
            u, s, problems = units[row.id], self.status[row.id], []
            for name, stored in (("total", row.total_jobs), ("COMPLETED", row.completed_jobs),
                                 ("FAILED", row.failed_jobs), ("CANCELLED", row.cancelled_jobs)):
                if stored != u[name]:
                    problems.append(f"{name.lower()} {stored} but {u[name]} unit(s)")
            if s.is_final and u["open"]:
                problems.append(f"{s.name} with {u['open']} unfinished unit(s)")
            if s == BatchStatus.COMPLETED and u["COMPLETED"] != u["total"]:
                problems.append("COMPLETED but not every unit completed")
            if s == BatchStatus.FAILED and u["COMPLETED"] == u["total"]:
                problems.append("FAILED but every unit completed")
            before = self.status.get(row.antecedent_id)  # a stage that was not cancelled itself
            if (before and before.is_final and s.is_final and row.id not in self.recorded["cancelled"]
                    and (before.name in fires[row.continue_when]) == (s == BatchStatus.CANCELLED)):
                problems.append(f"stage ({row.continue_when}) is {s.name} after its antecedent {before.name}")
            if problems:
                self.violations["wrong counters"].append(f"batch {row.id} ({s.name}): " + "; ".join(problems))
            if not s.is_final:
                kind = "nested" if row.parent_id else "stage" if row.antecedent_id else "top-level"
                self.violations["stuck"].append(
                    f"batch {row.id} ({kind}, {s.name}, {u['open']} of {u['total']} unit(s) unfinished)")
        for batch_id in (self.recorded["roots"] | self.recorded["stages"]) - self.status.keys():
            self.violations["wrong counters"].append(f"batch {batch_id}: created (the call returned), not stored")

    def check_runs(self) -> None:
        from celery_batches import RunStatus

        doubled: list[list[str]] = []
        for run in self.runs:
            s, spec = RunStatus(run.status), json.loads(run.args)[0]
            attempts = [f"{run.id}:{a}" for a in range(self.max_retries + 2) if f"{run.id}:{a}" in self.starts]
            if self.replaced.get(str(run.id), 0) > 1:  # the body of a member that replaced itself
                if self.redelivered(run.task_name):
                    self.notes["acks_late replacing members re-executed (allowed)"] += 1
                else:
                    self.violations["doubled"].append(f"run {run.id} ({run.task_name}, {s.name}): replaced "
                                                      f"itself {self.replaced[str(run.id)]}x")
            if run.task_name == "chaos.work_replace":
                self.notes["members that replaced themselves"] += str(run.id) in self.replaced
            if twice := [f for f in attempts if self.starts[f] > 1]:
                if self.redelivered(run.task_name):
                    self.notes["acks_late runs re-executed (allowed)"] += 1
                elif run.task_name == "chaos.plain_work" and all(self.redelivered_by_broker.get(f) for f in twice):
                    # a plain task has no claim to skip it: the broker's own redelivery (an early
                    # acknowledgement lost with its connection) runs it again, as Celery would
                    self.notes["plain tasks the broker delivered again, run again (allowed)"] += 1
                else:
                    doubled.append(twice)
                    resent = any(self.sent.get(f, 0) > 1 for f in twice)
                    self.notes[f"doubled, sent {'twice' if resent else 'once'}"] += 1
                    self.violations["doubled"].append(f"run {run.id} ({run.task_name}, {s.name}): " + "; ".join(
                        f"attempt {f.rsplit(':', 1)[1]} started {self.starts[f]}x, ended {self.ends.get(f, 0)}x, "
                        f"sent {self.sent.get(f, 0)}x" for f in twice))
            wrong = self.violations["wrong counters"]
            if s == RunStatus.COMPLETED and not any(f in self.ends for f in attempts):
                wrong.append(f"run {run.id} ({run.task_name}): COMPLETED, never ran to the end")
            if s == RunStatus.COMPLETED and (spec["fail"] or spec["retries"] > self.max_retries):
                wrong.append(f"run {run.id} ({run.task_name}): COMPLETED, always fails")
            kept = json.dumps(str(run.id)) if s == RunStatus.COMPLETED and self.keeps[run.batch_id] else None
            if run.result != kept:  # a results=True batch keeps what each completed job returned (its id)
                wrong.append(f"run {run.id} ({run.task_name}, {s.name}): result {run.result!r}, not {kept!r}")
            if not s.is_final:
                self.notes[f"open run: {s.name}{'' if run.published else ' (unpublished)'}, "
                           f"{self.why_open(run.id, s, attempts)}"] += 1
        if doubled:  # name who sent the first few (the publish spy in chaosapp)
            senders: dict[str, list[str]] = defaultdict(list)
            for entry in self.publog():
                fld, who = entry.decode().split(" ", 1)
                senders[fld].append(who)
            for i, fields in enumerate(doubled[:5]):
                self.violations["doubled"][i] += " | sent by " + "; ".join(w for f in fields for w in senders[f])

    def why_open(self, run_id: str, s: Any, attempts: list[str]) -> str:
        """Never sent, sent and lost, or ran and its outcome lost: what recovery has to handle."""
        last = attempts[-1] if attempts else None
        if last is None or (s.name == "RETRYING" and last in self.ends):
            attempt = int(last.rsplit(":", 1)[1]) + 1 if last else 0
            sent = self.sent.get(f"{run_id}:{attempt}", 0)
            return f"message of attempt {attempt} " + (f"sent {sent}x, never ran" if sent else "never sent")
        ended = "ran to its end" if last in self.ends else "killed before its end"
        return f"attempt {last.rsplit(':', 1)[1]} {ended}"

    def check_continuations(self) -> None:
        """Exactly once if its batch finished the way its kind fires on; never otherwise."""
        from celery_batches.models import ContinuationStatus

        fires = {"COMPLETED": ("success", "complete"), "FAILED": ("failure", "complete")}
        failed = {row.id: row.failed_jobs for row in self.batches}
        for c in self.conts:
            s, ran, row = self.status[c.batch_id], self.cont_runs.get(str(c.id), 0), ContinuationStatus(c.status)
            # on_first_failure: once a unit failed, whatever the batch's end (a cancel can follow it)
            should = failed[c.batch_id] > 0 if c.kind == "first_failure" else c.kind in fires.get(s.name, ())
            expected = ContinuationStatus.DISPATCHED if should else ContinuationStatus.SKIPPED
            if should and ran > 1 and c.task_name == "chaos.continuation" and self.redelivered(c.task_name):
                self.notes["acks_late plain continuations re-executed (allowed)"] += 1
                ran = 1
            done = self.cont_done.get(str(c.id), 0)
            if c.task_name == "chaos.continuation_retry" and ran:
                self.notes[f"retrying continuations whose retry ran {min(done, 2)}x"] += 1
            if s.is_final:
                wrong = ran != should or row != expected or done > 1
            else:  # only a first failure fires before its batch ends
                wrong = ran > (c.kind == "first_failure" and failed[c.batch_id] > 0) or done > 1
            if wrong:
                self.violations["continuations not exactly once"].append(
                    f"continuation {c.id} ({c.task_name}, on_{c.kind} of {s.name} batch {c.batch_id}): row "
                    f"{row.name}, sent {self.sent.get(f'{c.id}:0', 0)}x, ran {ran}x, its retry ran {done}x")

    def check_signals(self) -> None:
        """``batch_finished``: at most once per batch, for a finished batch, with its status. None at
        all is counted apart (``lost``): the finishing process died between its commit and the signal."""
        self.signals_lost = 0
        for batch_id, s in ((str(row.id), self.status[row.id]) for row in self.batches):
            sent = self.signals.pop(batch_id, [])
            if not sent:
                self.signals_lost += s.is_final
            elif len(sent) > 1 or not s.is_final or sent[0][0] != s.name:
                self.violations["batch_finished signals doubled"].append(
                    f"batch {batch_id} ({s.name}): sent {len(sent)}x: " + "; ".join(" ".join(x) for x in sent))
        for batch_id, sent in self.signals.items():  # of no batch of this soak
            self.violations["batch_finished signals doubled"].append(f"batch {batch_id} (no such batch): {sent}")

    def table(self, soak: Soak, faults: Faults, settled: bool, minutes: float) -> str:
        from celery_batches import RunStatus

        a, v = soak.args, self.violations

        def fmt(counts: dict[str, int]) -> str:
            return ", ".join(f"{k} {n}" for k, n in sorted(counts.items())) or "none"

        nested = sum(1 for b in self.batches if b.parent_id)
        run_states = Counter(RunStatus(r.status).name for r in self.runs)
        rows = [
            ("run", f"seed {a.seed}, {a.minutes:g} min, {a.producers} producers, 2 workers, tables {soak.prefix}*"),
            ("cell", f"broker {a.broker}, database {a.database}, profile {a.profile}"),
            ("batches", f"top-level {len(self.recorded['roots'])}, total {len(self.batches)} "
                        f"(nested {nested}, stages {len(self.recorded['stages'])})"),
            ("batch states", fmt(Counter(s.name for s in self.status.values()))),
            ("jobs", f"{len(self.runs)} ({fmt(run_states)}), {sum(self.starts.values())} attempts started"),
            ("continuations", f"{len(self.conts)} rows, {sum(self.cont_runs.values())} executions"),
            ("faults injected", f"{fmt(faults.count)}; {faults.backends_killed} backends terminated"),
            ("producer calls", fmt(soak.stats())),
            ("workers that died by themselves", str(faults.revived)),
            *((kind, str(len(v[kind]))) for kind in VIOLATIONS),
            ("batch_finished signals not exactly once",
             f"{self.signals_lost + len(v['batch_finished signals doubled'])} (lost {self.signals_lost}: the "
             f"finishing process or its connection killed after the commit; doubled "
             f"{len(v['batch_finished signals doubled'])})"),
            ("minutes to settle", f"{minutes:.2f}" if settled else f"did not settle in {minutes:.2f}"),
            *((k, str(n)) for k, n in sorted(self.notes.items())),
        ]
        width = max(len(k) for k, _ in rows)
        out = ["-" * 100, *(f"{k:<{width}}  {val}" for k, val in rows), "-" * 100]
        for kind, lines in v.items():
            out += [f"\n{kind}: {len(lines)}, e.g.", *(f"  {line}" for line in lines[:5])] if lines else []
        return "\n".join(out)

    @property
    def ok(self) -> bool:
        return not any(self.violations.values())


# -- the run -------------------------------------------------------------------------------------------
class Soak:
    """The controller: starts the private broker, the registry and the workers, runs the producers
    and the fault loop, settles, checks, and always cleans up."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, run = args, uuid.uuid4().hex[:8]
        self.prefix, self.keys, self.app_name = f"cbchaos_{run}_", f"cbchaos:{run}", f"cbchaos_{run}"
        self.logdir = Path(tempfile.mkdtemp(prefix=f"cbchaos-{run}-"))
        self.broker = RabbitBroker(run) if args.broker == "rabbitmq" else RedisBroker(self.logdir)
        os.environ.update(CHAOS_BROKER_URL=self.broker.url, CHAOS_PREFIX=self.prefix, CHAOS_KEYS=self.keys,
                          CHAOS_PROFILE=args.profile,
                          CHAOS_APP_NAME=f"{self.app_name}-control")  # the fault loop spares this process
        os.environ.setdefault("CHAOS_COUNTER_URL", "redis://127.0.0.1:6379/11")
        os.environ.setdefault("CHAOS_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
        self.env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.bouncer = None
        if args.database == "pgbouncer":  # producers and workers go through it; this process (the checks) does not
            from benchmarks.services import PgBouncer

            self.bouncer = PgBouncer(os.environ["CHAOS_DATABASE_URL"], pool_size=8)
            self.env["CHAOS_DATABASE_URL"] = self.bouncer.url(os.environ["CHAOS_DATABASE_URL"])
        self.workers = [Worker(slot, self.logdir, dict(self.env, CHAOS_APP_NAME=f"{self.app_name}-worker"))
                        for slot in (1, 2)]
        self.producers: list[subprocess.Popen] = []

    def run(self) -> int:
        from benchmarks import chaosapp as mod

        args, ok, migrated = self.args, False, False
        print(f"chaos soak: seed {args.seed}, tables {self.prefix}*, logs in {self.logdir}", flush=True)
        try:
            self.broker.start()
            if self.bouncer is not None:
                self.bouncer.start()
            mod.batches.migrate()
            migrated = True
            for w in self.workers:
                w.start()
            poll(lambda: all(w.ready() or not w.alive() for w in self.workers), "the workers to start", 90, 0.2)
            if not all(w.alive() for w in self.workers):
                raise RuntimeError(f"a worker exited at start; see {self.logdir}")
            faults = Faults(random.Random(f"{args.seed}/faults"), self.workers, self.broker, mod.batches.engine,
                            [f"{self.app_name}-worker", f"{self.app_name}-producer"], self.bouncer)
            until = time.time() + args.minutes * 60
            self.start_producers(until)
            self.fault_loop(faults, until)
            self.wait_producers(timeout=180)
            faults.revive()
            poll(lambda: all(w.ready() for w in self.workers), "the workers to be ready", 90, 0.2)
            print(f"producers and faults stopped; settling (at most {args.settle_timeout:.0f}s)", flush=True)
            settled, minutes = self.settle(mod)
            self.drain(mod)
            checker = Checker(mod)
            print("\n" + checker.table(self, faults, settled, minutes), flush=True)
            ok = checker.ok
            return 0 if ok else 1
        finally:
            self.cleanup(mod, drop=migrated and not args.keep, keep_logs=not ok)

    def start_producers(self, until: float) -> None:
        env = dict(self.env, CHAOS_APP_NAME=f"{self.app_name}-producer")
        for i in range(self.args.producers):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--producer", str(i), "--until", str(until),
                   "--seed", str(self.args.seed), "--max-jobs", str(self.args.max_jobs)]
            log = (self.logdir / f"producer-{i}.log").open("wb")
            self.producers.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))

    def fault_loop(self, faults: Faults, until: float) -> None:
        rng = random.Random(f"{self.args.seed}/intervals")
        next_fault = time.time() + rng.uniform(0.5, 1.5) * self.args.fault_interval
        while time.time() < until:
            faults.revive()
            if time.time() >= next_fault:
                print(f"{time.strftime('%H:%M:%S')} fault: {faults.inject()}", flush=True)
                next_fault = time.time() + rng.uniform(0.5, 1.5) * self.args.fault_interval
            time.sleep(0.1)

    def wait_producers(self, timeout: float) -> None:
        """Each producer finishes its current batch and the adds/cancels it planned, then exits."""
        deadline = time.monotonic() + timeout
        for proc in self.producers:
            try:
                proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                print(f"producer {proc.pid} did not stop in time; killed", flush=True)
                proc.kill()
                proc.wait(10)

    def settle(self, mod: Any) -> tuple[bool, float]:
        """Poll until nothing is outstanding or the deadline passes; returns (settled, minutes)."""
        start = time.monotonic()
        deadline, report_at = start + self.args.settle_timeout, start
        while True:
            try:
                left = self.outstanding(mod)
            except Exception as exc:  # a read failing now is worth a line, not the run
                left = {"registry read failed": 1}
                print(f"settle: {exc}", flush=True)
            now = time.monotonic()
            if not any(left.values()) or now > deadline:
                return not any(left.values()), (now - start) / 60
            if now >= report_at:
                print(f"settling, {now - start:.0f}s: " + ", ".join(f"{k} {n}" for k, n in left.items()), flush=True)
                report_at = now + 30
            time.sleep(1)

    @staticmethod
    def outstanding(mod: Any) -> dict[str, int]:
        """What still has to happen before the registry is at rest (all zero then)."""
        import sqlalchemy as sa

        from celery_batches.models import ContinuationStatus

        t, count = mod.batches.transitions.tables, sa.func.count()
        with mod.batches.engine.connect() as conn:
            unfinished = conn.scalar(sa.select(count).where(t.batches.c.status < 2))
            open_runs = conn.scalar(sa.select(count).where(t.runs.c.status < 3))
            due = conn.scalar(sa.select(count).where(t.continuations.c.status == int(ContinuationStatus.DUE)))
            dispatched = conn.execute(sa.select(t.continuations.c.id).where(
                t.continuations.c.status == int(ContinuationStatus.DISPATCHED))).scalars().all()
        ran = mod.counters.hgetall(f"{mod.KEYS}:continuations")
        return {"unfinished batches": unfinished, "open runs": open_runs, "continuations due": due,
                "dispatched continuations not run": sum(1 for c in dispatched if str(c).encode() not in ran)}

    def drain(self, mod: Any, n: int = 40) -> None:
        """Sentinels sent behind everything on the queue: once all ran, every message published before
        them was taken (and, as quick as they are, run) by some worker, so late duplicates are counted."""
        key = f"{self.keys}:drain"
        try:
            for _ in range(n):
                mod.app.send_task("chaos.sentinel", (key,))
            poll(lambda: int(mod.counters.get(key) or 0) >= n, "the queue to drain", 120, 0.2)
        except Exception as exc:
            print(f"drain failed ({exc}): executions still queued are not counted", flush=True)

    @staticmethod
    def forget_outcomes(mod: Any) -> None:
        """The result backend's entries of this run's tasks (the acks-late profile keeps them)."""
        import sqlalchemy as sa

        if not mod.ACKS_LATE:
            return
        t = mod.batches.transitions.tables
        with mod.batches.engine.connect() as conn:
            ids = [*conn.execute(sa.select(t.runs.c.id)).scalars(),
                   *conn.execute(sa.select(t.continuations.c.id)).scalars()]
        for task_id in ids:
            mod.app.backend.forget(str(task_id))

    def stats(self) -> dict[str, int]:
        from benchmarks.chaosapp import counters

        return {k.decode(): int(n) for k, n in counters.hgetall(f"{self.keys}:stats").items()}

    def cleanup(self, mod: Any, drop: bool, keep_logs: bool) -> None:
        """Producers, workers, the private Redis, the tables and the counter keys, whatever happened."""
        from celery_batches.store import drop_schema

        for proc in self.producers:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        for step in [w.stop for w in self.workers] + [self.broker.cleanup] + (
                [self.bouncer.cleanup] if self.bouncer is not None else []):
            try:
                step()
            except Exception:
                traceback.print_exc()
        try:
            if drop:
                mod.batches.engine.dispose()
                self.forget_outcomes(mod)
                drop_schema(mod.batches.engine, self.prefix)
            keys = list(mod.counters.scan_iter(match=f"{self.keys}:*", count=1000))
            if keys and not self.args.keep:
                mod.counters.delete(*keys)
        except Exception:
            traceback.print_exc()
        if self.args.keep:
            print(f"kept: tables {self.prefix}* and counter keys {self.keys}:* in {os.environ['CHAOS_COUNTER_URL']}")
        if keep_logs:
            print(f"worker, producer and redis logs kept in {self.logdir}", flush=True)
        else:
            shutil.rmtree(self.logdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="how long producers and faults run")
    p.add_argument("--broker", choices=("redis", "rabbitmq"), default="redis")
    p.add_argument("--database", choices=("direct", "pgbouncer"), default="direct",
                   help="how producers and workers reach PostgreSQL")
    p.add_argument("--profile", choices=("defaults", "acks-late"), default="defaults",
                   help="Celery's settings as shipped, or acks_late for every task and a result backend")
    p.add_argument("--seed", type=int, default=None, help="fixes the batch shapes and the fault sequence")
    p.add_argument("--producers", type=int, default=3)
    p.add_argument("--fault-interval", type=float, default=3.0, help="mean seconds between two faults")
    p.add_argument("--settle-timeout", type=float, default=600.0, help="seconds the batches may take to finish")
    p.add_argument("--max-jobs", type=int, default=500, help="most jobs in one new batch")
    p.add_argument("--keep", action="store_true", help="keep the tables and counter keys (to debug a violation)")
    p.add_argument("--producer", type=int, default=None, help=argparse.SUPPRESS)  # internal: be producer N
    p.add_argument("--until", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.seed is None:
        args.seed = random.randrange(1 << 31)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: clean up
    if args.producer is not None:
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        Producer(args.producer, args.seed, args.until, args.max_jobs).run()
        return 0
    return Soak(args).run()


if __name__ == "__main__":
    sys.exit(main())
