"""The dashboard's one launcher: ``celery -A proj batches dashboard`` and ``python -m
celery_batches.dashboard`` take the options below (docs/dashboard.md lists them) and serve through
:func:`celery_batches.dashboard.server.serve`.

Importing this module needs neither Werkzeug nor Jinja2 (the CLI imports it for its options);
serving does.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Any, Callable

import click

from ..api import Batches

__all__ = ["DASHBOARD_HOST", "DASHBOARD_PORT", "dashboard_main", "dashboard_options", "find_batches", "load", "serve_dashboard"]

DASHBOARD_HOST = "127.0.0.1"  # the dashboard listens on this machine only unless told otherwise
DASHBOARD_PORT = 5580  # not Flower's 5555: both run side by side with their defaults (docs/dashboard.md)
DASHBOARD_AUTH_ENV = "CELERY_BATCHES_DASHBOARD_AUTH"  # USER:PASSWORD, kept off the command line
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def dashboard_options(command: Callable) -> Callable:
    """The options of both dashboard launchers (docs/dashboard.md lists them)."""
    for option in reversed([
        click.option("--host", default=DASHBOARD_HOST, show_default=True, help="address to listen on"),
        click.option("--port", default=DASHBOARD_PORT, show_default=True, type=int),
        click.option("--prefix", default="", help="serve under this path prefix, e.g. /batches"),
        click.option("--read-only", is_flag=True, help="hide and refuse the Cancel action"),
        click.option("--basic-auth", metavar="USER:PASSWORD", envvar=DASHBOARD_AUTH_ENV, callback=_credentials,
                     help=f"require HTTP basic auth (prefer the {DASHBOARD_AUTH_ENV} environment variable)"),
    ]):
        command = option(command)
    return command


def _credentials(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--basic-auth`` (or its environment variable) is USER:PASSWORD, else a usage error (exit 2),
    checked before anything is served; the value itself is never echoed."""
    if value:
        user, sep, password = value.partition(":")
        if not (sep and user and password):
            raise click.BadParameter(f"must be USER:PASSWORD (the option or {DASHBOARD_AUTH_ENV})")
    return value


def serve_dashboard(service: Batches, *, host: str, port: int, prefix: str, read_only: bool,
                    basic_auth: str | None) -> None:
    """Serve until interrupted (the server needs Werkzeug and Jinja2: imported here, not above)."""
    from .server import serve

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    serve(service, host=host, port=port, prefix=prefix, read_only=read_only, credentials=basic_auth)


@click.command(name="dashboard", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--app", "-A", "app_path", help="the Celery app: module, module:attr or module.attr")
@click.option("--batches", "batches_path", help="the Batches instance (module:attr), if not created for --app")
@dashboard_options
def dashboard_main(app_path: str | None, batches_path: str | None, **options: Any) -> None:
    """Serve the celery_batches dashboard (the options of `celery -A proj batches dashboard`)."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        service = find_batches(app_path, batches_path)
    except SystemExit as exc:  # no app or Batches where the options point: a usage error (exit 2)
        if isinstance(exc.code, str):
            raise click.UsageError(exc.code) from None
        raise
    serve_dashboard(service, **options)


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
    """The Batches of ``--app`` (``Batches.for_app``) or ``--batches`` itself."""
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
            service = Batches.for_app(candidate)
            if service is not None:
                return service
        raise SystemExit(f"found no Celery app with Batches in module {app_path} (looked at app, celery, batches); "
                         "use --app module:attr or --batches module:attr")
    service = Batches.for_app(found)
    if service is None:
        raise SystemExit(f"{app_path} has no celery_batches.Batches attached: create Batches(app) in the module "
                         "that defines the app, or give --batches module:attr")
    return service
