"""The registry: schema, migrations and every SQL statement (nothing outside ``store/`` writes SQL)."""

from . import reads
from .engine import make_engine, refused_for_good
from .migrate import drop_schema, migrate
from .rows import Publication, RunEvent, is_run_id, storable_text, utcnow
from .tables import Tables, build_tables
from .transitions import Transitions

__all__ = ["Publication", "RunEvent", "Tables", "Transitions", "build_tables", "drop_schema", "is_run_id", "make_engine",
           "migrate", "reads", "refused_for_good", "storable_text", "utcnow"]
