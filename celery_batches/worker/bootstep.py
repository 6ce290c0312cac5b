"""Worker bootstep that runs the relay and reconciler thread in the worker's main process."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from celery import bootsteps

from .heartbeat import Heartbeat
from .relay import Relay

if TYPE_CHECKING:
    from ..api import Batches

__all__ = ["make_bootstep"]


def make_bootstep(batches: "Batches") -> type[bootsteps.StartStopStep]:
    """A bootstep class bound to one ``Batches`` (bootsteps are registered as classes)."""

    class BatchesMaintenance(bootsteps.StartStopStep):
        """Starts the relay/reconciler thread; never runs on the worker's event loop."""

        def __init__(self, parent: Any, **kwargs: Any) -> None:
            super().__init__(parent, **kwargs)
            self.maintenance = Relay(batches)
            self.heartbeat = Heartbeat(batches.liveness, batches.node, batches.settings.heartbeat_interval, parent)

        def start(self, parent: Any) -> None:
            # The heartbeat goes on until the process exits: on a warm shutdown the pool finishes
            # its tasks after this step stopped, and the node must not look gone meanwhile.
            self.heartbeat.start()
            self.maintenance.start()

        def stop(self, parent: Any) -> None:
            self.maintenance.stop()
            batches._group_commit.close()

        # a cold shutdown (a second Ctrl-C, SIGQUIT) calls terminate, not stop: commit what is buffered all the same
        terminate = stop

    return BatchesMaintenance
