"""The registry: schema, migrations and every SQL statement."""

from .engine import make_engine
from .migrate import drop_schema, migrate
from .store import Outbox, RunEvent, Store, utcnow
from .tables import Tables, build_tables

__all__ = ["Outbox", "RunEvent", "Store", "Tables", "build_tables", "drop_schema", "make_engine", "migrate", "utcnow"]
