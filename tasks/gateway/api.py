"""`modelq gateway`: the HTTP API (FastAPI, OpenAPI at /docs) for platforms that don't speak Celery.

A thin skin over `tasks.client.Client`: bodies are the schemas' job JSON, validated by
`parse_job` exactly as the CLI does, and errors are the same `ModelqError`s mapped to
HTTP statuses with an ErrorInfo-shaped body. Who the caller is comes from one
`authenticate(api_key) -> tenant` callable (default: one tenant, 'default', no key);
a tenant sees only its own jobs and models. No torch here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Request, Security
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from schemas import AccessDenied, InvalidJob, JobRecord, WorkerInfo, parse_job
from tasks.client import Client
from tasks.gateway.events import MAX_FOLLOWERS, EventStreams
from tasks.gateway.http import Unauthenticated, install_errors, read_json_body, responses
from tasks.gateway.openapi import Documented, install_openapi, job_body
from tasks.settings import Settings
from tasks.state.connection import connect_async
from tasks.state.keys import Keys
from tasks.state.registry import not_resident
from tasks.state.store import not_found
from tasks.tenants import Tenants, visible_workers

log = logging.getLogger(__name__)

Authenticate = Callable[[str | None], str]
"""Maps an API key (None when the request has none) to a tenant; raises AccessDenied to refuse."""

EVENT_ID = r"^[0-9]{1,19}(-[0-9]{1,19})?$"
"""A Redis stream id, as the event stream sends them and Last-Event-ID gives them back."""


def as_default_tenant(api_key: str | None) -> str:
    """The default `Authenticate`: every caller is tenant 'default' and no key is needed
    (the gateway's side of single-tenant mode, whose Tenants is tasks.tenants.single_tenant)."""
    return "default"


BEARER = HTTPBearer(auto_error=False, scheme_name="TenantBearer", description=(
    "A tenant's key (its `key` in the tenants file) as `Authorization: Bearer KEY`; X-API-Key "
    "does as well. Without a tenants file the gateway acts for tenant 'default' and needs none."))
API_KEY = APIKeyHeader(name="X-API-Key", auto_error=False, scheme_name="TenantApiKey", description=(
    "A tenant's key as `X-API-Key: KEY` (a bearer token wins when a request has both)."))


async def _tenant(request: Request,
                  bearer: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)] = None,
                  x_api_key: Annotated[str | None, Security(API_KEY)] = None) -> str:
    """The caller's tenant, from `Authorization: Bearer KEY` or `X-API-Key: KEY` (a key check
    is CPU only: it runs on the event loop, never waiting on a thread). The two are security
    schemes, so the OpenAPI says which operations take a key and how."""
    key = bearer.credentials.strip() if bearer is not None else x_api_key
    authenticate: Authenticate = request.app.state.authenticate
    try:
        return authenticate(key or None)
    except AccessDenied as exc:
        raise Unauthenticated(exc) from exc


async def _job(request: Request) -> dict[str, Any]:
    """The job body, read by the gateway: bounded, and validated by `parse_job` later."""
    limit: int = request.app.state.max_body_bytes
    return await read_json_body(request, limit)


Tenant = Annotated[str, Depends(_tenant)]
JobBody = Annotated[dict[str, Any], Depends(_job)]
READ = responses(401, 403, 404, 500, 503)
SUBMIT = responses(400, 401, 403, 404, 413, 422, 429, 500, 503)


def create_gateway(settings: Settings, authenticate: Authenticate = as_default_tenant,
                   client: Client | None = None, tenants: Tenants | None = None) -> FastAPI:
    """The gateway app on `settings`' Redis; pass `authenticate` to check API keys.

    With `tenants` (a tenants file), API keys are the tenants' keys and each tenant's
    jobs are signed with its key (tasks/tenants.py, tasks/auth.py).
    """
    if tenants is not None and tenants.multi:
        authenticate = lambda api_key: tenants.authenticate(api_key or "").name  # noqa: E731
        # The gateway acts for each caller's tenant, never for one of its own environment.
        settings = settings.model_copy(update={"tenant": None, "tenant_key": None})
    app = FastAPI(title="modelq gateway", version="1",
                  description="Submit load, attach, unload and run jobs; read records; follow "
                              "events. Every error is `{\"error\": {type, message, retryable}}`.")
    app.state.authenticate = authenticate
    app.state.max_body_bytes = settings.max_body_bytes
    jobs = _Jobs(settings, client or Client(settings), tenants, Documented(app))
    streams = EventStreams(lambda: connect_async(settings, MAX_FOLLOWERS + 16), Keys(settings.key_prefix))
    install_errors(app, settings)
    install_openapi(app, keyless=authenticate is as_default_tenant)
    _job_routes(app, jobs)
    _event_routes(app, streams)
    _pool_routes(app, jobs.modelq, streams)
    return app


class _Jobs:
    """Submitting and reading jobs for a caller's tenant (signed with its key when multi-tenant)."""

    def __init__(self, settings: Settings, modelq: Client, tenants: Tenants | None,
                 documented: Documented) -> None:
        self.settings = settings
        self.documented = documented
        self.modelq = modelq
        self.tenants = tenants
        self._signing: dict[str, Client] = {}

    def own_record(self, job_id: str, who: str) -> JobRecord:
        record = self.modelq.status(job_id)
        if record.tenant != who:  # another tenant's job does not exist for this caller
            raise not_found(job_id)  # word for word what a missing id gets
        return record

    def submit(self, body: dict[str, Any], who: str, kind: str | None) -> JSONResponse:
        if kind is not None:
            if body.get("kind", kind) != kind:
                raise InvalidJob(f"this endpoint takes {kind} jobs; the body says kind={body['kind']!r}")
            body = {**body, "kind": kind}
        body = {"tenant": who, **body}
        if body["tenant"] != who:
            raise AccessDenied(f"you are tenant {who!r}: submit jobs as that tenant", tenant=who)
        job = parse_job(body)  # modelq's own errors first; then the document's stricter JSON types
        self.documented.check(body, job.kind)
        try:
            handle = self._client(who).submit(job)
        except AccessDenied as exc:
            if "model_key" in exc.details:  # another tenant's model does not exist for this caller
                raise not_resident(exc.details["model_key"]) from None
            raise
        record = handle.status()
        return JSONResponse(status_code=202, content=record.model_dump(mode="json"),
                            headers={"Location": f"/v1/jobs/{handle.job_id}"})

    def _client(self, who: str) -> Client:
        tenants = self.tenants
        if tenants is None or not tenants.multi:
            return self.modelq
        if who not in self._signing:
            self._signing[who] = Client(self.settings.model_copy(update={
                "tenant": who, "tenant_key": SecretStr(tenants[who].key)}))
        return self._signing[who]


def _job_routes(app: FastAPI, jobs: _Jobs) -> None:
    for kind, summary in _KINDS.items():
        app.add_api_route(f"/v1/jobs/{kind}", _submitter(jobs, kind), methods=["POST"],
                          status_code=202, response_model=JobRecord, tags=["jobs"],
                          summary=summary, name=f"submit_{kind}", responses=SUBMIT,
                          openapi_extra=job_body(kind))

    @app.post("/v1/jobs", status_code=202, response_model=JobRecord, tags=["jobs"], responses=SUBMIT,
              openapi_extra=job_body(None))
    def submit_job(body: JobBody, who: Tenant) -> JSONResponse:
        """Submit a job of any kind (`kind`: load, attach, unload or run)."""
        return jobs.submit(body, who, None)

    @app.get("/v1/jobs/{job_id}", response_model=JobRecord, tags=["jobs"], responses=READ)
    def read_job(job_id: str, who: Tenant) -> JobRecord:
        """A job's record: status, stage, progress, result or error."""
        return jobs.own_record(job_id, who)

    @app.post("/v1/jobs/{job_id}/cancel", response_model=JobRecord, tags=["jobs"], responses=READ)
    def cancel_job(job_id: str, who: Tenant) -> JobRecord:
        """Cancel a queued job now, a running one at its next stage."""
        jobs.own_record(job_id, who)
        return jobs.modelq.cancel(job_id)


def _event_routes(app: FastAPI, streams: EventStreams) -> None:
    @app.get("/v1/jobs/{job_id}/events", tags=["jobs"], response_class=StreamingResponse,
             responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                              "description": "SSE: `id` (resume with Last-Event-ID), `event` (the "
                                             "status), `data` (an Event as JSON)"},
                        **responses(401, 403, 404, 422, 500, 503)})
    async def job_events(job_id: str, who: Tenant, last_event_id: Annotated[
            str | None, Header(pattern=EVENT_ID)] = None) -> StreamingResponse:
        """The job's events as server-sent events, from the first (or after Last-Event-ID) to the
        end. Served on the event loop: a follower holds a socket, not a thread."""
        await streams.own_record(job_id, who)
        return StreamingResponse(streams.sse(job_id, last_event_id or "0-0"),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


_KINDS = {"load": "Load a model (and adapters) on a worker that can fit it.",
          "attach": "Attach an adapter to a resident model.",
          "unload": "Free a resident model.",
          "run": "Run a model task on a resident model (loaded first for a load spec)."}


def _submitter(jobs: _Jobs, kind: str) -> Callable[..., JSONResponse]:
    # sync: FastAPI runs it on its thread pool, as the Client's Redis calls block
    def submit(body: JobBody, who: Tenant) -> JSONResponse:
        return jobs.submit(body, who, kind)
    submit.__doc__ = _KINDS[kind]
    return submit


def _pool_routes(app: FastAPI, modelq: Client, streams: EventStreams) -> None:
    @app.get("/v1/workers", response_model=list[WorkerInfo], tags=["pool"], responses=READ)
    def list_workers(who: Tenant) -> list[WorkerInfo]:
        """Live workers and, of their resident models, the caller's (and shared bases, with only
        the caller's adapters)."""
        return visible_workers(modelq.workers(), who)

    @app.get("/v1/tasks", response_model=dict[str, list[str]], tags=["pool"], responses=READ)
    def list_tasks(who: Tenant) -> dict[str, list[str]]:
        """The model tasks the live workers offer, each with the workers that offer it."""
        return modelq.tasks()

    @app.get("/healthz", tags=["pool"], responses=responses(500, 503))
    async def health() -> dict[str, str]:
        """200 when Redis answers, 503 when it does not (on the event loop: it answers however
        busy the thread pool is)."""
        await streams.ping()
        return {"redis": "ok"}
