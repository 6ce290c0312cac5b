"""The dashboard's WSGI application: one route table, the HTML views and the JSON API.

The security rules are in :mod:`.security`, the template filters in :mod:`.filters`, the queries in
:mod:`celery_batches.store.pages` and the JSON shapes in :mod:`celery_batches.serialize`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from datetime import timedelta
from importlib import resources
from typing import Any, Callable, Iterable

from jinja2 import Environment, PackageLoader
from werkzeug.exceptions import BadRequest, HTTPException, NotFound
from werkzeug.routing import Map, MapAdapter, Rule
from werkzeug.wrappers import Request, Response

from .. import metrics, serialize
from ..api import Batches
from ..errors import BatchClosedError, BatchNotFoundError, InvalidBatchError, RunNotFoundError
from ..models import BatchStatus, RunStatus, canonical_id
from ..settings import (INT_ARG_DIGITS, JOBS_PAGE_SIZE, MAX_LIMIT, MAX_TAG, PAGE_SIZE, SEARCH_CHARS, TEXT_CHARS,
                        TREE_LIMIT)
from ..store import pages, reads, utcnow
from ..store.pagerows import BatchRow
from . import charts, security
from .filters import FILTERS, GLOBALS
from .security import CSRF_HEADER

__all__ = ["Dashboard", "create_app"]

log = logging.getLogger("celery_batches.dashboard")

_STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}
INTERNAL_ERROR = "Internal error. It has been logged on the server."
REFRESH_INTERVAL = 2.0  # default seconds between two live refreshes of a page showing unfinished batches
STATIC_MAX_AGE = 300  # seconds browsers cache a static file fetched without its digest
STATIC_IMMUTABLE_MAX_AGE = 31536000  # ... and with it (?v=<digest>): a year, the content never changes


def create_app(batches: Batches, **options: Any) -> Dashboard:
    """The dashboard of ``batches`` as a WSGI application (see :class:`Dashboard` for the options)."""
    return Dashboard(batches, **options)


class Dashboard:
    """A WSGI application showing the batches of one :class:`~celery_batches.Batches`.

    Mount it anywhere (``werkzeug.middleware.dispatcher.DispatcherMiddleware``, a Flask app's
    ``wsgi_app``, a Django ``wsgi.py``): every URL it makes starts with the request's ``SCRIPT_NAME``.

    :param authorize: ``authorize(request) -> bool`` for each request (a ``werkzeug.wrappers.Request``);
        False answers 403.
    :param basic_auth: ``("user", "password")``: require HTTP basic authentication.
        Without ``authorize`` and ``basic_auth``, only requests from the machine itself are served
        (loopback ``REMOTE_ADDR``, a loopback ``Host``, no proxy forwarding headers); others get 403.
    :param read_only: hide the Cancel and Retry buttons and refuse every action (403).
    :param secret_key: key of the CSRF tokens; random per process by default, so give the same
        key to every process when several serve the dashboard behind one address.
    :param api_token: a token scripts may send as ``X-Batches-Token`` instead of a CSRF token.
    :param page_size: batches per page; ``jobs_page_size``: jobs per page of a batch.
    :param refresh_interval: seconds between two live refreshes of a page showing unfinished
        batches (0 turns live refresh off).
    :param tree_limit: most batches of a subtree drawn on a batch page.
    """

    def __init__(self, batches: Batches, *, authorize: Callable[[Request], bool] | None = None,
                 basic_auth: tuple[str, str] | None = None, read_only: bool = False,
                 secret_key: str | bytes | None = None, api_token: str | None = None,
                 page_size: int = PAGE_SIZE, jobs_page_size: int = JOBS_PAGE_SIZE,
                 refresh_interval: float = REFRESH_INTERVAL, tree_limit: int = TREE_LIMIT,
                 title: str = "Celery batches") -> None:
        if min(page_size, jobs_page_size, tree_limit) < 1 or page_size > MAX_LIMIT or jobs_page_size > MAX_LIMIT:
            raise ValueError(f"page_size and jobs_page_size must be 1–{MAX_LIMIT}, tree_limit at least 1")
        self.access = security.Access(authorize=authorize, basic_auth=basic_auth, read_only=read_only,
                                      secret_key=secret_key, api_token=api_token)
        self.batches = batches
        self.transitions = batches.transitions
        self.page_size = page_size
        self.jobs_page_size = jobs_page_size
        self.refresh_interval = refresh_interval
        self.tree_limit = tree_limit
        self.title = title
        self.url_map = Map([
            Rule("/", endpoint="batches", methods=["GET"]),
            Rule("/batches/<uuid:batch_id>", endpoint="batch", methods=["GET"]),
            Rule("/batches/<uuid:batch_id>/cancel", endpoint="cancel", methods=["POST"]),
            Rule("/batches/<uuid:batch_id>/retry", endpoint="retry", methods=["POST"]),
            Rule("/runs/<uuid:run_id>", endpoint="run", methods=["GET"]),
            Rule("/runs/<uuid:run_id>/retry", endpoint="retry_run", methods=["POST"]),
            Rule("/static/<filename>", endpoint="static", methods=["GET"]),
            Rule("/api/batches", endpoint="api_batches", methods=["GET"]),
            Rule("/api/batches/<uuid:batch_id>", endpoint="api_batch", methods=["GET"]),
            Rule("/api/batches/<uuid:batch_id>/jobs", endpoint="api_jobs", methods=["GET"]),
            Rule("/api/batches/<uuid:batch_id>/cancel", endpoint="api_cancel", methods=["POST"]),
            Rule("/api/batches/<uuid:batch_id>/retry", endpoint="api_retry", methods=["POST"]),
            Rule("/api/runs/<uuid:run_id>", endpoint="api_run", methods=["GET"]),
            Rule("/api/runs/<uuid:run_id>/retry", endpoint="api_retry_run", methods=["POST"]),
            Rule("/api/csrf", endpoint="api_csrf", methods=["GET"]),
            Rule("/metrics", endpoint="metrics", methods=["GET"]),
        ], strict_slashes=False)
        self.static = _load_static()
        self.jinja = Environment(loader=PackageLoader("celery_batches.dashboard", "templates"), autoescape=True,
                                 trim_blocks=True, lstrip_blocks=True)
        self.jinja.filters.update(FILTERS)
        self.jinja.globals.update(GLOBALS, title=title, read_only=read_only, BatchStatus=BatchStatus,
                                  RunStatus=RunStatus)

    # -- WSGI --------------------------------------------------------------------------------------
    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        request = Request(environ)
        request.csrf_nonce = None  # set when this response must issue a CSRF cookie
        try:
            try:
                response = self.dispatch(request)
            except HTTPException as exc:
                if exc.code is not None and exc.code < 400:  # a routing redirect
                    response = exc.get_response(environ)
                else:
                    response = self.error(request, exc.code or 500, exc.description or exc.name, exc)
            except Exception:
                log.exception("celery_batches dashboard: error on %s %s", request.method, request.path)
                response = self.error(request, 500, INTERNAL_ERROR)
        except Exception:  # even the error page failed: answer in plain text
            log.exception("celery_batches dashboard: error while rendering an error page")
            response = Response(INTERNAL_ERROR, status=500, mimetype="text/plain")
        security.finish(request, response)
        return response(environ, start_response)

    def dispatch(self, request: Request) -> Response:
        denied = self.check_access(request)
        if denied is not None:
            return denied
        adapter = self.url_map.bind_to_environ(request.environ)
        endpoint, args = adapter.match()
        request.adapter = adapter
        return getattr(self, f"on_{endpoint}")(request, **args)

    # -- security ----------------------------------------------------------------------------------
    def check_access(self, request: Request) -> Response | None:
        denied = self.access.denied(request)
        if denied is None:
            return None
        response = self.error(request, *denied)
        if denied[0] == 401:
            response.headers["WWW-Authenticate"] = 'Basic realm="celery_batches", charset="UTF-8"'
        return response

    # -- responses ---------------------------------------------------------------------------------
    @staticmethod
    def wants_json(request: Request) -> bool:
        return request.path.startswith("/api/")

    def error(self, request: Request, code: int, message: str, exc: HTTPException | None = None) -> Response:
        if self.wants_json(request):
            response = self.json({"error": message, "status": code}, code)
        else:
            adapter = getattr(request, "adapter", None) or self.url_map.bind_to_environ(request.environ)
            request.adapter = adapter
            response = self.render(request, "error.html", http_status=code, code=code, message=message)
        if exc is not None and code == 405:
            response.headers["Allow"] = ", ".join(getattr(exc, "valid_methods", None) or [])
        return response

    def render(self, request: Request, template: str, http_status: int = 200, **context: Any) -> Response:
        adapter: MapAdapter = request.adapter
        context.update(
            url=lambda endpoint, **values: adapter.build(endpoint, {k: v for k, v in values.items()
                                                                    if v is not None}),
            static=lambda name: adapter.build("static", {"filename": name, "v": self.static[name][2]}),
            csrf_token=lambda: self.access.csrf_token(request),
            refresh_interval=self.refresh_interval,
            request=request,
        )
        html = self.jinja.get_template(template).render(**context)
        return Response(html, status=http_status, mimetype="text/html")

    @staticmethod
    def json(data: Any, status: int = 200) -> Response:
        return Response(json.dumps(data, separators=(",", ":")), status=status, mimetype="application/json")

    # -- HTML views --------------------------------------------------------------------------------
    def on_batches(self, request: Request) -> Response:
        status, name, before, after, _ = self._list_args(request, BatchStatus)
        tag = self._tag(request)
        page = pages.batch_page(self.transitions, status=status, name=name, tag=tag, limit=self.page_size, before=before,
                                after=after)
        filters = {"status": status.name.lower() if status is not None else None, "q": name or None, "tag": tag}
        return self.render(request, "batches.html", page=page, status=status, q=name or "", tag=tag or "",
                           filters=filters, unfinished=any(not row.batch.is_finished for row in page.rows),
                           summary=metrics.snapshot(self.batches), charts=self._charts())

    def _charts(self) -> charts.Charts:
        now = utcnow()
        return charts.charts(self.batches.tallies.history(now - charts.WINDOW - timedelta(hours=1)), now)

    def on_batch(self, request: Request, batch_id: Any) -> Response:
        batch_id = str(batch_id)
        detail = pages.batch_detail(self.transitions, batch_id, tree_limit=self.tree_limit)
        if detail is None:
            raise NotFound("No batch with this id.")
        status = _parse_status(request.args.get("status"), RunStatus)
        start = _int_arg(request, "start")
        before = _int_arg(request, "before")
        size = self.jobs_page_size
        jobs = pages.job_page(self.transitions, batch_id, status=status, start=start, before=before, limit=size,
                              text_chars=TEXT_CHARS + 1)
        direct = detail.root.jobs
        paging = None
        if status is None:  # positions are dense: a page number is a position range
            paging = {"count": max(math.ceil(direct.total / size), 1),
                     "current": (jobs.jobs[0].position // size) if jobs.jobs else 0, "size": size}
        notice = {"cancelled": "Batch cancelled: {runs} pending job(s) cancelled.",
                  "finished": "The batch had already finished; nothing was cancelled.",
                  "retried": "{runs} failed job(s) published again.",
                  "not-retried": "The batch was cancelled; nothing was retried."}.get(
            request.args.get("notice", ""), "")
        if notice:
            notice = notice.format(runs=_int_arg(request, "runs") or 0)
        unfinished = any(not entry.status.is_final for entry in detail.tree) or any(
            s.status == BatchStatus.CREATED for s in detail.successors)
        nav = {  # position cursors of the neighbouring pages
            "previous": (jobs.jobs[0].position if jobs.jobs else start) if jobs.has_previous else None,
            "next": jobs.jobs[-1].position + 1 if jobs.has_next and jobs.jobs else None,
        }
        return self.render(request, "batch.html", d=detail, b=detail.row.batch, jobs=jobs, job_status=status,
                           pages=paging, nav=nav, notice=notice, unfinished=unfinished, text_chars=TEXT_CHARS)

    def _cancel(self, request: Request, batch_id: str) -> tuple[Any, int | None]:
        """Shared by the page and the API: the batch as it was, and the runs cancelled (None: it had finished)."""
        self.access.check_action(request)
        batch = self.batches.get_batch(batch_id)
        if batch is None:
            raise NotFound("No batch with this id.")
        if batch.is_finished:
            return batch, None
        try:
            return batch, self.batches.cancel_batch(batch_id)
        except BatchNotFoundError:
            raise NotFound("No batch with this id.") from None

    def on_cancel(self, request: Request, batch_id: Any) -> Response:
        batch_id = str(batch_id)
        _, runs = self._cancel(request, batch_id)
        url = request.adapter.build("batch", {"batch_id": batch_id})
        if runs is None:
            return _redirect(f"{url}?notice=finished")
        return _redirect(f"{url}?notice=cancelled&runs={runs}")

    def _retry(self, request: Request, batch_id: str) -> int | None:
        """Shared by the page and the API: the failed runs published again (None: the batch was cancelled)."""
        self.access.check_action(request)
        try:
            return self.batches.retry_failed(batch_id)
        except BatchNotFoundError:
            raise NotFound("No batch with this id.") from None
        except BatchClosedError:
            return None

    def on_retry(self, request: Request, batch_id: Any) -> Response:
        batch_id = str(batch_id)
        runs = self._retry(request, batch_id)
        url = request.adapter.build("batch", {"batch_id": batch_id})
        return _redirect(f"{url}?notice=not-retried" if runs is None else f"{url}?notice=retried&runs={runs}")

    def _run(self, run_id: str) -> Any:
        detail = pages.run_detail(self.transitions, run_id)
        if detail is None:
            raise NotFound("No job with this id.")
        return detail

    def on_run(self, request: Request, run_id: Any) -> Response:
        detail = self._run(str(run_id))
        notice = {"retried": "The job was published again.",
                  "not-failed": "The job is no longer failed; nothing was retried.",
                  "not-retried": "Its batch was cancelled; nothing was retried."}.get(request.args.get("notice", ""), "")
        return self.render(request, "run.html", r=detail, j=detail.job, notice=notice,
                           unfinished=not detail.job.status.is_final)

    def _retry_run(self, request: Request, run_id: str) -> str | None:
        """Shared by the page and the API: None once retried, else why not (``not-failed``, ``not-retried``)."""
        self.access.check_action(request)
        try:
            self.batches.retry_run(run_id)
        except RunNotFoundError:
            raise NotFound("No job with this id.") from None
        except BatchClosedError:
            return "not-retried"
        except InvalidBatchError:
            return "not-failed"
        return None

    def on_retry_run(self, request: Request, run_id: Any) -> Response:
        run_id = str(run_id)
        refused = self._retry_run(request, run_id)
        url = request.adapter.build("run", {"run_id": run_id})
        return _redirect(f"{url}?notice={refused or 'retried'}")

    def on_static(self, request: Request, filename: str) -> Response:
        if filename not in self.static:
            raise NotFound()
        body, mimetype, digest = self.static[filename]
        response = Response(body, mimetype=None, content_type=mimetype)
        immutable = request.args.get("v") == digest
        response.headers["Cache-Control"] = (f"public, max-age={STATIC_IMMUTABLE_MAX_AGE}, immutable" if immutable
                                             else f"public, max-age={STATIC_MAX_AGE}")
        response.set_etag(digest)
        return response.make_conditional(request)

    # -- JSON API ----------------------------------------------------------------------------------
    def on_api_batches(self, request: Request) -> Response:
        status, name, before, after, parent = self._list_args(request, BatchStatus, parent=True)
        tag = self._tag(request)
        limit = self._limit(request, self.page_size)
        page = pages.batch_page(self.transitions, status=status, name=name, parent_id=parent, tag=tag, limit=limit,
                                before=before, after=after)
        base = {"status": request.args.get("status"), "q": name or None, "tag": tag, "parent": parent,
                "limit": limit}
        build = request.adapter.build
        older = newer = None
        if page.rows:
            if page.has_older:
                older = build("api_batches", dict(base, before=page.rows[-1].batch.id))
            if page.has_newer:
                newer = build("api_batches", dict(base, after=page.rows[0].batch.id))
        return self.json({"batches": [self._batch_json(request, row) for row in page.rows],
                          "next": older, "previous": newer})

    def on_api_batch(self, request: Request, batch_id: Any) -> Response:
        detail = pages.batch_detail(self.transitions, str(batch_id), tree_limit=self.tree_limit)
        if detail is None:
            raise NotFound("No batch with this id.")
        data = serialize.detail_json(detail)
        data["batch"]["url"] = request.adapter.build("batch", {"batch_id": detail.row.batch.id})
        return self.json(data)

    def on_api_jobs(self, request: Request, batch_id: Any) -> Response:
        batch_id = str(batch_id)
        status = _parse_status(request.args.get("status"), RunStatus)
        limit = self._limit(request, self.jobs_page_size)
        after = _int_arg(request, "after")
        before = _int_arg(request, "before")
        if reads.batch_status(self.transitions, batch_id) is None:
            raise NotFound("No batch with this id.")
        page = pages.job_page(self.transitions, batch_id, status=status, limit=limit, before=before,
                              start=None if after is None else after + 1)
        base = {"batch_id": batch_id, "status": status.name.lower() if status is not None else None, "limit": limit}
        build = request.adapter.build
        jobs = page.jobs
        previous = None
        if page.has_previous:
            edge = jobs[0].position if jobs else (before if before is not None else (after or 0) + 1)
            previous = build("api_jobs", dict(base, before=edge))
        return self.json({
            "jobs": [serialize.job_json(job) for job in jobs],
            "next": build("api_jobs", dict(base, after=jobs[-1].position)) if page.has_next and jobs else None,
            "previous": previous,
        })

    def on_api_cancel(self, request: Request, batch_id: Any) -> Response:
        batch_id = str(batch_id)
        batch, runs = self._cancel(request, batch_id)
        if runs is None:
            return self.json({"error": f"the batch is already {batch.status.name}", "status": 409,
                              "cancelled_runs": 0, "batch_status": batch.status.name}, 409)
        batch = self.batches.get_batch(batch_id)
        return self.json({"cancelled_runs": runs, "batch_status": batch.status.name if batch else None})

    def on_api_retry(self, request: Request, batch_id: Any) -> Response:
        batch_id = str(batch_id)
        runs = self._retry(request, batch_id)
        batch = self.batches.get_batch(batch_id)
        if runs is None:
            return self.json({"error": "the batch was cancelled", "status": 409, "retried_runs": 0,
                              "batch_status": batch.status.name if batch else None}, 409)
        return self.json({"retried_runs": runs, "batch_status": batch.status.name if batch else None})

    def on_api_run(self, request: Request, run_id: Any) -> Response:
        detail = self._run(str(run_id))
        data = serialize.run_json(detail)
        build = request.adapter.build
        data["url"] = build("run", {"run_id": detail.job.id})
        data["batch"]["url"] = build("batch", {"batch_id": detail.batch.id})
        return self.json(data)

    def on_api_retry_run(self, request: Request, run_id: Any) -> Response:
        run_id = str(run_id)
        refused = self._retry_run(request, run_id)
        detail = pages.run_detail(self.transitions, run_id)
        data = {"run_id": run_id, "run_status": detail.job.status.name if detail else None,
                "batch_id": detail.batch.id if detail else None,
                "batch_status": detail.batch.status.name if detail else None}
        if refused is not None:
            error = "its batch was cancelled" if refused == "not-retried" else "the job is not FAILED"
            return self.json(dict(data, error=error, status=409), 409)
        return self.json(data)

    def on_metrics(self, request: Request) -> Response:
        """Prometheus text (the same access rules as the JSON API); 501 without ``prometheus_client``."""
        try:
            body = metrics.render(self.batches)
        except metrics.MetricsUnavailable as exc:
            return Response(str(exc), status=501, mimetype="text/plain")
        return Response(body, content_type=metrics.CONTENT_TYPE)

    def on_api_csrf(self, request: Request) -> Response:
        return self.json({"csrf_token": self.access.csrf_token(request), "header": CSRF_HEADER})

    # -- helpers -----------------------------------------------------------------------------------
    def _list_args(self, request: Request, enum: type, parent: bool = False) -> tuple:
        status = _parse_status(request.args.get("status"), enum)
        name = request.args.get("q", "").strip()[:SEARCH_CHARS] or None
        before = _uuid_arg(request, "before")
        after = _uuid_arg(request, "after")
        parent_id = _uuid_arg(request, "parent") if parent else None
        return status, name, before, after, parent_id

    @staticmethod
    def _tag(request: Request) -> str | None:
        return request.args.get("tag", "").strip()[:MAX_TAG] or None

    @staticmethod
    def _limit(request: Request, default: int) -> int:
        limit = _int_arg(request, "limit")
        if limit is None:
            return default
        if not 1 <= limit <= MAX_LIMIT:
            raise BadRequest(f"limit must be between 1 and {MAX_LIMIT}")
        return limit

    @staticmethod
    def _batch_json(request: Request, row: BatchRow) -> dict[str, Any]:
        return dict(serialize.batch_json(row), url=request.adapter.build("batch", {"batch_id": row.batch.id}))


# -- module helpers --------------------------------------------------------------------------------

def _load_static() -> dict[str, tuple[bytes, str, str]]:
    files = {}
    for entry in resources.files("celery_batches.dashboard").joinpath("static").iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1]
        if suffix in _STATIC_TYPES:
            body = entry.read_bytes()
            files[entry.name] = (body, _STATIC_TYPES[suffix], hashlib.sha256(body).hexdigest()[:16])
    return files


def _redirect(location: str) -> Response:
    response = Response("", status=303)
    response.headers["Location"] = location
    response.autocorrect_location_header = False
    return response


def _parse_status(value: str | None, enum: type) -> Any:
    if not value:
        return None
    try:
        return enum(int(value)) if value.isdigit() else enum[value.upper()]
    except (KeyError, ValueError):
        raise BadRequest(f"unknown status {value!r}; one of: {', '.join(s.name.lower() for s in enum)}") from None


def _int_arg(request: Request, name: str) -> int | None:
    value = request.args.get(name)
    if value is None or value == "":
        return None
    if not value.isdigit() or len(value) > INT_ARG_DIGITS:
        raise BadRequest(f"{name} must be a non-negative integer")
    return int(value)


def _uuid_arg(request: Request, name: str) -> str | None:
    value = request.args.get(name)
    if not value:
        return None
    found = canonical_id(value)
    if found is None:
        raise BadRequest(f"{name} must be a batch id")
    return found
