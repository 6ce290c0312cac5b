"""The dashboard inside a Django project, behind Django's authentication.

``path("admin/batches/", include(dashboard_urls(batches)))`` serves the WSGI dashboard
(``celery_batches.dashboard``) under that path to active staff users; everyone else is redirected to
the admin's login page, as Django's admin views do. The dashboard's actions (cancel, retry) keep the
dashboard's own CSRF protection (an HMAC token bound to a SameSite=Strict cookie, plus Origin and
Sec-Fetch-Site checks), so the view is exempt from Django's CSRF middleware, whose token the
dashboard's forms do not carry.
"""

from __future__ import annotations

import io
from typing import Any, Callable

from django.conf import settings
from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.urls import re_path
from django.utils.crypto import salted_hmac
from django.views.decorators.csrf import csrf_exempt

from ..dashboard import create_app

__all__ = ["dashboard_urls", "dashboard_view"]


def is_staff(user: Any) -> bool:
    return bool(user.is_active and user.is_staff)


def dashboard_view(batches: Any, *, allow: Callable[[Any], bool] = is_staff, login_url: str | None = "admin:login",
                   **options: Any) -> Callable[..., HttpResponse]:
    """A Django view serving the dashboard of ``batches``; its URL pattern captures the rest of the path
    as ``path``. ``allow(user)``: who sees it (default: active staff users); others are redirected to
    ``login_url`` when anonymous (None: 403), and refused (403) when logged in. ``options``: those of
    :func:`celery_batches.dashboard.create_app`; ``secret_key`` defaults to one derived from Django's
    ``SECRET_KEY``, so every process of the site accepts the same CSRF tokens.
    """
    options.setdefault("secret_key", salted_hmac("celery_batches.dashboard", "csrf",
                                                  secret=settings.SECRET_KEY).hexdigest())
    # Django decides who gets in (below); the dashboard serves every request that reaches it
    app = create_app(batches, authorize=lambda _request: True, **options)

    @csrf_exempt  # the dashboard checks its own CSRF token on every action
    def view(request: HttpRequest, path: str = "") -> HttpResponse:
        user = getattr(request, "user", None)
        if user is None or not allow(user):
            if login_url is not None and (user is None or not user.is_authenticated):
                return redirect_to_login(request.get_full_path(), login_url)
            raise PermissionDenied
        return _call_wsgi(app, request, path)

    return view


def dashboard_urls(batches: Any, **options: Any) -> list:
    """URL patterns for ``include()``: the dashboard at the prefix they are included under
    (``path("admin/batches/", include(dashboard_urls(batches)))``). Options: :func:`dashboard_view`'s."""
    return [re_path(r"^(?P<path>.*)$", dashboard_view(batches, **options), name="celery_batches_dashboard")]


def _wsgi_str(text: str) -> str:
    """A path as WSGI carries it: UTF-8 bytes in a latin-1 str."""
    return text.encode("utf-8").decode("latin-1")


def _call_wsgi(app: Callable, request: HttpRequest, path: str) -> HttpResponse:
    """Call the WSGI dashboard with the request's environ: SCRIPT_NAME the prefix it is mounted at
    (whatever precedes ``path``), PATH_INFO the rest."""
    full = request.path  # Django's SCRIPT_NAME and the path, decoded
    prefix = full[:len(full) - len(path)] if path and full.endswith(path) else full
    body = request.body  # read once by Django (and kept), so a middleware reading it first is harmless
    environ = dict(request.META)
    environ.update({
        "SCRIPT_NAME": _wsgi_str(prefix.rstrip("/")),
        "PATH_INFO": _wsgi_str("/" + path),
        "QUERY_STRING": request.META.get("QUERY_STRING", ""),
        "wsgi.input": io.BytesIO(body),
        "CONTENT_LENGTH": str(len(body)),
    })
    started: dict[str, Any] = {}

    def start_response(status: str, headers: list, exc_info: Any = None) -> Callable:
        started["status"], started["headers"] = status, headers
        return lambda _data: None

    chunks = app(environ, start_response)
    try:
        content = b"".join(chunks)
    finally:
        getattr(chunks, "close", lambda: None)()
    code, _, reason = started["status"].partition(" ")
    response = HttpResponse(content, status=int(code), reason=reason or None)
    for name, value in started["headers"]:
        if name.lower() == "set-cookie":
            response.cookies.load(value)
        else:
            response[name] = value
    return response
