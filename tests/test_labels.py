"""A batch's description, properties and tags: written with the batch, merged later by
``set_properties``, filtered on by ``list_batches(tag=...)``, shown by the CLI and the dashboard; bad
input refused with nothing written. Registry-level tests run on the real PostgreSQL (a private table
prefix) and on SQLite; the CLI and dashboard ones on the session's registry.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from datetime import timedelta

import pytest
import sqlalchemy as sa

from celery_batches import Batches, BatchNotFoundError, InvalidBatchError
from celery_batches.dashboard import create_app
from celery_batches.store import utcnow
from tests.helpers import Local, celery, memory_app, needs, pending_batch, private_registry, text, unique_name


@pytest.fixture(params=[pytest.param("postgresql", marks=needs("postgres")), "sqlite"])
def either_registry(request, tmp_path):
    """A Batches on tables of its own (the memory broker, no relay): in the test PostgreSQL, then in SQLite."""
    if request.param == "sqlite":
        batches = Batches(memory_app("labels"), database_url=f"sqlite:///{tmp_path / 'r.sqlite3'}",
                          table_prefix="lb_", relay_interval=0)
        batches.migrate()
        yield batches
        batches.engine.dispose()
        return
    with private_registry(memory_app("labels"), "cbt_labels") as batches:
        yield batches


def rows(batches, table: str) -> int:
    t = getattr(batches.transitions.tables, table)
    with batches.engine.connect() as conn:
        return conn.scalar(sa.select(sa.func.count()).select_from(t))


def test_labels_round_trip_and_tags_filter_the_lists(either_registry):
    with either_registry.batch("album", description="Resize album 7\nall sizes", properties={"album": 7, "by": "é"},
                        tags=["media", "nightly", "media"]) as b:
        with b.batch("thumbs", properties={"size": [64, 128]}, tags=("media",)) as child:
            pass
    with either_registry.batch("other", tags={"nightly", "b-side"}) as other:
        pass
    with either_registry.batch("plain") as plain:
        pass

    got = either_registry.get_batch(b.id)
    assert (got.description, got.properties, got.tags) == ("Resize album 7\nall sizes", {"album": 7, "by": "é"},
                                                           ("media", "nightly"))  # in order, once each
    assert either_registry.get_batch(child.id).properties == {"size": [64, 128]}
    assert either_registry.get_batch(other.id).tags == ("b-side", "nightly")  # a set, sorted
    assert (either_registry.get_batch(plain.id).description, either_registry.get_batch(plain.id).properties,
            either_registry.get_batch(plain.id).tags) == (None, {}, ())

    assert [x.id for x in either_registry.list_batches(tag="nightly")] == [other.id, b.id]  # newest first
    assert [x.id for x in either_registry.list_batches(tag="media")] == [b.id]  # top-level only by default
    assert [x.id for x in either_registry.list_batches(tag="media", parent_id=b.id)] == [child.id]
    assert [x.id for x in either_registry.list_batches(tag="nightly", name="oth")] == [other.id]
    assert either_registry.list_batches(tag="nowhere") == [] and either_registry.list_batches(tag="Media") == []
    with pytest.raises(InvalidBatchError):
        either_registry.list_batches(tag=["media"])


@pytest.mark.parametrize("labels, error", [
    ({"properties": [1, 2]}, "must be a dict with string keys"),
    ({"properties": {1: "x"}}, "must be a dict with string keys"),
    ({"properties": {"x": float("nan")}}, "JSON values only"),
    ({"properties": {"x": object()}}, "JSON values only"),
    ({"tags": "media"}, "tags must be a list of strings"),
    ({"tags": ["ok", 7]}, "a tag must be a non-empty string"),
    ({"tags": ["x" * 65]}, "the limit is 64"),
    ({"tags": ["a\x00b"]}, "NUL"),
    ({"description": ""}, "description must be a non-empty string"),
    ({"description": "x" * 10_001}, "the limit is 10000"),
    ({"description": "\udcff"}, "not valid Unicode"),
])
def test_bad_labels_are_refused_and_nothing_is_written(either_registry, labels, error):
    def written() -> tuple[int, int, int]:
        return rows(either_registry, "batches"), rows(either_registry, "batch_tags"), rows(either_registry, "runs")

    before = written()
    with pytest.raises(InvalidBatchError, match=re.escape(error)):
        with either_registry.batch("bad", **labels) as b:
            b.enqueue("tests.proj.noop", "x")
    with pytest.raises(InvalidBatchError, match=re.escape(error)):  # a nested batch checks the same
        with either_registry.batch("outer") as b:
            with b.batch("bad", **labels):
                pass
    assert written() == before


def test_set_properties_merges_atomically(either_registry):
    with either_registry.batch("props", properties={"a": 1, "keep": True}) as b:
        pass
    assert either_registry.set_properties(b.id, {"a": 2, "b": [1]}) == {"a": 2, "keep": True, "b": [1]}
    assert either_registry.get_batch(b.id).properties == {"a": 2, "keep": True, "b": [1]}

    def merge(worker: int) -> None:
        for i in range(10):
            either_registry.set_properties(b.id, {f"w{worker}-{i}": i})

    threads = [threading.Thread(target=merge, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    merged = either_registry.get_batch(b.id).properties
    assert {k for k in merged if k.startswith("w")} == {f"w{w}-{i}" for w in range(4) for i in range(10)}

    with pytest.raises(InvalidBatchError):
        either_registry.set_properties(b.id, {"x": {1, 2}})
    with pytest.raises(BatchNotFoundError):
        either_registry.set_properties(str(uuid.uuid4()), {"x": 1})
    assert "x" not in either_registry.get_batch(b.id).properties


def test_purging_a_tagged_tree_deletes_its_tags(either_registry):
    with either_registry.batch("old", tags=["t1"]) as b:
        with b.batch("kid", tags=["t2"]):
            pass
    b_table = either_registry.transitions.tables.batches
    with either_registry.engine.begin() as conn:
        conn.execute(sa.update(b_table).values(expires_at=utcnow() - timedelta(days=1)))
    assert rows(either_registry, "batch_tags") == 2
    assert either_registry.purge_expired() == 2
    assert (rows(either_registry, "batch_tags"), rows(either_registry, "batches")) == (0, 0)


@needs("postgres", "redis")
def test_cli_lists_by_tag_and_shows_the_labels(proj):
    tag = f"cli-{uuid.uuid4().hex[:8]}"
    with proj.batches.batch("labelled", description="for the CLI", properties={"k": "v"}, tags=[tag]) as b:
        pass
    listed = json.loads(celery("list", "--tag", tag, "--json").stdout)
    assert [(x["id"], x["description"], x["properties"], x["tags"]) for x in listed] == [
        (b.id, "for the CLI", {"k": "v"}, [tag])]
    shown = celery("show", b.id)
    assert "description: for the CLI" in shown.stdout and f"tags: {tag}" in shown.stdout
    assert 'properties: {"k": "v"}' in shown.stdout
    assert json.loads(celery("show", b.id, "--json").stdout)["batch"]["tags"] == [tag]


@needs("postgres", "redis")
def test_dashboard_shows_the_labels_and_filters_by_tag(proj, nowhere):
    tag = unique_name("tag")
    tagged = pending_batch(proj, nowhere, unique_name("tagged"), jobs=1, description="<b>why</b>",
                           properties={"owner": "<team>"}, tags=[tag, "shared"])
    pending_batch(proj, nowhere, unique_name("untagged"), jobs=1, tags=["shared"])
    client = Local(create_app(proj.batches))

    html = text(client.get(f"/?tag={tag}"))
    assert re.findall(r'data-batch-id="([0-9a-f-]+)"', html) == [tagged]
    assert f'name="tag" value="{tag}"' in html and f'href="/?tag={tag}"' in html
    page = text(client.get(f"/batches/{tagged}"))
    assert "&lt;b&gt;why&lt;/b&gt;" in page and "<b>why</b>" not in page
    assert '<dt class="property">owner</dt>' in page and "\\u003cteam\\u003e" in page  # escaped JSON
    assert f'<a class="tag" href="/?tag={tag}">{tag}</a>' in page

    api = client.get(f"/api/batches?tag={tag}").get_json()
    assert [(x["id"], x["tags"], x["properties"]) for x in api["batches"]] == [
        (tagged, [tag, "shared"], {"owner": "<team>"})]
    assert client.get(f"/api/batches/{tagged}").get_json()["batch"]["description"] == "<b>why</b>"
