"""The registry: schema, migrations and every SQL statement."""

from .engine import make_engine, refused_for_good
from .migrate import drop_schema, migrate
from .store import Outbox, RunEvent, Store, is_run_id, storable_text, utcnow
from .tables import Tables, build_tables

__all__ = ["Outbox", "RunEvent", "Store", "Tables", "build_tables", "drop_schema", "is_run_id", "make_engine", "migrate",
           "refused_for_good", "storable_text", "utcnow"]
