"""The HTTP API of ``asyncgen serve`` (FastAPI): images, jobs, their progress, health and metrics.

``POST /v1/images`` validates the body (:mod:`asyncgen.cli.serve_requests`) before anything is
queued, so bad input never reaches the ranks. With ``wait`` (the default) it answers when the
images are made, and a client that goes away cancels its job; without, it answers 202 with the
job's id at once. Bodies over the cap get 413 before they are read whole; a full queue gets 429
with ``Retry-After``; with ``--api-key`` every route but ``/healthz`` wants ``Authorization:
Bearer KEY`` (compared in constant time).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from .serve_jobs import FINISHED, SUCCEEDED, Closed, Job, JobBoard, QueueFull
from .serve_requests import FieldError, ImageRequest, Limits, ModelRules, validate

OPEN_PATHS = ("/healthz", "/docs", "/openapi.json")  # no key needed: liveness probes and the API's description
POLL_SECONDS = 0.05  # how often a waiting request or a progress stream looks at its job


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status, headers=headers)


class BodyLimit:
    """ASGI middleware: a body over ``limit`` bytes gets 413, by its Content-Length or as it streams in.

    The body is read here (it is small: a cap of kilobytes) and handed on whole; later reads go to the
    connection, so the app still sees a client that disconnects."""

    def __init__(self, app, limit: int, metrics):
        self.app, self.limit, self.metrics = app, limit, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"the request body is over this server's limit of {self.limit} bytes (--max-body-bytes)"
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            self.metrics.count_refusal(413)
            return await _error(413, message)(scope, receive, send)
        chunks, size = [], 0
        while True:
            event = await receive()
            if event["type"] != "http.request":  # gone before the body came: nothing to answer
                return
            chunks.append(event.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                self.metrics.count_refusal(413)
                return await _error(413, message)(scope, receive, send)
            if not event.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class ApiKey:
    """ASGI middleware: with a key, every route but :data:`OPEN_PATHS` wants ``Authorization: Bearer KEY``.

    Plain ASGI, not Starlette's ``BaseHTTPMiddleware``, which stands between the app and the connection and
    would hide a client's disconnect from the waiting request."""

    def __init__(self, app, key: str | None, metrics):
        self.app, self.metrics = app, metrics
        self.expected = None if key is None else f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if self.expected is not None and scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):  # constant time: no timing hint of the key
                self.metrics.count_refusal(401)
                response = _error(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                  {"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


def make_app(board: JobBoard, metrics, rules: ModelRules, limits: Limits, max_body_bytes: int, api_key: str | None,
             info: dict) -> FastAPI:
    app = FastAPI(title="asyncgen serve", description="Images from a diffusers pipeline split over several devices "
                  "(AsyncDiff), kept loaded between requests.", version="1")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        metrics.count_refusal(422)
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.post("/v1/images", responses={200: {"content": {"image/png": {}}}, 202: {}, 413: {}, 422: {}, 429: {},
                                       503: {}})
    async def create_images(body: ImageRequest, request: Request):
        """Make images from a prompt: PNG bytes (one image) or base64 JSON, with the seed and timings."""
        try:
            params = validate(body, rules, limits)
        except FieldError as exc:
            metrics.count_refusal(422)
            return JSONResponse({"detail": [{"loc": ["body", exc.field], "msg": str(exc), "type": "value_error"}]},
                                status_code=422)
        try:
            job = board.submit(params)
        except QueueFull as exc:
            metrics.count_refusal(429)
            return _error(429, str(exc), {"Retry-After": str(exc.retry_after)})
        except Closed as exc:
            metrics.count_refusal(503)
            return _error(503, str(exc), {"Retry-After": "5"})
        if not body.wait:
            return JSONResponse(job.summary(), status_code=202, headers={"Location": f"/v1/jobs/{job.id}"})
        while not job.done.is_set():
            if await request.is_disconnected():
                board.cancel(job, "cancelled: the client disconnected")
                break
            await asyncio.sleep(POLL_SECONDS)
        return _result(job, body.response_format)

    @app.get("/v1/jobs/{job_id}")
    async def job_status(job_id: str):
        """Where a job stands; once it succeeded, its images too (base64 PNG)."""
        job = board.get(job_id)
        if job is None:
            return _error(404, f"no job {job_id} (finished jobs are kept for a while, then forgotten)")
        if job.status == SUCCEEDED:
            return _result(job, "b64_json")
        return JSONResponse(job.summary())

    @app.delete("/v1/jobs/{job_id}")
    async def cancel_job(job_id: str):
        """Cancel a job: a waiting one at once, the running one at its next step boundary on every rank."""
        job = board.get(job_id)
        if job is None:
            return _error(404, f"no job {job_id}")
        if job.status not in FINISHED:
            board.cancel(job, "cancelled by the client")
        return JSONResponse(job.summary(), status_code=202 if job.status not in FINISHED else 200)

    @app.get("/v1/jobs/{job_id}/events")
    async def job_events(job_id: str, request: Request):
        """Server-sent events: 'progress' at each step, then one 'done' with the job's summary."""
        job = board.get(job_id)
        if job is None:
            return _error(404, f"no job {job_id}")

        async def events():
            seen = -1
            while True:
                version = job.version
                if version != seen:
                    seen = version
                    finished = job.status in FINISHED
                    yield f"event: {'done' if finished else 'progress'}\ndata: {json.dumps(job.summary())}\n\n"
                    if finished:
                        return
                if await request.is_disconnected():
                    return
                await asyncio.sleep(POLL_SECONDS)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/healthz")
    async def healthz():
        """200 while the ranks take requests, 503 once the server is shutting down or restarting them."""
        counts = board.counts()
        body = {"status": "closing" if board.closed else "ready", **counts, **info}
        return JSONResponse(body, status_code=503 if board.closed else 200)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        """Prometheus text: queue length, requests by outcome, step latency histogram."""
        return PlainTextResponse(metrics.text(busy=board.counts()["running"] is not None),
                                 media_type="text/plain; version=0.0.4")

    return BodyLimit(ApiKey(app, api_key, metrics), max_body_bytes, metrics)


def _result(job: Job, response_format: str) -> Response:
    summary = job.summary()
    if job.status != SUCCEEDED:
        status = job.http_status or 500
        headers = {"Retry-After": "5"} if status == 503 else None
        return JSONResponse({**summary, "detail": job.error}, status_code=status, headers=headers)
    if response_format == "png":
        headers = {"X-Job-Id": job.id, "X-Seed": str(job.params["seed"]),
                   "X-Run-Seconds": str(summary.get("run_seconds", "")),
                   "X-Queued-Seconds": str(summary["queued_seconds"])}
        return Response(job.images[0], media_type="image/png", headers=headers)
    images = [{"b64_png": base64.b64encode(data).decode("ascii"), "seed": job.params["seed"] + i}
              for i, data in enumerate(job.images)]
    return JSONResponse({**summary, "images_data": images})
