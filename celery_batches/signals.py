"""The signals celery_batches sends: Celery ``Signal`` objects, connected to as Celery's own are.

.. code-block:: python

    from celery_batches.signals import batch_created, batch_finished

    @batch_finished.connect
    def on_batch_finished(sender, batch_id, name, status, **kwargs):
        ...

* ``batch_created(batch_id, name)``: sent in the producer after the commit of the transaction that
  created the batch: each batch it wrote, the top-level batch, every nested batch (also one added
  by ``reopen``/``add_jobs_to_batch``) and a ``continue_batch_with`` stage.
* ``batch_finished(batch_id, name, status)``: sent after the commit of the transaction that finished
  the batch (``status``: a ``BatchStatus``, COMPLETED, FAILED or CANCELLED), in the process that
  ran it: a worker's pool process (its group commit), the producer (a cancel, an empty batch),
  the worker's main process (recovery, the reconciler), whoever published a message the broker refused.

``sender`` is the Celery app. Both are sent before the publisher publishes what the same
transaction made publishable (the batch's jobs; a finished batch's continuations), from the thread
that publishes it: a receiver delays that publishing for as long as it runs, and one that raises is
logged by Celery and changes nothing else. Each is sent at most once per batch and transaction: a
process killed between the commit and the signal never sends it (see docs/signals.md).

(Not to be confused with :mod:`celery_batches.worker.signals`, the worker's *receivers* of Celery's
task signals.)
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from celery.utils.dispatch import Signal

if TYPE_CHECKING:
    from .store.rows import Publication

__all__ = ["announce", "batch_created", "batch_finished"]

log = logging.getLogger(__name__)

#: Sent in the producer after the commit that created the batch (each batch of the tree it wrote).
batch_created = Signal(name="batch_created", providing_args={"batch_id", "name"})
#: Sent once per batch, after the commit that finished it, in the process that committed it.
batch_finished = Signal(name="batch_finished", providing_args={"batch_id", "name", "status"})


def announce(publication: "Publication", sender: Any = None) -> None:
    """Log and send what a committed transaction created and finished, then forget it: a
    publication handed on twice (or merged into another) announces nothing twice. Call it only
    once the transaction committed. Never raises for a receiver (Celery logs what one raised)."""
    created, publication.created = publication.created, []
    finished, publication.finished = publication.finished, []
    for batch in created:
        log.info("celery_batches: batch %s %s created (%d jobs)", batch.batch_id, batch.name, batch.jobs)
        _send(batch_created, sender, batch_id=batch.batch_id, name=batch.name)
    for batch in finished:
        log.info("celery_batches: batch %s %s finished %s (%d jobs, %.3fs)", batch.batch_id, batch.name,
                 batch.status.name, batch.jobs, batch.seconds)
        _send(batch_finished, sender, batch_id=batch.batch_id, name=batch.name, status=batch.status)


def _send(signal: Signal, sender: Any, **named: Any) -> None:
    try:
        signal.send(sender=sender, **named)
    except Exception:  # noqa: BLE001 - Celery's send already catches a receiver's error; nothing else may stop publishing
        log.exception("celery_batches: sending %s failed", signal.name)
