"""``python -m celery_batches.dashboard --app proj.celery [--host 127.0.0.1] [--port 5580]``.

``--app`` names the Celery app like ``celery -A`` does: ``module``, ``module:attr`` or
``module.attr``. The Batches instance is the one created for that app (``Batches.for_app``); name it
explicitly with ``--batches module:attr`` when it lives elsewhere (or when ``--app`` is left out).

The options are those of ``celery -A proj batches dashboard``: both come from
:mod:`celery_batches.dashboard.launcher`.
"""

from __future__ import annotations

from .launcher import dashboard_main, find_batches, load

__all__ = ["find_batches", "load", "main"]

PROG_NAME = "python -m celery_batches.dashboard"


def main(argv: list[str] | None = None) -> None:
    """Parse ``argv`` (default: the command line) and serve until interrupted."""
    dashboard_main.main(args=argv, prog_name=PROG_NAME)


if __name__ == "__main__":
    main()
