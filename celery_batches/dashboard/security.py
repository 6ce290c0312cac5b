"""The dashboard's security rules: who may see it, the CSRF tokens of its actions, response headers.

See the Security section of docs/dashboard.md for what each rule defends against.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import secrets
from typing import Callable
from urllib.parse import urlsplit

from werkzeug.exceptions import Forbidden
from werkzeug.wrappers import Request, Response

from ..settings import MIN_API_TOKEN_CHARS

__all__ = ["CSRF_COOKIE", "CSRF_FIELD", "CSRF_HEADER", "TOKEN_HEADER", "Access", "basic_auth_ok", "check_action",
           "csrf_token", "finish", "is_local"]

CSRF_COOKIE = "celery_batches_csrf"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
TOKEN_HEADER = "X-Batches-Token"
NONCE_BYTES = 32  # randomness of a browser's CSRF nonce (43 URL-safe base64 characters)
SECRET_BYTES = 32  # length of the random CSRF key of a process started without secret_key
_NONCE = re.compile(r"^[A-Za-z0-9_-]{43}$")
_LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}
_FORWARDING_HEADERS = ("HTTP_X_FORWARDED_FOR", "HTTP_FORWARDED", "HTTP_X_REAL_IP")
_CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; object-src 'none'; "
        "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


class Access:
    """Who may see a dashboard and act on it: the options of ``Dashboard`` that decide it, checked once."""

    def __init__(self, *, authorize: Callable[[Request], bool] | None, basic_auth: tuple[str, str] | None,
                 read_only: bool, secret_key: str | bytes | None, api_token: str | None) -> None:
        if basic_auth is not None and (len(basic_auth) != 2 or not all(basic_auth)):
            raise ValueError("basic_auth must be a (user, password) pair of non-empty strings")
        if api_token is not None and len(api_token) < MIN_API_TOKEN_CHARS:
            raise ValueError(f"api_token must be at least {MIN_API_TOKEN_CHARS} characters long")
        self.authorize = authorize
        self.basic_auth = basic_auth
        self.read_only = read_only
        key = secret_key.encode() if isinstance(secret_key, str) else secret_key
        self.secret = key or secrets.token_bytes(SECRET_BYTES)
        self.api_token = api_token

    def denied(self, request: Request) -> tuple[int, str] | None:
        """Why this request may not see the dashboard (401 or 403, and the reason), or None."""
        if self.basic_auth is not None and not basic_auth_ok(request, self.basic_auth):
            return 401, "Authentication required."
        if self.authorize is not None:
            return None if self.authorize(request) else (403, "You are not allowed to see this dashboard.")
        if self.basic_auth is None and not is_local(request):
            return 403, ("This dashboard only answers requests from the machine it runs on. "
                         "Configure authorize= or basic_auth= to open it to others.")
        return None

    def csrf_token(self, request: Request) -> str:
        return csrf_token(request, self.secret)

    def check_action(self, request: Request) -> None:
        """An action (POST): refused when read-only, cross-site or without a valid CSRF/API token."""
        check_action(request, self.secret, read_only=self.read_only, api_token=self.api_token)


def basic_auth_ok(request: Request, credentials: tuple[str, str]) -> bool:
    """The request carries these HTTP basic credentials."""
    auth = request.authorization
    user, password = credentials
    basic = auth is not None and auth.type == "basic"
    given_user, given_password = (auth.username or "", auth.password or "") if basic else ("", "")
    # both compared every time: answering faster for a wrong user name would reveal the right one
    user_ok = hmac.compare_digest(given_user.encode(), user.encode())
    password_ok = hmac.compare_digest(given_password.encode(), password.encode())
    return basic and user_ok and password_ok


def is_local(request: Request) -> bool:
    """A request from this machine: loopback peer, loopback Host (no DNS rebinding), not proxied."""
    try:
        ip = ipaddress.ip_address((request.remote_addr or "").split("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if not ip.is_loopback or any(h in request.environ for h in _FORWARDING_HEADERS):
        return False
    host = request.host.lower()
    host = host[1:host.index("]")] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
    return host in _LOCAL_HOSTS or host.endswith(".localhost") or _is_loopback_ip(host)


def _is_loopback_ip(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def csrf_token(request: Request, secret: bytes) -> str:
    """The CSRF token of this browser: the HMAC of its cookie's nonce (a new nonce, set by
    :func:`finish`, if it has none yet)."""
    nonce = request.cookies.get(CSRF_COOKIE, "")
    if not _NONCE.match(nonce):
        nonce = request.csrf_nonce or secrets.token_urlsafe(NONCE_BYTES)
        request.csrf_nonce = nonce
    return _sign(secret, nonce)


def _sign(secret: bytes, nonce: str) -> str:
    return hmac.new(secret, nonce.encode(), hashlib.sha256).hexdigest()


def check_action(request: Request, secret: bytes, *, read_only: bool, api_token: str | None) -> None:
    """An action (POST): refused when read-only, cross-site or without a valid CSRF/API token."""
    if read_only:
        raise Forbidden("This dashboard is read-only.")
    if api_token is not None and hmac.compare_digest(
            request.headers.get(TOKEN_HEADER, "").encode(), api_token.encode()):
        return
    if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
        raise Forbidden("Cross-site request refused.")
    origin = request.headers.get("Origin")
    if origin and origin != "null" and urlsplit(origin).netloc.lower() != request.host.lower():
        raise Forbidden("Cross-origin request refused.")
    nonce = request.cookies.get(CSRF_COOKIE, "")
    token = request.headers.get(CSRF_HEADER) or request.form.get(CSRF_FIELD, "")
    if not (_NONCE.match(nonce) and token and hmac.compare_digest(token.encode(), _sign(secret, nonce).encode())):
        raise Forbidden("Missing or invalid CSRF token. Reload the page and try again.")


def finish(request: Request, response: Response) -> None:
    """The security headers of every response, and the CSRF cookie when this request issued a nonce."""
    h = response.headers
    h.setdefault("Content-Security-Policy", _CSP)
    h.setdefault("X-Content-Type-Options", "nosniff")
    h.setdefault("X-Frame-Options", "DENY")
    h.setdefault("Referrer-Policy", "same-origin")
    h.setdefault("Cache-Control", "no-store")
    if request.csrf_nonce:
        response.set_cookie(CSRF_COOKIE, request.csrf_nonce, path=(request.script_root or "") + "/",
                            httponly=True, samesite="Strict", secure=request.is_secure)
