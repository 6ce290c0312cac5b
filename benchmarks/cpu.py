"""CPU seconds spent by every process a benchmark involves, read from /proc (Linux only).

Wall time alone hides cost: on a shared 2-core host a way can finish sooner by keeping more
processes busy, or later because a neighbour took the CPU. So e2e.py also reports what each way
*consumed*, summed over the processes that did its work: the producer (this process), the Celery
worker and its pool processes, the PostgreSQL backends and the broker (plus Redis as the result
backend when the broker is RabbitMQ).

One :func:`snapshot` is taken right before a way starts and one right after its wait ends; the
difference (:meth:`Snapshot.minus`) is what the way cost. The numbers come from ``/proc/<pid>/stat``
(fields ``utime``, ``stime``, ``cutime``, ``cstime``, in clock ticks of ``SC_CLK_TCK``, usually 10 ms):

- a live process's own time is ``utime + stime``;
- a process that exited during the way is no longer in /proc, but once its parent reaped it its
  time was added to the parent's ``cutime + cstime``. So for a parent we own (the worker's main
  process) and for the postmaster (which reaps every backend that disconnects) we count
  ``utime + stime + cutime + cstime``; a backend that was live in the first snapshot and reaped
  before the second moves from the "live children" sum into the postmaster's ``cutime``, and the
  difference stays right.

Whatever else runs on the host and uses the same PostgreSQL or Redis (a CI run, another benchmark)
is counted too: those servers do not say for whom they worked. :func:`other_postgres_clients`
counts the client backends present before a run so the output can say how noisy it may be, and
``pg_ours`` narrows PostgreSQL down to the backends whose client socket belongs to the producer or
the worker tree (matched by the client port in the backend's process title), which other clients
cannot inflate (but which misses background work such as WAL writing, and backends that left).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields
from typing import ClassVar
from pathlib import Path

PROC = Path("/proc")
#: clock ticks per second, the unit of every time in /proc/<pid>/stat
TICKS = os.sysconf("SC_CLK_TCK")
#: the process names (``/proc/<pid>/comm``) of the services
POSTGRES, REDIS, RABBITMQ = "postgres", "redis-server", "beam.smp"


@dataclass(frozen=True)
class Stat:
    """The fields of one ``/proc/<pid>/stat`` that CPU accounting needs (times in clock ticks)."""

    pid: int
    comm: str
    ppid: int
    utime: int
    stime: int
    cutime: int
    cstime: int

    @property
    def own(self) -> int:
        """Ticks this process ran itself (all its threads)."""
        return self.utime + self.stime

    @property
    def reaped(self) -> int:
        """Ticks of its children that exited and were waited for (they are gone from /proc)."""
        return self.cutime + self.cstime


def read_stat(pid: int | str) -> Stat | None:
    """``/proc/<pid>/stat`` parsed, or None if the process is gone (it may exit while we read).

    The name (field 2) is in parentheses and may itself contain spaces or ``)``, so the fields
    are split after the *last* ``)``."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    head, _, tail = text.rpartition(")")
    rest = tail.split()  # rest[0] is field 3 (state)
    return Stat(pid=int(head.partition(" ")[0]), comm=head.partition("(")[2], ppid=int(rest[1]),
                utime=int(rest[11]), stime=int(rest[12]), cutime=int(rest[13]), cstime=int(rest[14]))


def all_stats() -> dict[int, Stat]:
    """Every process visible in /proc, read in one pass (so one snapshot is one moment, nearly)."""
    stats = {}
    for entry in os.scandir(PROC):
        if entry.name.isdigit() and (st := read_stat(entry.name)) is not None:
            stats[st.pid] = st
    return stats


def descendants(root: int, stats: dict[int, Stat]) -> list[int]:
    """``root`` and every process below it (found by parent pid, which works without
    CONFIG_PROC_CHILDREN and sees grandchildren)."""
    children: dict[int, list[int]] = {}
    for st in stats.values():
        children.setdefault(st.ppid, []).append(st.pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            found.append(pid)
            todo.extend(children.get(pid, ()))
    return found


def tree_ticks(root: int, stats: dict[int, Stat]) -> int:
    """CPU ticks of a process tree: every live member's own time, plus the reaped children of each
    member (a pool process recycled by the worker shows up in the worker's ``cutime``)."""
    return sum(stats[pid].own + stats[pid].reaped for pid in descendants(root, stats))


def named_ticks(comm: str, stats: dict[int, Stat]) -> int:
    """CPU ticks of every process called ``comm``, and of the children the topmost of them reaped.

    For PostgreSQL the topmost is the postmaster: it reaps each backend that disconnects, so its
    ``cutime + cstime`` keeps the time of backends that came and went between two snapshots. For
    a single-process server (redis-server, beam.smp) ``cutime`` is ~0 and harmless."""
    named = [st for st in stats.values() if st.comm == comm]
    pids = {st.pid for st in named}
    tops = [st for st in named if st.ppid not in pids]
    return sum(st.own for st in named) + sum(st.reaped for st in tops)


@dataclass(frozen=True)
class Cpu:
    """CPU seconds by who spent them (the difference of two snapshots, or that scaled)."""

    producer: float = 0.0
    worker: float = 0.0
    #: every PostgreSQL process: this run's backends, but also other clients' and the background ones
    postgres: float = 0.0
    broker: float = 0.0
    #: Redis as the result backend and the benchmark's counters, when the broker is not Redis
    results: float = 0.0
    #: part of ``postgres``: only the backends whose client is the producer or the worker tree (not
    #: in ``total``); the rest of ``postgres`` is other clients, background processes and reaped backends
    pg_ours: float = 0.0

    #: the columns that add up to :attr:`total`
    PARTS: ClassVar[tuple[str, ...]] = ("producer", "worker", "postgres", "broker", "results")

    @property
    def total(self) -> float:
        return sum(getattr(self, name) for name in self.PARTS)

    def per(self, jobs: int, per: int = 1000) -> Cpu:
        """Scaled to ``per`` jobs (CPU seconds per 1,000 jobs by default)."""
        return Cpu(**{f.name: getattr(self, f.name) * per / jobs for f in fields(self)})


@dataclass(frozen=True)
class Snapshot:
    """CPU seconds so far, by who spent them (:class:`Cpu`), and the CPU ticks of each PostgreSQL
    backend serving this run, by pid (backends come and go, so they are subtracted one by one)."""

    cpu: Cpu
    our_backends: dict[int, int]

    def minus(self, before: Snapshot) -> Cpu:
        """What was spent between ``before`` and this snapshot. A backend of ours that appeared in
        between counts from zero; one that left in between is lost to ``pg_ours`` (not to ``postgres``,
        where the postmaster's ``cutime`` keeps it)."""
        ours = sum(t - before.our_backends.get(pid, 0) for pid, t in self.our_backends.items())
        diff = {f.name: getattr(self.cpu, f.name) - getattr(before.cpu, f.name) for f in fields(Cpu)}
        return Cpu(**dict(diff, pg_ours=ours / TICKS))


def socket_ports(pids: list[int]) -> set[int]:
    """The local TCP ports of the sockets the processes ``pids`` hold open: a PostgreSQL backend's
    title names its client's port, which is how a backend is known to serve this run."""
    inodes = set()
    for pid in pids:
        try:
            fds = os.scandir(PROC / str(pid) / "fd")
            for fd in fds:
                try:
                    target = os.readlink(fd.path)
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    ports = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if cols[9] in inodes:
                ports.add(int(cols[1].rpartition(":")[2], 16))
    return ports


#: a client backend's process title: "postgres: [cluster: ]user db 127.0.0.1(52326) idle"
CLIENT_PORT = re.compile(r" \S+\((\d+)\) ")


def backend_titles(stats: dict[int, Stat]) -> dict[int, str]:
    """The process titles of PostgreSQL's client backends by pid (``postgres: user db host(port)
    state``), not its background processes (checkpointer, walwriter, autovacuum launcher, ...)."""
    pids = {st.pid for st in stats.values() if st.comm == POSTGRES}
    titles = {}
    for st in stats.values():
        if st.comm != POSTGRES or st.ppid not in pids:
            continue  # the postmaster itself, or not PostgreSQL
        try:
            title = (PROC / str(st.pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        # a client backend's title has the user, the database and the client's address
        if title.startswith("postgres: ") and ("(" in title or "[local]" in title):
            titles[st.pid] = title
    return titles


def snapshot(worker_pid: int | None, broker: str) -> Snapshot:
    """CPU seconds so far of this process, the worker tree under ``worker_pid``, PostgreSQL, and the
    broker (``broker`` is Celery's transport name: ``redis`` or ``amqp``)."""
    stats = all_stats()
    me = read_stat("self")
    tree = descendants(worker_pid, stats) if worker_pid else []
    ports = socket_ports([me.pid, *tree])
    ours = {pid: stats[pid].own for pid, title in backend_titles(stats).items()
            if (m := CLIENT_PORT.search(title)) and int(m[1]) in ports}
    return Snapshot(Cpu(
        # own time only: the worker is this process's child, but it is counted as the worker (and
        # is only reaped at the end); /proc/self/stat sums all of this process's threads
        producer=me.own / TICKS,
        worker=tree_ticks(worker_pid, stats) / TICKS if worker_pid else 0.0,
        postgres=named_ticks(POSTGRES, stats) / TICKS,
        broker=named_ticks(REDIS if broker == "redis" else RABBITMQ, stats) / TICKS,
        results=named_ticks(REDIS, stats) / TICKS if broker != "redis" else 0.0,
    ), ours)


def other_postgres_clients() -> tuple[int, int]:
    """(client backends, of which active) present now: before the run, all of them are someone
    else's, and their work lands in the postgres column."""
    titles = list(backend_titles(all_stats()).values())
    # the state follows the client's address: "... 127.0.0.1(52326) idle", "... [local] UPDATE"
    active = [t for t in titles if not re.search(r"[)\]] idle\b", t)]
    return len(titles), len(active)


def available() -> bool:
    """Whether /proc can be read like this (Linux)."""
    return read_stat("self") is not None
