"""celery_batches in a Django project: the example shop (``examples/django_shop``) on a PostgreSQL database
of this module's own, a real ``celery -A shop_project worker`` on Redis, Django's test client.

``connection=django.db.connection`` writes the registry rows on Django's own connection inside its
atomic block and publishes with ``transaction.on_commit``: a rollback anywhere (the whole transaction, an
exception after the batch block, a savepoint around the batch) leaves no row and no message. Django is
configured for this module only (``DJANGO_SETTINGS_MODULE`` of the example, reset afterwards), so no
other module sees a Django project. The rollback tests send their jobs to a queue no worker consumes, so
what was published can be counted at once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from celery_batches import BatchStatus, InvalidBatchError
from celery_batches.settings import Settings
from tests.helpers import ROOT, WAIT, csrf_from, eventually, needs, row_counts, session, worker_argv

SHOP = ROOT / "examples" / "django_shop"


class Boom(Exception):
    """Raised inside an atomic block to roll it back."""


# -- the Django project (module scope) ---------------------------------------------------------------
@pytest.fixture(scope="module")
def shop(services: None) -> Any:
    """The example shop, migrated (Django's tables, the orders app, the registry by ``manage.py
    batches_migrate``) in a fresh PostgreSQL database; Django is unconfigured again afterwards."""
    import django
    from django.conf import settings
    from django.utils.functional import empty

    url = sa.make_url(os.environ["TEST_DATABASE_URL"])
    name = f"cbt_{session()}_django"
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    env = {"DJANGO_SETTINGS_MODULE": "shop_project.settings", "SHOP_DB_NAME": name,
           "SHOP_DB_HOST": url.host or "", "SHOP_DB_PORT": str(url.port or 5432), "SHOP_DB_USER": url.username or "",
           "SHOP_DB_PASSWORD": url.password or "", "SHOP_BROKER_URL": os.environ["TEST_BROKER_URL"],
           "SHOP_QUEUE": f"cbt-{session()}-shop", "SHOP_DEBUG": "0"}
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(SHOP))
        mp.delenv("CELERY_BATCHES_DATABASE_URL", raising=False)
        for key, value in env.items():
            mp.setenv(key, value)
        try:
            django.setup()
            from django.core.management import call_command

            call_command("migrate", verbosity=0)
            call_command("batches_migrate", verbosity=0)
            import shop_project.celery

            shop_project.celery.batches.env = env
            yield shop_project.celery
        finally:
            from django.db import connections

            connections.close_all()
            if "shop_project.celery" in sys.modules:
                batches = sys.modules["shop_project.celery"].batches
                batches.engine.dispose()
                batches.app.connection_for_write().default_channel.client.delete(env["SHOP_QUEUE"])
            settings._wrapped = empty  # no Django project for the modules after this one
            with admin.connect() as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            admin.dispose()


@pytest.fixture(scope="module")
def shop_worker(shop: Any) -> Any:
    """``celery -A shop_project worker -P prefork -c 2`` on the shop's queue, once it is ready."""
    env = shop.batches.env
    log = Path(f"/tmp/celery_batches-worker-{session()}-django-shop.log")
    proc = subprocess.Popen([*worker_argv("shop_project", env["SHOP_QUEUE"]), "-n", f"shop-{session()}@%h"],
                            cwd=SHOP, env=dict(os.environ, PYTHONPATH=f"{SHOP}{os.pathsep}{ROOT}", **env),
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        eventually(lambda: proc.poll() is not None or b" ready." in log.read_bytes(), "the shop's worker to start", 60)
        assert proc.poll() is None, log.read_text()[-3000:]
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def nowhere(shop: Any) -> str:
    """A queue no worker consumes: what is published there stays, to be counted."""
    queue = f"cbt-nowhere-{uuid.uuid4().hex}"
    yield queue
    shop.app.connection_for_write().default_channel.client.delete(queue)


def queued(shop: Any, queue: str) -> int:
    return shop.app.connection_for_write().default_channel.client.llen(queue)


def charge(shop: Any, order_id: int, queue: str) -> Any:
    return shop.app.signature("orders.tasks.charge", (order_id,)).set(queue=queue)


def nothing_of(shop: Any, name: str, queue: str) -> bool:
    """No row of any batch called ``name``, and nothing published to ``queue``."""
    return set(row_counts(shop.batches, name=name).values()) == {0} and queued(shop, queue) == 0


# -- the transaction ------------------------------------------------------------------------------------
@needs("postgres", "redis")
def test_a_rolled_back_transaction_leaves_no_order_no_batch_no_message(shop, nowhere):
    from django.db import connection, transaction
    from orders.models import Order

    customer = uuid.uuid4().hex
    with pytest.raises(Boom):
        with transaction.atomic():
            order = Order.objects.create(customer=customer, total_cents=700)
            with shop.batches.batch(f"order-{customer}", connection=connection) as b:
                b.enqueue(charge(shop, order.pk, nowhere))
            assert shop.batches.get_batch(b.id) is None, "visible before Django's commit"
            raise Boom  # after the batch block, inside the atomic block
    assert not Order.objects.filter(customer=customer).exists()
    assert nothing_of(shop, f"order-{customer}", nowhere)


@needs("postgres", "redis")
def test_a_committed_transaction_publishes_after_the_commit(shop, nowhere):
    from django.db import connection, transaction
    from orders.models import Order

    customer = uuid.uuid4().hex
    with transaction.atomic():
        order = Order.objects.create(customer=customer, total_cents=700)
        with shop.batches.batch(f"order-{customer}", connection=connection) as b:
            b.enqueue(charge(shop, order.pk, nowhere))
            b.enqueue(charge(shop, order.pk, nowhere))
        assert queued(shop, nowhere) == 0, "published before Django's commit"
    assert queued(shop, nowhere) == 2  # transaction.on_commit published them as the block committed
    assert shop.batches.get_batch(b.id).total_jobs == 2


@needs("postgres", "redis")
def test_outside_an_atomic_block_the_batch_is_its_own_transaction(shop, nowhere):
    from django.db import connection

    assert connection.get_autocommit()
    with shop.batches.batch("autocommit", connection=connection) as b:
        b.enqueue(charge(shop, 0, nowhere))
    assert queued(shop, nowhere) == 1
    assert shop.batches.get_batch(b.id).total_jobs == 1


@needs("postgres", "redis")
def test_a_rolled_back_savepoint_around_the_batch_takes_only_the_batch(shop, nowhere):
    from django.db import connection, transaction
    from orders.models import Order

    customer = uuid.uuid4().hex
    with transaction.atomic():
        order = Order.objects.create(customer=customer, total_cents=700)
        with pytest.raises(Boom):
            with transaction.atomic():  # a savepoint
                with shop.batches.batch(f"order-{customer}", connection=connection) as b:
                    b.enqueue(charge(shop, order.pk, nowhere))
                raise Boom
    assert Order.objects.filter(customer=customer).exists()  # the outer transaction committed
    assert shop.batches.get_batch(b.id) is None
    assert nothing_of(shop, f"order-{customer}", nowhere)


@needs("postgres", "redis")
def test_every_write_joins_the_django_transaction(shop, nowhere):
    """reopen (add_jobs_to_batch), continue_batch_with and cancel_batch: rolled back, nothing; committed, done."""
    from django.db import connection, transaction

    batches = shop.batches
    with batches.batch("open", connection=connection) as b:
        b.enqueue(charge(shop, 0, nowhere))
    with pytest.raises(Boom), transaction.atomic():
        batches.add_jobs_to_batch(b.id, lambda more: more.enqueue(charge(shop, 0, nowhere)), connection=connection)
        stage = batches.continue_batch_with(b.id, "stage", lambda s: s.enqueue(charge(shop, 0, nowhere)),
                                            connection=connection)
        batches.cancel_batch(b.id, connection=connection)
        raise Boom
    assert (batches.get_batch(b.id).total_jobs, batches.get_batch(b.id).status) == (1, BatchStatus.STARTED)
    assert batches.get_batch(stage) is None
    assert queued(shop, nowhere) == 1
    with transaction.atomic():
        with batches.reopen(b.id, connection=connection) as more:
            more.enqueue(charge(shop, 0, nowhere))
        assert queued(shop, nowhere) == 1
    assert queued(shop, nowhere) == 2 and batches.get_batch(b.id).total_jobs == 2
    with transaction.atomic():
        assert batches.cancel_batch(b.id, connection=connection) == 2
        assert batches.get_batch(b.id).status == BatchStatus.STARTED  # not committed yet
    assert batches.get_batch(b.id).status == BatchStatus.CANCELLED


@needs("postgres", "redis")
def test_a_django_connection_to_another_database_is_refused(shop, pg_registry):
    """pg_registry lives in the test database, the Django connection in the shop's own."""
    from django.db import connection, transaction

    with pytest.raises(InvalidBatchError, match="Django's database 'default'"), transaction.atomic():
        with pg_registry.batch("elsewhere", connection=connection) as b:
            b.enqueue(pg_registry.app.signature("tests.proj.noop"))


@needs("postgres", "redis", "worker")
def test_an_order_placed_through_the_view_runs_and_confirms_once(shop, shop_worker):
    from django.test import Client
    from orders.models import Order
    from orders.tasks import confirm

    response = Client().post("/orders/", {"customer": "ann", "total_cents": 700})
    assert response.status_code == 201, response.content
    placed = json.loads(response.content)
    batch = shop.batches.wait(placed["batch"], timeout=WAIT)
    assert batch.status == BatchStatus.COMPLETED
    eventually(lambda: Order.objects.get(pk=placed["order"]).confirmations >= 1, "the continuation", WAIT)
    # sentinels behind it in the queue: once they ran, a second confirmation would have too
    sentinel = Order.objects.create(customer="sentinel", total_cents=0)
    for _ in range(4):
        confirm.delay(sentinel.pk)
    eventually(lambda: Order.objects.get(pk=sentinel.pk).confirmations == 4, "the queue to drain", WAIT)
    order = Order.objects.get(pk=placed["order"])
    assert (order.charged, order.packed, order.confirmations, order.batch_id) == (True, True, 1, placed["batch"])


# -- settings -------------------------------------------------------------------------------------------
@needs("postgres", "redis")
def test_batches_without_a_url_use_djangos_default_database_and_celery_batches_settings(shop):
    from django.db import connection

    url = shop.batches.engine.url
    assert (url.drivername, url.database) == ("postgresql+psycopg", connection.settings_dict["NAME"])
    assert connection.vendor == "postgresql" and connection.connection.__class__.__module__.startswith("psycopg")
    assert shop.batches.settings.table_prefix == "shop_batches_"  # CELERY_BATCHES_TABLE_PREFIX
    assert shop.app.conf.task_default_queue == shop.batches.env["SHOP_QUEUE"]  # CELERY_TASK_DEFAULT_QUEUE
    with connection.cursor() as cursor:
        tables = connection.introspection.table_names(cursor)
    assert {"shop_batches_batches", "shop_batches_runs", "orders_order"} <= set(tables)


def test_the_database_url_precedence(monkeypatch):
    """argument > app.conf.batches_database_url > CELERY_BATCHES_DATABASE_URL > Django's default > SQLite."""
    project = "postgresql+psycopg://django/db"
    monkeypatch.delenv("CELERY_BATCHES_DATABASE_URL", raising=False)

    def url(conf: dict, **overrides: Any) -> str:
        return Settings.resolve(conf, overrides, project_url=lambda: project).database_url

    assert url({}) == "postgresql+psycopg://django/db"
    monkeypatch.setenv("CELERY_BATCHES_DATABASE_URL", "postgresql+psycopg://env/db")
    assert url({}) == "postgresql+psycopg://env/db"
    assert url({"batches_database_url": "postgresql+psycopg://conf/db"}) == "postgresql+psycopg://conf/db"
    assert url({"batches_database_url": "sqlite:///c"}, database_url="sqlite:///arg") == "sqlite:///arg"
    monkeypatch.delenv("CELERY_BATCHES_DATABASE_URL")
    project = None
    assert url({}) == "sqlite:///celery_batches.sqlite3"


def test_djangos_database_settings_as_a_sqlalchemy_url(monkeypatch):
    from celery_batches.publishing import djangotx as db

    def url(**database: Any) -> str | None:
        monkeypatch.setattr(db, "_settings_database", lambda: database)
        return db.default_database_url()

    assert url(ENGINE="django.db.backends.postgresql", NAME="shop", USER="u", PASSWORD="p@ss", HOST="db", PORT="6432",
               OPTIONS={"sslmode": "require", "server_side_binding": True}) == \
        "postgresql+psycopg://u:p%40ss@db:6432/shop?sslmode=require"
    assert url(ENGINE="django.db.backends.postgresql", NAME="shop", USER="", PASSWORD="", HOST="", PORT="") == \
        "postgresql+psycopg:///shop"
    assert url(ENGINE="django.db.backends.sqlite3", NAME=Path("/srv/site/db.sqlite3")) == \
        "sqlite:////srv/site/db.sqlite3"
    assert url(ENGINE="django.db.backends.sqlite3", NAME=":memory:") is None
    assert url(ENGINE="django.db.backends.mysql", NAME="shop") is None


def test_a_django_sqlite_connection_and_the_registry_in_one_file_commit_and_roll_back_together(tmp_path):
    """In a process of its own (Django's settings are process-wide): Django on a SQLite file, Batches(app)
    with no URL on the same file; a rollback leaves no row, a commit leaves the batch."""
    script = textwrap.dedent(f"""
        import django
        from django.conf import settings
        settings.configure(DATABASES={{"default": {{"ENGINE": "django.db.backends.sqlite3",
                                                   "NAME": {str(tmp_path / "site.sqlite3")!r}}}}})
        django.setup()
        from celery import Celery
        from django.db import connection, transaction
        from celery_batches import Batches
        app = Celery("site", broker="memory://")
        batches = Batches(app)
        assert batches.settings.database_url == "sqlite:///" + settings.DATABASES["default"]["NAME"]
        batches.migrate()
        try:
            with transaction.atomic():
                with connection.cursor() as cursor:
                    cursor.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY)")
                with batches.batch("rolled-back", connection=connection) as gone:
                    gone.enqueue(app.signature("site.charge"))
                raise KeyError("after the batch block")
        except KeyError:
            pass
        assert batches.get_batch(gone.id) is None
        assert "orders" not in connection.introspection.table_names()
        with transaction.atomic():
            with batches.batch("committed", connection=connection) as kept:
                kept.enqueue(app.signature("site.charge"))
            batches.add_jobs_to_batch(kept.id, lambda b: b.enqueue(app.signature("site.charge")),
                                      connection=connection)
        assert batches.get_batch(kept.id).total_jobs == 2
        with app.connection_for_write() as broker:  # on_commit published both (the in-memory broker)
            assert broker.default_channel.queue_declare("celery", passive=True).message_count == 2
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("CELERY_BATCHES_DATABASE_URL", "DJANGO_SETTINGS_MODULE")}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=dict(env, PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "ok", done.stderr[-3000:]


# -- the dashboard in the admin's URL space -------------------------------------------------------------
@pytest.fixture(scope="module")
def staff(shop: Any) -> Any:
    from django.contrib.auth.models import User

    return User.objects.create_user(f"staff-{uuid.uuid4().hex[:8]}", password=uuid.uuid4().hex, is_staff=True)


@needs("postgres", "redis")
def test_the_dashboard_is_for_staff_and_anonymous_users_go_to_the_login_page(shop, staff):
    from django.contrib.auth.models import User
    from django.test import Client

    anonymous = Client().get("/admin/batches/")
    assert anonymous.status_code == 302 and anonymous["Location"] == "/admin/login/?next=/admin/batches/"
    customer = Client()
    customer.force_login(User.objects.create_user(f"customer-{uuid.uuid4().hex[:8]}"))
    assert customer.get("/admin/batches/").status_code == 403
    client = Client()
    client.force_login(staff)
    page = client.get("/admin/batches/")
    assert page.status_code == 200 and b"Celery batches" in page.content
    assert b'href="/admin/batches/static/' in page.content  # its URLs start with the mount prefix
    api = client.get("/admin/batches/api/batches")
    assert api.status_code == 200 and api["Content-Type"].startswith("application/json")


@needs("postgres", "redis")
def test_a_cancel_through_the_django_mount_needs_the_dashboards_csrf_token(shop, staff, nowhere):
    from django.test import Client

    with shop.batches.batch("to-cancel") as b:
        b.enqueue(charge(shop, 0, nowhere))
    client = Client()
    client.force_login(staff)
    page = client.get(f"/admin/batches/batches/{b.id}")
    assert page.status_code == 200
    assert "celery_batches_csrf" in client.cookies  # the dashboard's own cookie, passed through Django
    assert client.cookies["celery_batches_csrf"]["path"] == "/admin/batches/"
    assert client.post(f"/admin/batches/batches/{b.id}/cancel").status_code == 403
    assert client.post(f"/admin/batches/batches/{b.id}/cancel", {"csrf_token": "0" * 64}).status_code == 403
    assert shop.batches.get_batch(b.id).status == BatchStatus.STARTED
    token = csrf_from(page.content.decode())
    assert Client().post(f"/admin/batches/batches/{b.id}/cancel", {"csrf_token": token}).status_code == 302
    assert shop.batches.get_batch(b.id).status == BatchStatus.STARTED  # anonymous: to the login page
    done = client.post(f"/admin/batches/batches/{b.id}/cancel", {"csrf_token": token})
    assert done.status_code in (302, 303) and done["Location"].startswith(f"/admin/batches/batches/{b.id}")
    assert shop.batches.get_batch(b.id).status == BatchStatus.CANCELLED
