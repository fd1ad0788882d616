"""What both HTTP roles share: errors as JSON with the right status, 400 for any bad input,
/health and /metrics, a concise access log, HTTP metrics in the node's registry."""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..encoders import JOB_ERROR_PREFIX, JobError
from ..errors import JobRefused, PeerLost, TransferError
from ..logs import get_logger
from ..runtime.metrics import OUTCOMES, duration_buckets
from ..runtime.node import Node
from .drain import Drain, DrainGate
from .options import ServeOptions
from .schemas import ErrorBody

log = get_logger("emtransfer.server")

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "bad input; the detail names the problem"},
    401: {"model": ErrorBody, "description": "missing or wrong API key (when --api-key is set)"},
    409: {"model": ErrorBody, "description": "the rid is already in flight"},
    413: {"model": ErrorBody, "description": "the request body is too large"},
    502: {"model": ErrorBody, "description": "the encoder or the transfer failed"},
    503: {"model": ErrorBody, "description": "no encode node reachable or no capacity in time"},
    504: {"model": ErrorBody, "description": "a transfer deadline passed"},
}


class HTTPFailure(Exception):
    """An error answered as ``{"error": kind, "detail": ...}`` with ``status``."""

    def __init__(self, status: int, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.kind = kind
        self.detail = detail


def failure_from(exc: BaseException) -> HTTPFailure:
    """Map an exception to the status the API promises, by its type (each TransferError
    carries ``http_status`` and ``kind``; never a silent 5xx, never by message text)."""
    if isinstance(exc, HTTPFailure):
        return exc
    text = str(exc)
    if isinstance(exc, JobError):
        return HTTPFailure(400, "invalid_request", exc.detail)
    if isinstance(exc, TransferError):
        if isinstance(exc, JobRefused):  # the encoder's own words, without our prefixes
            text = text.split("encode failed: ", 1)[-1].removeprefix(JOB_ERROR_PREFIX)
        elif isinstance(exc, PeerLost):
            text = f"peer lost: {text}"
        elif exc.kind == "transfer_failed":
            text = f"{type(exc).__name__}: {text}"
        return HTTPFailure(exc.http_status, exc.kind, text)
    return HTTPFailure(500, "internal", f"{type(exc).__name__}: {text}")


def error_response(f: HTTPFailure) -> JSONResponse:
    return JSONResponse({"error": f.kind, "detail": f.detail}, status_code=f.status)


#: what the access log learns from the handler of the request it times (the rid)
_ACCESS: ContextVar[dict[str, Any] | None] = ContextVar("emtransfer_access", default=None)


def note_rid(rid: str | None) -> None:
    """Name the request's rid in its access-log line."""
    seen = _ACCESS.get()
    if seen is not None and rid:
        seen["rid"] = rid


async def guarded(rid: str | None, call: Awaitable[Any]) -> Any:
    """Await ``call``; any exception becomes an :class:`HTTPFailure`, logged by severity."""
    note_rid(rid)
    try:
        return await call
    except HTTPFailure:
        raise
    except Exception as exc:
        f = failure_from(exc)
        if f.status >= 500:
            level = log.error if f.status in (500, 502) else log.warning
            level(
                "request failed", rid=rid, status=f.status, error=f.detail, exc_info=f.status == 500
            )
        else:
            log.info("request refused", rid=rid, status=f.status, error=f.detail)
        raise f from exc


def describe_validation(errors: list[Any]) -> str:
    """FastAPI's validation errors as one sentence naming each problem."""
    parts: list[str] = []
    for err in errors:
        kind, loc = err.get("type", ""), [str(p) for p in err.get("loc", ())]
        where = ".".join(p for p in loc if p != "body")
        given = err.get("input")
        if kind == "json_invalid":
            why = (err.get("ctx") or {}).get("error", "")
            at = f" at position {loc[-1]}" if len(loc) > 1 and loc[-1].isdigit() else ""
            parts.append(f"malformed JSON body: {why}{at}".rstrip(": "))
        elif kind in ("model_attributes_type", "dict_type") or (kind == "missing" and not where):
            parts.append(
                "the request body must be a JSON object (send Content-Type: application/json)"
            )
        elif kind == "extra_forbidden":
            parts.append(f"unknown field {where!r}")
        elif kind == "missing":
            parts.append(f"{where} is required")
        elif kind.startswith(("greater_than", "less_than")):
            bound = next(iter((err.get("ctx") or {}).values()), "")
            op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<"}.get(kind, "<=")
            parts.append(f"{where} must be {op} {bound}, got {given!r}")
        elif kind in ("int_type", "int_parsing", "int_from_float"):
            parts.append(f"{where} must be an integer, got {given!r}")
        elif kind == "string_type":
            parts.append(f"{where} must be a string, got {given!r}")
        elif kind in ("string_too_short", "string_too_long"):
            parts.append(f"{where}: {err.get('msg', '')}")
        else:
            msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
            parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = describe_validation(list(exc.errors()))
        log.info("request refused", path=request.url.path, status=400, error=detail)
        return error_response(HTTPFailure(400, "invalid_request", detail))

    @app.exception_handler(HTTPFailure)
    async def _failure(request: Request, exc: HTTPFailure) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(HTTPFailure(exc.status_code, kind, str(exc.detail)))


class NodeService:
    """A node plus what the HTTP layer needs around it; subclasses make the node."""

    role: str
    node: Node

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self.settings = options.settings
        self.executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="emtransfer-http")
        self._started = False
        self._closed = False
        self._summary: asyncio.Task[None] | None = None
        #: the open requests, and the shutdown that waits for them (SIGTERM)
        self.drain = Drain(options.shutdown_timeout)

    async def start(self) -> None:
        if not self._started:
            self._started = True
            await self.node.start()
            self._register_metrics()
            if self.options.log_summary_interval > 0:
                self._summary = asyncio.create_task(
                    self._summarize(self.options.log_summary_interval)
                )

    async def close(self) -> None:
        if self._started and not self._closed:
            self._closed = True
            if self._summary is not None:
                self._summary.cancel()
            await self.node.close()
            self.executor.shutdown(wait=False, cancel_futures=True)

    async def _summarize(self, interval: float) -> None:
        """Every ``interval`` seconds with traffic, one info line: what ended, how."""
        last = self.node.metrics.totals()
        while True:
            await asyncio.sleep(interval)  # a periodic report, not a synchronisation
            now = self.node.metrics.totals()
            delta = {k: now[k] - last[k] for k in now}
            last = now
            ended = {k: int(v) for k, v in delta.items() if k in OUTCOMES and v}
            if not ended:
                continue
            log.info(
                "summary",
                interval_s=interval,
                requests=sum(ended.values()),
                ok=ended.pop("ok", 0),
                failed=ended or None,
                resumes=int(delta["resumes"]),
                mib_in=round(delta["bytes_in"] / 2**20, 1),
                mib_out=round(delta["bytes_out"] / 2**20, 1),
                inflight=self.node.inflight_requests(),
            )

    def _register_metrics(self) -> None:
        r = self.node.metrics.registry
        self.http_requests = Counter(
            "emtransfer_http_requests",
            "HTTP requests by path and status",
            ["path", "status"],
            registry=r,
        )
        self.http_seconds = Histogram(
            "emtransfer_http_request_duration_seconds",
            "HTTP request duration",
            ["path"],
            buckets=duration_buckets(self.settings),
            registry=r,
        )

    @property
    def serving(self) -> bool:
        """Started and not shutting down (what readiness needs before anything role-specific)."""
        return (
            self._started
            and not self._closed
            and not self.drain.draining
            and not self.node._closing
        )

    def health(self) -> dict[str, Any]:
        return {**self.node.health(), "ready": self.serving}

    async def offload(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)


def make_app(service: NodeService, title: str, description: str) -> FastAPI:
    """The app skeleton both roles share: lifespan, errors, /health, /metrics, access log."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        await service.start()
        try:
            yield
        finally:
            await service.close()

    from .. import __version__

    app = FastAPI(
        title=title,
        description=description,
        version=__version__,
        lifespan=lifespan,
        docs_url=None,  # served below from local files, not a CDN
        redoc_url=None,
    )
    install_error_handlers(app)
    install_docs(app)

    async def health() -> JSONResponse:
        body = service.health()
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    async def live() -> dict[str, bool]:
        return {"live": True}

    app.get(
        "/health",
        summary="readiness: 200 when ready to serve, 503 when not (body: role, pool, peers)",
        responses={503: {"description": "not ready: no encode node up, or shutting down"}},
    )(health)
    app.get("/live", summary="liveness: 200 while the process serves")(live)

    @app.get("/version", summary="emtransfer's version, its protocol's, and the node's role")
    async def version() -> dict[str, Any]:
        from ..protocol.messages import PROTOCOL_VERSION

        return {"version": __version__, "protocol": PROTOCOL_VERSION, "role": service.role}

    for path, endpoint in (("/health", health), ("/live", live)):  # HEAD: the status alone
        app.head(path, include_in_schema=False)(endpoint)

    @app.get(
        "/metrics",
        summary="Prometheus metrics",
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
    )
    async def metrics() -> Response:
        return Response(service.node.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(BodyLimit, limit=service.options.body_limit)
    if service.options.api_key is not None:
        app.add_middleware(
            ApiKey, key=service.options.api_key, exempt=service.options.api_key_exempt
        )
    app.add_middleware(DrainGate, drain=service.drain)
    app.add_middleware(AccessLog, service=service, routes=app.router)
    return app


def install_docs(app: FastAPI) -> None:
    """``/docs`` (Swagger UI) from the files of the swagger-ui-bundle package, so it works on
    a cluster without internet access; the schema says 400 where FastAPI would say 422,
    because bad input is answered 400 here."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles
    from swagger_ui_bundle import swagger_ui_path

    app.mount("/docs/static", StaticFiles(directory=str(swagger_ui_path)), name="docs-static")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> Response:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title}: API",
            swagger_js_url="/docs/static/swagger-ui-bundle.js",
            swagger_css_url="/docs/static/swagger-ui.css",
            swagger_favicon_url="/docs/static/favicon-32x32.png",
        )

    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            for operations in schema.get("paths", {}).values():
                for op in operations.values():
                    op.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


class ApiKey:
    """Answer 401 to a request without ``Authorization: Bearer <key>`` (compared in constant
    time), except on the exempt paths (health checks and scrapers, by default)."""

    def __init__(self, app: Any, key: str, exempt: frozenset[str]) -> None:
        self.app = app
        self.want = f"Bearer {key}".encode()
        self.exempt = exempt

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] not in self.exempt:
            got = dict(scope.get("headers") or ()).get(b"authorization", b"")
            if not hmac.compare_digest(got, self.want):
                detail = "missing or wrong API key: send 'Authorization: Bearer <key>'"
                response = error_response(HTTPFailure(401, "unauthorized", detail))
                response.headers["WWW-Authenticate"] = "Bearer"
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimit:
    """Refuse (413) a request whose body is above ``limit`` bytes, however it is framed: at
    once when its Content-Length says so; a body without one (chunked) is read here up to the
    limit before the app sees any of it, and refused as soon as it passes."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.MAX_BODY = limit

    def _too_large(self, n: int | str) -> JSONResponse:
        detail = (
            f"request body of {n} bytes is above the limit of {self.MAX_BODY} "
            "(--max-body-bytes; by default it follows max_job_bytes)"
        )
        return error_response(HTTPFailure(413, "too_large", detail))

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None:
            if length.isdigit() and int(length) > self.MAX_BODY:
                await self._too_large(int(length))(scope, receive, send)
                return
            await self.app(scope, receive, send)  # the server stops at Content-Length
            return
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.MAX_BODY:
                await self._too_large(f"more than {self.MAX_BODY}")(scope, receive, send)
                return
        replay: list[Any] = [{"type": "http.request", "body": bytes(body), "more_body": False}]

        async def buffered() -> Any:
            return replay.pop() if replay else await receive()

        await self.app(scope, buffered, send)


class AccessLog:
    """Counts every request in the node's registry; logs one concise line when enabled."""

    QUIET = frozenset({"/health", "/live", "/metrics"})

    def __init__(self, app: Any, service: NodeService, routes: Any) -> None:
        self.app = app
        self.service = service
        self.routes = routes
        self._paths: frozenset[str] | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500
        seen: dict[str, Any] = {}
        token = _ACCESS.set(seen)  # the dict is shared with the handler's (copied) context

        async def send_status(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            _ACCESS.reset(token)
            elapsed = time.perf_counter() - t0
            path = scope["path"]
            if self._paths is None:  # the routes are all added by the first request
                self._paths = frozenset(getattr(r, "path", "") for r in self.routes.routes)
            label = path if path in self._paths else "other"
            svc = self.service
            if hasattr(svc, "http_requests"):
                svc.http_requests.labels(label, str(status)).inc()
                svc.http_seconds.labels(label).observe(elapsed)
            if svc.options.access_log:
                emit = log.debug if path in self.QUIET else log.info
                client = scope.get("client")
                emit(
                    "http",
                    method=scope["method"],
                    path=path,
                    status=status,
                    ms=round(elapsed * 1e3, 1),
                    rid=seen.get("rid"),
                    client=f"{client[0]}:{client[1]}" if client else None,
                )
