"""What the lost-message search sees in the broker: a message waiting in its queue, or delivered
and unacknowledged, is found there (so it is never taken for lost and published again)."""

from __future__ import annotations

import os
import uuid

import pytest
from celery import Celery

from celery_batches.publishing.probe import RedisProbe
from tests.helpers import needs

pytestmark = needs("redis")


@pytest.mark.parametrize("prefix", ["", "cbt-prefix-"], ids=["plain", "global_keyprefix"])
def test_the_redis_probe_sees_queued_and_unacknowledged_messages(prefix):
    """With kombu's ``global_keyprefix`` transport option the queue and the unacked hash live under
    the prefix; the probe looks there too (kombu's client prefixes only the commands kombu sends)."""
    app = Celery(f"probe_{uuid.uuid4().hex[:6]}", broker=os.environ["TEST_BROKER_URL"], set_as_current=False)
    app.conf.broker_transport_options = {"global_keyprefix": prefix} if prefix else {}
    queue = f"cbt-probe-{uuid.uuid4().hex[:8]}"
    queued, taken = str(uuid.uuid4()), str(uuid.uuid4())
    try:
        for task_id in (taken, queued):  # taken first: the first one out of the queue
            app.send_task("tests.proj.noop", task_id=task_id, queue=queue)
        with app.connection_for_write() as conn:
            channel = conn.channel()
            message = channel.basic_get(queue, no_ack=False)  # one taken, and held unacknowledged
            assert message is not None and message.headers["id"] == taken
            snap = RedisProbe(app, 1000).look([queue])
            assert queued in snap.queued, "the queued message was not seen"
            assert taken in snap.unacked and taken not in snap.queued, "the unacknowledged message was not seen"
            channel.basic_ack(message.delivery_tag)
            channel.close()
    finally:
        with app.connection_for_write() as conn:
            channel = conn.default_channel
            channel.client.delete(*{channel._q_for_pri(queue, step) for step in channel.priority_steps})
