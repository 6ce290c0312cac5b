"""Serving the dashboard with Werkzeug's threaded server: what both launchers run.

The options are parsed once, in :mod:`celery_batches.cli` (``celery -A proj batches dashboard``
and ``python -m celery_batches.dashboard``); this module only serves.
"""

from __future__ import annotations

import logging
from typing import Any

from werkzeug.exceptions import NotFound
from werkzeug.middleware.dispatcher import DispatcherMiddleware
from werkzeug.serving import make_server

from ..api import Batches
from .app import create_app

__all__ = ["serve"]

log = logging.getLogger("celery_batches.dashboard")


def serve(batches: Batches, *, host: str, port: int, prefix: str = "", read_only: bool = False,
          credentials: str | None = None) -> None:
    """Serve the dashboard of ``batches`` on ``host:port`` (under ``prefix``) until interrupted.

    ``credentials``: ``USER:PASSWORD`` for HTTP basic auth; without it only local requests are served.
    """
    basic_auth = None
    if credentials:
        user, sep, password = credentials.partition(":")
        if not (sep and user and password):
            raise SystemExit("--basic-auth must be USER:PASSWORD")
        basic_auth = (user, password)

    application: Any = create_app(batches, read_only=read_only, basic_auth=basic_auth)
    prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""
    if prefix:
        application = DispatcherMiddleware(NotFound(), {prefix: application})
    server = make_server(host, port, application, threaded=True)
    log.info("serving the dashboard of %s on http://%s:%d%s/", batches.engine.url.render_as_string(
        hide_password=True), host, server.server_port, prefix)
    if basic_auth is None:
        log.info("only requests from this machine are served (give --basic-auth to open it to others)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
