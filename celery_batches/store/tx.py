"""One registry transaction of the state machine, and the publish lease it takes."""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timedelta

import sqlalchemy as sa

from ..message import Message
from .rows import Publication, utcnow

__all__ = ["Tx"]


class Tx:
    """One registry transaction: its connection, its clock, and (made on first use) its publish lease.

    Everything a transaction makes publishable carries the lease's id; the publisher renews it
    while it publishes, and the relay takes only what carries a lapsed lease. So the relay never
    publishes what a live producer (or the group commit that made it publishable) is still publishing.
    """

    __slots__ = ("conn", "now", "_publications", "_lease_time", "_lease", "_leased_at")

    def __init__(self, conn: sa.Connection, now: datetime, publications: sa.Table, lease_time: timedelta) -> None:
        self.conn, self.now, self._publications, self._lease_time = conn, now, publications, lease_time
        self._lease: str | None = None
        self._leased_at = 0.0

    def lease(self) -> str:
        if self._lease is None:
            self._lease = str(uuid.uuid4())
            self._leased_at = time.monotonic()
            self.conn.execute(sa.insert(self._publications).values(id=self._lease,
                                                                   expires_at=utcnow() + self._lease_time))
        return self._lease

    def publication(self, runs: list[Message] | None = None, continuations: list[Message] | None = None) -> Publication:
        """What the transaction made publishable, as its last step. A lease taken long before (a
        million-job batch takes a minute to write) counts again from now: the publisher must find it
        still valid when the commit is through, or it leaves everything to the relay."""
        lease = self._lease_time
        if self._lease is not None and time.monotonic() - self._leased_at > lease.total_seconds() / 4:
            p = self._publications
            self.conn.execute(sa.update(p).where(p.c.id == self._lease).values(expires_at=utcnow() + lease))
            self._leased_at = time.monotonic()
        return Publication(runs or [], continuations or [], self._lease)
