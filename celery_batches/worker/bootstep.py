"""Worker bootstep: the heartbeat and the relay (with recovery and the reconciler) in the worker's main process."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from celery import bootsteps

from .heartbeat import Heartbeat

if TYPE_CHECKING:
    from ..store.liveness import Liveness
    from .node import Node
    from .relay import Relay

__all__ = ["make_bootstep"]


def make_bootstep(node: "Node", relay: "Relay", liveness: "Liveness") -> type[bootsteps.StartStopStep]:
    """A bootstep class bound to one ``Node`` and its relay (bootsteps are registered as classes)."""

    class BatchesWorkerStep(bootsteps.StartStopStep):
        """Starts the heartbeat and the relay threads; neither runs on the worker's event loop."""

        def __init__(self, parent: Any, **kwargs: Any) -> None:
            super().__init__(parent, **kwargs)
            self.relay = relay
            self.heartbeat = Heartbeat(liveness, node.name, node.settings.heartbeat_interval, parent)

        def start(self, parent: Any) -> None:
            # A worker on a schema older than its code would fail every write it makes: refuse to start.
            node.check_schema()
            # The heartbeat goes on until the process exits: on a warm shutdown the pool finishes
            # its tasks after this step stopped, and the node must not look gone meanwhile.
            self.heartbeat.start()
            self.relay.start()

        def stop(self, parent: Any) -> None:
            self.relay.stop()
            node.close()

        # a cold shutdown (a second Ctrl-C, SIGQUIT) calls terminate, not stop: commit what is buffered all the same
        terminate = stop

    return BatchesWorkerStep
