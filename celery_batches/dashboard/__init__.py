"""The web dashboard of celery_batches: a WSGI application (Werkzeug + Jinja2, no JavaScript build).

    from celery_batches.dashboard import create_app
    application = create_app(batches)                  # local requests only
    application = create_app(batches, basic_auth=("admin", "s3cret"), read_only=True)

Serve it with any WSGI server, mount it under a path prefix, or run
``python -m celery_batches.dashboard --app proj.celery``. Needs the ``dashboard`` extra
(``pip install celery-atomic-batches[dashboard]``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["Dashboard", "create_app"]


def __getattr__(name: str) -> Any:
    """Import the application on first use, so the launcher's options (the CLI) need no Werkzeug."""
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        import jinja2  # noqa: F401
        import werkzeug  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ImportError(
            f"the celery_batches dashboard needs Werkzeug and Jinja2 ({exc}); "
            "install them with: pip install 'celery-atomic-batches[dashboard]'"
        ) from exc
    from . import app

    return getattr(app, name)
