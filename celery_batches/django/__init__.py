"""celery_batches' Django app: the dashboard behind Django's admin login and (with
``"celery_batches.django"`` in ``INSTALLED_APPS``) ``manage.py batches_migrate``. Joining Django's
transactions (``connection=django.db.connection``) and Django's default database as the registry
are :mod:`celery_batches.publishing.djangotx`'s. See docs/django.md.

Importing this package does not import Django; :func:`dashboard_urls` and :func:`dashboard_view` do.
"""

from __future__ import annotations

from typing import Any

__all__ = ["dashboard_urls", "dashboard_view"]


def dashboard_urls(batches: Any, **options: Any) -> list:
    """URL patterns serving the dashboard to active staff users:
    ``path("admin/batches/", include(dashboard_urls(batches)))``. See :func:`.dashboard.dashboard_urls`."""
    from .dashboard import dashboard_urls as urls

    return urls(batches, **options)


def dashboard_view(batches: Any, **options: Any) -> Any:
    """The dashboard as one Django view taking the rest of the path as ``path``. See
    :func:`.dashboard.dashboard_view`."""
    from .dashboard import dashboard_view as view

    return view(batches, **options)
