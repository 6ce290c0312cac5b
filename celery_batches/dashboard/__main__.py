"""``python -m celery_batches.dashboard --app proj.celery [--host 127.0.0.1] [--port 5555]``.

``--app`` names the Celery app like ``celery -A`` does: ``module``, ``module:attr`` or
``module.attr``. The Batches instance is the one ``Batches(app)`` attached to that app; name it
explicitly with ``--batches module:attr`` when it lives elsewhere (or when ``--app`` is left out).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Any

from ..api import Batches

AUTH_ENV = "CELERY_BATCHES_DASHBOARD_AUTH"


def load(path: str) -> Any:
    """Import ``module``, ``module:attr`` or ``module.attr`` (attributes may be dotted after ``:``)."""
    if ":" in path:
        module_name, _, attr = path.partition(":")
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj
    try:
        return importlib.import_module(path)
    except ModuleNotFoundError as exc:
        if "." not in path or exc.name != path:
            raise
    module_name, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(module_name), attr)


def find_batches(app_path: str | None, batches_path: str | None) -> Batches:
    if batches_path:
        found = load(batches_path)
        if not isinstance(found, Batches):
            raise SystemExit(f"--batches {batches_path} is a {type(found).__name__}, not a celery_batches.Batches")
        return found
    if not app_path:
        raise SystemExit("give --app (the Celery app) or --batches (the Batches instance)")
    found = load(app_path)
    if isinstance(found, Batches):
        return found
    if hasattr(found, "__path__") or type(found).__name__ == "module":  # a module: look for the app in it
        candidates = [getattr(found, name, None) for name in ("app", "celery", "batches")]
        for candidate in candidates:
            if isinstance(candidate, Batches):
                return candidate
            service = getattr(candidate, "celery_batches", None)
            if isinstance(service, Batches):
                return service
        raise SystemExit(f"found no Celery app with Batches in module {app_path} (looked at app, celery, batches); "
                         "use --app module:attr or --batches module:attr")
    service = getattr(found, "celery_batches", None)
    if not isinstance(service, Batches):
        raise SystemExit(f"{app_path} has no celery_batches.Batches attached: create Batches(app) in the module "
                         "that defines the app, or give --batches module:attr")
    return service


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m celery_batches.dashboard",
                                     description="Serve the celery_batches dashboard.")
    parser.add_argument("--app", "-A", help="the Celery app: module, module:attr or module.attr")
    parser.add_argument("--batches", help="the Batches instance (module:attr), if not attached to --app")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=5555, help="port (default: %(default)s)")
    parser.add_argument("--prefix", default="", help="serve under this path prefix, e.g. /batches")
    parser.add_argument("--read-only", action="store_true", help="hide and refuse the Cancel action")
    parser.add_argument("--basic-auth", metavar="USER:PASSWORD",
                        help=f"require HTTP basic auth (prefer the {AUTH_ENV} environment variable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    serve(find_batches(args.app, args.batches), host=args.host, port=args.port, prefix=args.prefix,
          read_only=args.read_only, credentials=args.basic_auth or os.environ.get(AUTH_ENV))


def serve(batches: Batches, *, host: str = "127.0.0.1", port: int = 5555, prefix: str = "",
          read_only: bool = False, credentials: str | None = None) -> None:
    """Serve the dashboard until interrupted (also behind ``celery -A proj batches dashboard``)."""
    basic_auth = None
    if credentials:
        user, sep, password = credentials.partition(":")
        if not (sep and user and password):
            raise SystemExit("--basic-auth must be USER:PASSWORD")
        basic_auth = (user, password)

    from werkzeug.serving import make_server

    from . import create_app

    application: Any = create_app(batches, read_only=read_only, basic_auth=basic_auth)
    prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""
    if prefix:
        from werkzeug.exceptions import NotFound
        from werkzeug.middleware.dispatcher import DispatcherMiddleware

        application = DispatcherMiddleware(NotFound(), {prefix: application})
    server = make_server(host, port, application, threaded=True)
    log = logging.getLogger("celery_batches.dashboard")
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


if __name__ == "__main__":
    main()
