"""``manage.py batches_migrate``: create or upgrade the registry schema (``celery -A proj batches migrate``)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError


class Command(BaseCommand):
    help = ("Create or upgrade the celery_batches registry tables (idempotent), in the database "
            "Batches(app) uses: Django's default one unless batches_database_url says otherwise.")

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--app", help="the Celery app, as celery -A names it (default: the current app, "
                                          "which the project's __init__.py loads in Django's layout)")

    def handle(self, *args: Any, app: str | None = None, **options: Any) -> None:
        from celery import current_app
        from celery.app.utils import find_app

        from celery_batches import Batches

        celery_app = find_app(app) if app else current_app._get_current_object()
        batches = Batches.for_app(celery_app)
        if batches is None:
            raise CommandError(f"the Celery app {celery_app.main!r} has no Batches: create Batches(app) in the "
                               "module that defines the app (or name that module with --app)")
        batches.migrate()
        if options.get("verbosity", 1) < 1:
            return
        url = batches.engine.url.render_as_string(hide_password=True)
        self.stdout.write(f"celery_batches: registry schema up to date in {url} "
                          f"(tables {batches.settings.table_prefix}*)")
