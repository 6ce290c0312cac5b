"""Every benchmark script in benchmarks/ runs at a tiny size (seconds), so a number in
docs/benchmarks.md always comes from a script that still works (issue 20: benchmarks rot unseen).

Each test runs its script as a user would (a subprocess, from the repository root, through its own
command-line options), with the services passed in the environment variables the script reads, and
checks that it exits cleanly and prints the numbers it exists to print: present, finite and positive
where a measurement cannot be zero. Speed is never asserted (targets are what the scripts print);
what is asserted beside the numbers is exact: no lost or doubled transition, every dashboard request
answered 200, and nothing the run made left behind (tables, queues, Redis keys). Every run has names
of its own (table prefixes, queues, Redis keys under this session's id), so it collides with no real
run and no parallel test session. ``benchmarks/chaos.py`` has its own test (tests/test_chaos.py).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest

from tests.helpers import ROOT, needs, unavailable

#: e2e.py starts real workers; every script writes to PostgreSQL and Redis
pytestmark = needs("postgres", "redis", "worker")
SESSION = os.environ["TEST_SESSION"]

#: the deadline of one run of a script at its tiny size (they take 2-15 s on a loaded 2-core machine)
DEADLINE = 120
#: a number as the scripts print it: 1,385 / 0.302 / +0 / nan / inf (the last two fail ``finite``)
NUM = r"[-+]?(?:[\d,]*\.?\d+|nan|inf)"


def finite(text: str) -> float:
    value = float(text.replace(",", ""))
    assert math.isfinite(value), f"{text!r} is not a finite number"
    return value


def positive(text: str) -> float:
    value = finite(text)
    assert value > 0, f"{text!r} is not positive"
    return value


def found(pattern: str, out: str, what: str) -> re.Match:
    """The line of ``out`` that matches ``pattern``, which must be there."""
    m = re.search(pattern, out, re.MULTILINE)
    assert m, f"no {what} printed"
    return m


def bench_env(**env: str) -> dict[str, str]:
    """The test's environment without any BENCH_* setting of the caller's, plus ``env``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("BENCH_")}
    return dict(base, PYTHONPATH=str(ROOT), BENCH_DATABASE_URL=os.environ["TEST_DATABASE_URL"],
                BENCH_REDIS_URL=os.environ["TEST_REDIS_URL"], **env)


def run(script: str, *args: str, env: dict[str, str]) -> str:
    """Run ``benchmarks/<script>`` to its end within DEADLINE; its standard output, once it exited 0.
    Past the deadline its whole process group (its worker, its writers) is stopped."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # a new session: the group is the script's own
        try:
            stdout, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
        pytest.fail(f"{script} {' '.join(args)} did not finish in {DEADLINE} s:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    print(stdout)
    assert proc.returncode == 0, f"{script} exited with {proc.returncode}:\n{stdout[-3000:]}\n{stderr[-5000:]}"
    return stdout


def name(kind: str, sep: str = "_") -> str:
    """A name stem of this run's own, under the session's id: ``cbt_<session>_<kind>_<random>_``."""
    return sep.join(("cbt", SESSION, kind, uuid.uuid4().hex[:6])) + sep


def tables_under(prefix: str) -> list[str]:
    import sqlalchemy as sa

    engine = sa.create_engine(os.environ["TEST_DATABASE_URL"])
    try:
        return sorted(t for t in sa.inspect(engine).get_table_names() if t.startswith(prefix))
    finally:
        engine.dispose()


def drop_tables(prefix: str) -> None:
    """What a failed run may have left: every table whose name starts with ``prefix``."""
    import sqlalchemy as sa

    left = tables_under(prefix)
    if left:
        engine = sa.create_engine(os.environ["TEST_DATABASE_URL"])
        with engine.begin() as conn:
            conn.exec_driver_sql(f"DROP TABLE IF EXISTS {', '.join(left)} CASCADE")
        engine.dispose()


def redis_keys(pattern: str) -> list[bytes]:
    import redis

    client = redis.Redis.from_url(os.environ["TEST_REDIS_URL"])
    try:
        return list(client.scan_iter(match=pattern, count=1000))
    finally:
        client.close()


def delete_redis_keys(pattern: str) -> None:
    import redis

    client = redis.Redis.from_url(os.environ["TEST_REDIS_URL"])
    with client:
        for key in list(client.scan_iter(match=pattern, count=1000)):
            client.delete(key)


def amqp_declared(broker_url: str, queue: str) -> list[str]:
    """Which of ``queue`` and the exchange of its name RabbitMQ still has (passive declares)."""
    from kombu import Connection

    found = []
    with Connection(broker_url) as conn:
        for kind in ("queue", "exchange"):
            try:
                with conn.channel() as channel:
                    if kind == "queue":
                        channel.queue_declare(queue, passive=True)
                    else:
                        channel.exchange_declare(queue, "direct", passive=True)
                found.append(kind)
            except conn.channel_errors:  # 404 NOT_FOUND
                pass
    return found


def rabbit_names() -> list[str]:
    """The queues and exchanges of RabbitMQ's default virtual host."""
    names = []
    for what in ("list_queues", "list_exchanges"):
        out = subprocess.run(["rabbitmqctl", "-q", what, "--no-table-headers", "name"], capture_output=True,
                             text=True, timeout=60, check=True).stdout
        names += out.split()
    return names


def delete_amqp(broker_url: str, queue: str) -> None:
    from kombu import Connection

    with Connection(broker_url) as conn:
        for delete in (lambda ch: ch.queue_delete(queue), lambda ch: ch.exchange_delete(queue)):
            try:
                with conn.channel() as channel:
                    delete(channel)
            except conn.channel_errors:
                pass


@pytest.mark.timeout(DEADLINE + 60)
def test_e2e(services: None) -> None:
    """benchmarks/e2e.py: delay(), delay() with acks_late, a chord and a batch of 20 tasks on one real
    worker, each timed and costed in CPU seconds per 1,000 jobs (its processes' /proc times), then a
    100-job batch's build and commit and its peak memory; --drop removes what it made.
    On Redis only (RabbitMQ would double the slowest test of the module; test_big runs on both)."""
    broker_url = os.environ["TEST_BROKER_URL"]
    prefix, queue = name("e2e"), name("e2e", "-")[:-1]
    keys = f"{queue}:"  # the run's results and counters
    env = bench_env(BENCH_BROKER_URL=broker_url, BENCH_PREFIX=prefix, BENCH_QUEUE=queue, BENCH_KEY_PREFIX=keys,
                    BENCH_SCRATCH_PREFIX=f"{prefix}p_")  # the probes' tables and queues (benchmarks/big.py)
    amqp = broker_url.startswith("amqp")
    try:
        out = run("e2e.py", "-n", "20", "--rounds", "1", "--commit-jobs", "100", "--memory-jobs", "100", "--drop",
                  env=env)
        for way in ("floor", "floor-late", "chord", "batch"):
            m = found(rf"^round 1: {way} +({NUM}) s +({NUM}) tasks/s$", out, f"round of {way!r}")
            positive(m[1]), positive(m[2])
            m = found(rf"^  {way} +({NUM}) s +({NUM}) tasks/s +({NUM})x floor$", out, f"median of {way!r}")
            positive(m[1]), positive(m[2]), positive(m[3])
            # CPU seconds per 1,000 jobs (benchmarks/cpu.py): each round's, then the medians' table
            m = found(rf"^round 1: {way} +cpu +({NUM}) s per 1000 jobs +\(producer ({NUM}) +worker ({NUM}) +postgres "
                      rf"({NUM}) +broker ({NUM}) +results ({NUM}) +pg_ours ({NUM})\)$", out, f"CPU of {way!r}")
            assert all(finite(v) >= 0 for v in m.groups()), m[0]
            assert finite(m[1]) == pytest.approx(sum(finite(v) for v in m.groups()[1:6]), abs=0.01), m[0]
            m = found(rf"^  {way} +((?: +{NUM}){{{7 if amqp else 6}}}) +({NUM}) +({NUM})$", out,
                      f"CPU median of {way!r}")  # total, its parts and pg_ours; wall and CPU x floor
            assert all(finite(v) >= 0 for v in m[1].split()), m[0]
            positive(m[2])
            assert m[3] == "nan" or finite(m[3]) >= 0, m[0]  # nan: the floor's CPU was below one tick
        found(rf"^N = 20 no-op tasks, broker {'amqp' if amqp else 'redis'}, ", out, "summary")
        found(r"^CPU seconds per 1,000 jobs, median of 1 round\(s\), ", out, "CPU header")
        found(r"^  noise: (no other PostgreSQL client backend|\d+ other PostgreSQL client backend\(s\)) ", out, "noise")
        for way in ("batch", "chord"):
            m = found(rf"^  cpu {way} / floor = ({NUM}) +\(wall ({NUM})\)$", out, f"CPU {way} / floor")
            assert m[1] == "nan" or finite(m[1]) >= 0
            positive(m[2])
        positive(found(rf"^  batch / floor = ({NUM}) ", out, "batch / floor")[1])
        positive(found(rf"^  chord / batch = ({NUM}) ", out, "chord / batch")[1])
        m = found(rf"^build a 100-job batch in memory: ({NUM}) s; commit it on postgresql: ({NUM}) s", out,
                  "build and commit time")
        assert finite(m[1]) >= 0
        positive(m[2])
        m = found(rf"^peak memory creating a 100-job batch: \+?({NUM}) MB over baseline", out, "peak memory")
        assert finite(m[1]) >= 0
        # --drop: the registry, the queue, the counters and the results are gone (and the probes' all along)
        assert f"dropped the tables under prefix {prefix!r}" in out
        assert tables_under(prefix) == []
        assert redis_keys(f"{keys}*") == [] and redis_keys(f"*{prefix}*") == []
        if amqp:
            assert amqp_declared(broker_url, queue) == []
        else:
            assert redis_keys(f"*{queue}*") == []
    finally:
        drop_tables(prefix)
        delete_redis_keys(f"{keys}*")
        delete_redis_keys(f"*{queue}*")
        delete_redis_keys(f"*{prefix}*")
        if amqp:
            delete_amqp(broker_url, queue)


@pytest.mark.timeout(DEADLINE + 60)
def test_big(broker_url: str) -> None:
    """benchmarks/big.py: build, commit and publish a batch of 100 and of 200 jobs, delay() measured
    for 100 and extrapolated for 200 (on RabbitMQ only the 100: each size is a fresh process or two);
    each probe's tables and queue are dropped."""
    amqp = broker_url.startswith("amqp")
    scratch = name("big")
    keys = f"{scratch}keys:"  # the app's results (none: no worker) and counters
    env = bench_env(BENCH_BROKER_URL=broker_url, BENCH_SCRATCH_PREFIX=scratch, BENCH_PREFIX=scratch + "app_",
                    BENCH_QUEUE=scratch + "app", BENCH_KEY_PREFIX=keys)
    try:
        out = run("big.py", "--sizes", "100" if amqp else "100,200", "--delay-max", "100", env=env)
        assert f"broker {'amqp' if amqp else 'redis'};" in out
        rows = {}
        for m in re.finditer(rf"^ *([\d,]+)((?: +{NUM}){{6}})(\*?) +({NUM})$", out, re.MULTILINE):
            build, commit, publish, total, peak, delay = m[2].split()
            assert all(finite(v) >= 0 for v in (build, commit, publish, peak))
            positive(total), positive(delay), positive(m[4])
            rows[int(m[1].replace(",", ""))] = m[3]
        assert rows == ({100: ""} if amqp else {100: "", 200: "*"}), f"rows printed (N: extrapolated mark): {rows}"
        assert amqp or "* delay() extrapolated linearly from N = 100" in out
        assert tables_under(scratch) == []
        assert redis_keys(f"*{scratch}*") == []  # the probes' queues and bindings, the app's keys
        if amqp and shutil.which("rabbitmqctl"):  # the probes' queues and their exchanges (durable) on RabbitMQ
            assert [n for n in rabbit_names() if n.startswith(scratch)] == []
    finally:
        drop_tables(scratch)
        delete_redis_keys(f"*{scratch}*")
        if amqp and shutil.which("rabbitmqctl"):
            for queue in {n for n in rabbit_names() if n.startswith(scratch)}:
                delete_amqp(broker_url, queue)


@pytest.mark.timeout(DEADLINE + 60)
def test_registry(services: None) -> None:
    """benchmarks/registry.py: pgbench's hot-row ceiling, then 100 transitions from 2 writer processes
    on one batch and over 100 batches: a rate each, none lost, none doubled; its tables are dropped."""
    if shutil.which("pgbench") is None:
        unavailable("pgbench is not installed (Debian: it comes with the PostgreSQL server package, postgresql-15)")
    scratch = name("reg")
    try:
        out = run("registry.py", "-n", "100", "--writers", "2", "--seconds", "1",
                  env=bench_env(BENCH_SCRATCH_PREFIX=scratch))
        positive(found(rf"^pgbench, one hot row, two statements a transaction, 2 clients: ({NUM}) tps$", out,
                       "pgbench ceiling")[1])
        for batches in (1, 100):
            m = found(rf"^100 transitions on {batches} batch\(es\), 2 writers: ({NUM})/s "
                      rf"= ({NUM})x the hot-row ceiling; lost (\d+), doubled (\d+)$", out, f"rate on {batches} batch(es)")
            positive(m[1])
            assert finite(m[2]) >= 0  # one decimal: a slow round may print 0.0
            assert (int(m[3]), int(m[4])) == (0, 0), f"{batches} batch(es): lost {m[3]}, doubled {m[4]}"
        assert tables_under(scratch) == []
    finally:
        drop_tables(scratch)


@pytest.mark.timeout(2 * DEADLINE + 60)
def test_dashboard(services: None) -> None:
    """benchmarks/dashboard.py: fill a fresh 1,100-batch registry and time every page and API call
    (all answered 200); then refill it over what the first run left (a tag row included: batch_tags
    references batches, which a TRUNCATE of batches alone refused) and drop it."""
    prefix = name("dash")
    env = bench_env(BENCH_DASHBOARD_PREFIX=prefix)

    def timings(out: str) -> dict[str, tuple[float, float]]:
        rows = {}
        for m in re.finditer(rf"^(.+?) +({NUM}) +({NUM})  (\d{{3}})$", out, re.MULTILINE):
            assert m[4] == "200", f"{m[1]!r} answered {m[4]}"
            median, worst = positive(m[2]), positive(m[3])
            assert worst >= median
            rows[m[1]] = (median, worst)
        return rows

    try:
        out = run("dashboard.py", "--batches", "1100", "--repeat", "1", env=env)
        m = found(rf"^filled in ({NUM}) s: 1,100 batches, ({NUM}) runs", out, "fill")
        assert finite(m[1]) >= 0 and positive(m[2])
        first = timings(out)
        for label in ("batches page, newest", "batch page, 1,000-batch tree", "GET /api/batches",
                      "POST /api/batches/<id>/cancel (100 pending jobs)"):
            assert label in first, f"{label!r} not timed"

        import sqlalchemy as sa

        engine = sa.create_engine(os.environ["TEST_DATABASE_URL"])
        with engine.begin() as conn:  # a tagged batch, as a real registry has
            conn.exec_driver_sql(f"INSERT INTO {prefix}batch_tags (tag, batch_id) SELECT 'bench', id "
                                 f"FROM {prefix}batches LIMIT 1")
        engine.dispose()

        out = run("dashboard.py", "--batches", "1100", "--repeat", "1", "--refill", "--drop", env=env)
        found(r"^filled in .* s: 1,100 batches", out, "refill")
        assert timings(out).keys() == first.keys()
        assert f"dropped the tables under prefix {prefix!r}" in out
        assert tables_under(prefix) == []
    finally:
        drop_tables(prefix)


@pytest.mark.timeout(DEADLINE + 60)
def test_looplag(services: None) -> None:
    """benchmarks/looplag.py: the event loop's lag while a batch of 200 jobs is created and published by
    ``abatch`` (with and without yielding), ``acreate_batch`` and a process pool, next to the sync
    builder's enqueue on the loop and a busy thread; each batch checked whole in the registry and on
    the queue; its tables and queue are dropped."""
    scratch = name("lag")
    try:
        out = run("looplag.py", "-n", "200", "--rounds", "1", "--floor-seconds", "0.2",
                  env=bench_env(BENCH_SCRATCH_PREFIX=scratch))
        found(r"^looplag: N = 200 jobs, postgresql \+ redis, tick 1\.0 ms, ", out, "header")
        positive(found(rf"^idle loop: max lag ({NUM}) ms", out, "idle lag")[1])
        for way in ("abatch", "abatch+yield", "abatch-nocede", "acreate_batch", "process", "eager", "thread-floor"):
            m = found(rf"^  {re.escape(way)} +max lag ({NUM}) ms \(enqueueing ({NUM}) ms, committing ({NUM}) ms\), "
                      rf"p99 lag ({NUM}) ms, enqueue ({NUM}) s, create\+publish ({NUM}) s$", out, f"summary of {way}")
            assert all(finite(v) >= 0 for v in m.groups()), m.groups()
            positive(m[1]), positive(m[6])
        found(rf"^dropped the tables under prefix '{re.escape(scratch)}\w+_' and the queue '{re.escape(scratch)}\w+-q'$",
              out, "what it dropped")
        assert tables_under(scratch) == []
        assert redis_keys(f"*{scratch}*") == []
    finally:
        drop_tables(scratch)
        delete_redis_keys(f"*{scratch}*")


#: a stand-in for a worker's main process: on "go" it starts two children that each burn 0.4 s of
#: CPU; it waits for (reaps) the first, leaves the second alive and asleep, and says "done"
FAKE_WORKER = """
import subprocess, sys, time
BURN = "import time\\nwhile time.process_time() < 0.4: pass\\nprint('burnt', flush=True)\\n"
print("ready", flush=True)
sys.stdin.readline()
gone = subprocess.Popen([sys.executable, "-c", BURN], stdout=subprocess.PIPE, text=True)
stays = subprocess.Popen([sys.executable, "-c", BURN + "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
gone.wait()
stays.stdout.readline()
print("done", flush=True)
sys.stdin.readline()
stays.kill()
"""


def test_cpu_sees_descendants_live_and_reaped() -> None:
    """benchmarks/cpu.py: the CPU a worker's descendants burn between two snapshots is counted,
    whether the process is still alive (its own utime+stime) or exited and was reaped (its parent's
    cutime+cstime); the producer's own time is this process's."""
    from benchmarks import cpu

    assert cpu.available()
    proc = subprocess.Popen([sys.executable, "-c", FAKE_WORKER], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        before = cpu.snapshot(proc.pid, "redis")
        t0 = time.process_time()
        while time.process_time() - t0 < 0.3:  # the producer burns too
            pass
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "done"
        spent = cpu.snapshot(proc.pid, "redis").minus(before)
        # two children of 0.4 s each (plus their interpreters' start-up), at 10 ms per tick
        assert spent.worker >= 0.75, spent
        assert spent.producer >= 0.25, spent
        assert all(getattr(spent, f) >= 0 for f in cpu.Cpu.PARTS), spent
        assert spent.total >= spent.worker + spent.producer
        per = spent.per(2000)
        assert per.worker == pytest.approx(spent.worker / 2)
    finally:
        proc.stdin.close()
        proc.wait(30)


def test_cpu_postgres_counts_reaped_backends() -> None:
    """benchmarks/cpu.py: a PostgreSQL backend that disconnects between two snapshots moves from the
    live children into the postmaster's cutime, so the sum over ``postgres`` neither loses nor
    doubles it; a process tree's reaped children count once."""
    from benchmarks import cpu

    def stat(pid: int, ppid: int, own: int, reaped: int = 0, comm: str = "postgres") -> cpu.Stat:
        return cpu.Stat(pid, comm, ppid, utime=own, stime=0, cutime=reaped, cstime=0)

    before = {1: stat(1, 0, 10, 5), 2: stat(2, 1, 30), 3: stat(3, 1, 7), 9: stat(9, 0, 99, 50, "python")}
    after = {1: stat(1, 0, 11, 5 + 40), 3: stat(3, 1, 9), 4: stat(4, 1, 3), 9: stat(9, 0, 199, 50, "python")}
    # backend 2 ran 10 more ticks and exited (reaped: 40 in cutime), 3 ran 2, 4 is new (3), the postmaster 1
    assert cpu.named_ticks("postgres", after) - cpu.named_ticks("postgres", before) == 10 + 2 + 3 + 1
    assert cpu.tree_ticks(1, after) == 11 + 45 + 9 + 3
    assert sorted(cpu.descendants(1, after)) == [1, 3, 4]

    st = cpu.read_stat("self")
    assert st.pid == os.getpid() and st.ppid == os.getppid() and st.own >= 0
