"""The service's FastAPI application: OpenAI routes, probes, metrics, and the policy in front of them.

Order of what a request meets (``PolicyMiddleware``, a plain ASGI middleware so that streaming and
client disconnects pass through it untouched):

1. a request id (the client's ``X-Request-Id`` if it is sane, else a new one), echoed in the response;
2. authentication on every path except the probes ``/health`` and ``/ready`` (401);
3. for the generation routes: the body size (413), draining / engine state (503), the tenant's rate
   limit (429 + ``Retry-After``), the cap on requests in flight (503 + ``Retry-After``);
4. the route: validation of the body (422, or 400 for JSON that does not parse or asks for more tokens
   than the model's context holds; 404 for an unknown model), then the backend.

Every request ends in exactly one JSON access-log line and in the Prometheus metrics (``/metrics``),
whatever happened to it. API keys never reach a log: the tenant's name does.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

try:  # chat templates are Jinja templates (transformers renders them with jinja2)
    from jinja2 import TemplateError, TemplateNotFound, TemplateSyntaxError
    from jinja2.exceptions import SecurityError

    # A template that does not parse or is not allowed is the server's fault, not the request's.
    SERVER_TEMPLATE_ERRORS: tuple = (TemplateSyntaxError, TemplateNotFound, SecurityError)
except ImportError:  # pragma: no cover - jinja2 comes with transformers' chat templates and with torch
    class TemplateError(Exception):
        pass

    SERVER_TEMPLATE_ERRORS = ()

from .backends import EngineBackend, EngineDead, UpstreamBackend, UpstreamError, stream_error, upstream_error_json
from .policy import Admission, KeyRing, RateLimiter, retry_after_header
from .wire import ChatRequest, ChunkWriter, CompletionRequest, ErrorResponse, ProbeStatus, error_body

log = logging.getLogger("inference_course.service")
access_log = logging.getLogger("inference_course.service.access")

OPEN_PATHS = ("/health", "/ready")
GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")
KNOWN_ROUTES = ("/health", "/ready", "/metrics", "/v1/models", *GENERATION_PATHS)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
# The tags pydantic puts in an error's location for the member of a union that failed ("float",
# "constrained-str", "list[constrained-str]"); no field of the wire models looks like one.
_UNION_TAG = re.compile(r"^(str|int|float|bool|none)$|[\[\]-]")
STATUS_CLIENT_GONE = 499  # nginx's code for "client closed the request": logged, never sent


@dataclass
class ServiceConfig:
    """Everything the service is started with (``python -m inference_course.service --help``)."""

    model: str
    served_name: str = "smollm2"
    upstream: str | None = None          # architecture (b): URL of a `vllm serve`; None: (a) in-process
    # Secrets stay out of repr(): a config printed in a notebook or logged must not show a key.
    upstream_api_key: str | None = field(default=None, repr=False)
    api_keys: dict[str, str] = field(default_factory=dict, repr=False)  # key -> tenant; empty: no authentication
    rate_limit: float | None = None      # requests per second per tenant; None: no limit
    rate_burst: int = 10
    max_in_flight: int | None = 64       # admission cap; None: no cap
    request_timeout_s: float = 300.0
    max_body_bytes: int = 1 << 20
    drain_timeout_s: float = 30.0
    engine_kwargs: dict[str, Any] = field(default_factory=dict)


class Metrics:
    """The service's own Prometheus metrics, in a registry of their own (several apps per process in
    tests); ``/metrics`` also exports the default registry, where vLLM's engine records ``vllm:*``."""

    def __init__(self, state: "ServiceState"):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("service_requests", "Requests by route and status code", ["route", "code"],
                                registry=r)
        self.duration = Histogram("service_request_duration_seconds", "Time from request to last byte",
                                  ["route"], registry=r,
                                  buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.ttft = Histogram("service_time_to_first_token_seconds", "Time from request to first token",
                              registry=r, buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30))
        self.tokens = Counter("service_output_tokens", "Output tokens sent", registry=r)
        self.rejections = Counter("service_rejections", "Requests refused, by reason", ["reason"], registry=r)
        # A stream answers 200 before its first token: one cut later (timeout, engine death, the client
        # leaving, shutdown) keeps its 200 in service_requests_total and is counted here.
        self.streams_cut = Counter("service_streams_cut", "Streams that started and did not end normally, "
                                   "by reason", ["reason"], registry=r)
        # Series exist from the start, at 0. A labelled counter appears only when first incremented, and
        # rate()/increase() cannot see the increments that created a series: the first burst of 503s would be
        # invisible to an error-ratio alert (Prometheus docs, "Instrumentation": avoid missing metrics).
        for route in GENERATION_PATHS:
            for code in ("200", "400", "401", "404", "413", "422", "429", "500", "503", "504"):
                self.requests.labels(route, code)
        for reason in ("unauthorized", "invalid", "body_too_large", "rate_limited", "overloaded", "draining",
                       "engine_starting", "engine_dead"):  # every reason _admit refuses with
            self.rejections.labels(reason)
        in_flight = Gauge("service_requests_in_flight", "Generation requests admitted and not finished",
                          registry=r)
        in_flight.set_function(lambda: state.admission.in_flight)
        ready = Gauge("service_ready", "1 when the service takes new requests", registry=r)
        ready.set_function(lambda: 1.0 if state.ready() else 0.0)

    def exposition(self) -> bytes:
        from prometheus_client import REGISTRY, generate_latest

        return generate_latest(self.registry) + generate_latest(REGISTRY)


class PromptTokenizer:
    """The model's tokenizer, used off the event loop.

    Tokenizing a long prompt takes about a millisecond; done in a request handler, on the event loop's
    thread, it stalls every other request's stream for that time. A py-spy profile of this service on an
    H200 at 64 concurrent streams found 18.6% of the event loop thread's samples in ``tokenizer.encode``
    (Lab 2.3 README, ``profiles/h200-2026-11-30``); ``vllm serve`` tokenizes in a worker thread. So does
    this class: one worker thread (the transformers tokenizer object changes its own settings on every call,
    so it is not shared between threads; one worker also tokenizes requests in the order they came), and the
    Rust tokenizer's batch call, which releases the GIL while it works, so the event loop runs meanwhile."""

    def __init__(self, tokenizer):
        self.hf = tokenizer
        self.backend = self._own_backend(tokenizer)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")

    @staticmethod
    def _own_backend(tokenizer):
        """A private copy of the Rust tokenizer, set as ``encode`` sets it on every call (truncation and
        padding off: a model's tokenizer.json may turn them on; special tokens written in the text split or
        not as the tokenizer's ``split_special_tokens`` says), or None where ``encode`` does more than the
        Rust tokenizer (a slow tokenizer, or a subclass with its own ``_encode_plus``) or the tokenizer cannot
        be copied (a custom Python pre-tokenizer does not serialize): ``encode`` itself is used then."""
        try:
            from tokenizers import Tokenizer
            from transformers.tokenization_utils_tokenizers import TokenizersBackend
        except ImportError:
            return None
        if not isinstance(tokenizer, TokenizersBackend) or type(tokenizer)._encode_plus is not TokenizersBackend._encode_plus:
            return None
        try:
            backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        except Exception:  # noqa: BLE001 - any failure to copy falls back to the tokenizer's own encode
            return None
        backend.no_truncation()
        backend.no_padding()
        backend.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
        return backend

    def __len__(self) -> int:
        return len(self.hf)

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        if self.backend is not None:
            return self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def _encode_chat(self, messages: list[dict]) -> list[int]:
        text = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self._encode(text, False)  # the template already wrote the special tokens

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return await asyncio.get_running_loop().run_in_executor(self.pool, self._encode, text, add_special_tokens)

    async def encode_chat(self, messages: list[dict]) -> list[int]:
        return await asyncio.get_running_loop().run_in_executor(self.pool, self._encode_chat, messages)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class ServiceState:
    def __init__(self, config: ServiceConfig, backend=None):
        self.config = config
        self.backend = backend or (UpstreamBackend(config.upstream, config.served_name, config.upstream_api_key)
                                   if config.upstream else
                                   EngineBackend(config.model, config.served_name, config.engine_kwargs))
        self.keys = KeyRing(config.api_keys)
        self.limiter = RateLimiter(config.rate_limit, config.rate_burst)
        self.admission = Admission(config.max_in_flight)
        self.draining = False
        self.metrics = Metrics(self)
        self.tokenizer = None

    def ready(self) -> bool:
        return self.backend.state == "ready" and not self.draining


def _json(status: int, body: dict, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


class PolicyMiddleware:
    """Request ids, authentication, admission, the access log and the request metrics (pure ASGI)."""

    def __init__(self, app, state: ServiceState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state, config = self.state, self.state.config
        started = time.perf_counter()
        path, method = scope["path"], scope["method"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        incoming = headers.get("x-request-id", "")
        request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        info = scope.setdefault("state", {})
        info.update(request_id=request_id, ttft=None, output_tokens=0)
        status = {"code": None}

        async def send_with_id(message):
            if admitted and message["type"] == "http.response.body" and not message.get("more_body"):
                release()  # before the last bytes go out: a client that sends its next request as soon as
                # it has read them must find the slot free (after `finally` it could still be taken)
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        tenant = state.keys.tenant(headers.get("authorization")) if path not in OPEN_PATHS else "-"
        reject = None
        admitted = False
        held = {"slot": False}

        def release():
            if held["slot"]:
                held["slot"] = False
                state.admission.leave()

        if tenant is None:
            reject = (401, "unauthorized", error_body("Invalid or missing API key. Send 'Authorization: Bearer "
                                                      "<key>'.", "invalid_api_key", 401),
                      {"WWW-Authenticate": "Bearer"})
        elif method == "POST" and path in GENERATION_PATHS:
            reject, receive = await self._admit(tenant, headers, receive)
            admitted = held["slot"] = reject is None
        try:
            if reject:
                code, reason, body, extra = reject
                state.metrics.rejections.labels(reason).inc()
                info["reason"] = reason
                await _json(code, body, extra)(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        except asyncio.CancelledError:
            if state.draining and not info.get("reason"):
                info["reason"] = "shutdown"
            raise
        except Exception:
            # A bug, not the client's fault: log it with its traceback and answer a JSON 500 (logged and
            # counted as 500, with the request id). Once a response has started the connection is cut.
            log.exception("request %s failed", request_id)
            info["reason"] = "internal_error"
            if status["code"] is not None:
                raise
            await _json(500, error_body("Internal server error; the server's log has the details "
                                        f"(request id {request_id}).", "internal_error", 500))(
                scope, receive, send_with_id)
        finally:
            release()
            code = status["code"] or STATUS_CLIENT_GONE
            if info.get("client_gone"):
                code = STATUS_CLIENT_GONE
            route = path if path in KNOWN_ROUTES else "other"
            elapsed = time.perf_counter() - started
            state.metrics.requests.labels(route, str(code)).inc()
            state.metrics.duration.labels(route).observe(elapsed)
            if info["ttft"] is not None:
                state.metrics.ttft.observe(info["ttft"])
            state.metrics.tokens.inc(info["output_tokens"])
            if info.get("streaming") and info.get("reason"):
                state.metrics.streams_cut.labels(info["reason"]).inc()
            access_log.info(json.dumps({
                "ts": round(time.time(), 3), "request_id": request_id, "tenant": tenant, "method": method,
                "path": path, "status": code, "duration_ms": round(elapsed * 1000, 2),
                "ttft_ms": None if info["ttft"] is None else round(info["ttft"] * 1000, 2),
                "output_tokens": info["output_tokens"], "reason": info.get("reason"),
                "client": (scope.get("client") or ("-",))[0]}))

    async def _admit(self, tenant: str, headers: dict, receive):
        """(rejection or None, the receive channel for the app). Reads the body up to the size limit."""
        state, config = self.state, self.state.config
        limit = config.max_body_bytes
        too_large = (413, "body_too_large",
                     error_body(f"The request body is larger than {limit:,} bytes.", "invalid_request_error", 413),
                     None)
        try:
            if int(headers.get("content-length") or 0) > limit:
                return too_large, receive
        except ValueError:
            return (400, "invalid", error_body("Bad Content-Length header.", "invalid_request_error", 400),
                    None), receive
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return (STATUS_CLIENT_GONE, "client_gone", error_body("client gone", "client_gone"), None), receive
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                return too_large, receive
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # after the body: wait for the client to disconnect

        backend_state = state.backend.state
        if state.draining:
            return (503, "draining", error_body("The server is shutting down; retry on another replica.",
                                                "service_unavailable", 503),
                    {"Retry-After": "1", "Connection": "close"}), replay
        if backend_state != "ready":
            reason = "engine_starting" if backend_state == "starting" else "engine_dead"
            text = ("The model is still loading; retry shortly." if backend_state == "starting"
                    else "The inference engine is not available.")
            return (503, reason, error_body(text, "service_unavailable", 503), {"Retry-After": "5"}), replay
        wait = state.limiter.retry_after(tenant)
        if wait > 0:
            return (429, "rate_limited",
                    error_body(f"Rate limit of {config.rate_limit:g} requests/s (burst {config.rate_burst}) "
                               f"exceeded for this key; retry after {wait:.2f} s.", "rate_limit_exceeded", 429),
                    {"Retry-After": retry_after_header(wait)}), replay
        if not state.admission.try_enter():
            return (503, "overloaded",
                    error_body(f"The server is at its limit of {config.max_in_flight} requests in flight; "
                               "retry shortly.", "service_unavailable", 503),
                    {"Retry-After": "1"}), replay
        return None, replay


async def _first_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _cancel_on_disconnect(request: Request, work):
    """Run ``work``; cancel it (which aborts the engine request) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_first_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    return None


def create_app(config: ServiceConfig, backend=None) -> FastAPI:
    """The service. The engine (or the upstream) is started in the background by the lifespan, so the
    probes answer at once: ``/ready`` is 503 until the model can serve."""
    state = ServiceState(config, backend)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        from transformers import AutoTokenizer

        state.tokenizer = PromptTokenizer(await asyncio.to_thread(AutoTokenizer.from_pretrained, config.model))
        starting = asyncio.create_task(state.backend.start())
        starting.add_done_callback(_exit_if_failed)
        app.state.starting = starting
        try:
            yield
        finally:
            try:
                starting.cancel()
                await state.backend.stop()
            finally:
                state.tokenizer.close()

    app = FastAPI(title="inference-course service", version="1.0",
                  description="An OpenAI-compatible service in front of vLLM (Lab 2.3).", lifespan=lifespan)
    app.state.service = state
    app.add_middleware(PolicyMiddleware, state=state)
    errors = {code: {"description": text, "model": ErrorResponse} for code, text in (
        (400, "bad request"), (401, "missing or invalid API key"), (404, "unknown model"),
        (413, "body too large"), (422, "invalid body"), (429, "rate limited"), (503, "unavailable"),
        (504, "timed out"))}
    generation = {**errors, 200: {"description": "a JSON response, or server-sent events with stream=true",
                                  "content": {"application/json": {}, "text/event-stream": {}}}}

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        problems = exc.errors()
        request.scope["state"]["reason"] = "invalid"
        if any(p.get("type") == "json_invalid" for p in problems):
            return _json(400, error_body("The body is not valid JSON.", "invalid_request_error", 400))

        def field_of(problem) -> str:  # drop pydantic's union-branch tags ("temperature.float")
            loc = [str(x) for x in problem["loc"][1:] if not (isinstance(x, str) and _UNION_TAG.search(x))]
            return ".".join(loc) or "body"

        # A union reports every member that failed ("stop": not a string; "stop.1": too short): a type
        # mismatch is left out when a deeper problem of the same field says more.
        where = [field_of(p) for p in problems]
        problems = [p for p, at in zip(problems, where) if not (
            p.get("type", "").endswith("_type") and any(o != at and o.startswith(at + ".") for o in where))] or problems
        parts = list(dict.fromkeys(f"{field_of(p)}: {p['msg']}" for p in problems))[:5]
        param = field_of(problems[0]) if problems else None
        return _json(422, error_body("Invalid request. " + "; ".join(parts), "invalid_request_error", 422, param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _json(exc.status_code, error_body(str(exc.detail), "invalid_request_error", exc.status_code))

    probe = {503: {"description": "not live / not ready (the body says why)", "model": ProbeStatus}}

    @app.get("/health", response_model=ProbeStatus, responses=probe)
    async def health():
        """Liveness: the process answers. 503 only when its in-process engine died (a restart fixes that)."""
        if state.backend.kind == "engine" and state.backend.state == "dead":
            return _json(503, {"status": "dead"})
        return {"status": "ok"}

    @app.get("/ready", response_model=ProbeStatus, responses=probe)
    async def ready():
        """Readiness: 200 only when the model serves and the service is not draining."""
        if state.draining:
            return _json(503, {"status": "draining"})
        if state.backend.state != "ready":
            return _json(503, {"status": state.backend.state})
        return {"status": "ready"}

    @app.get("/metrics", response_class=Response, responses={
        200: {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}},
        401: errors[401]})
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", responses={401: errors[401]})
    async def models():
        return {"object": "list", "data": [{
            "id": config.served_name, "object": "model", "created": 0, "owned_by": "inference-course",
            "max_model_len": state.backend.max_model_len}]}

    def _unknown_model(body, request: Request):
        """The 404 for a model this server does not serve (checked before any tokenizing), else None."""
        if body.model == config.served_name:
            return None
        request.scope["state"]["reason"] = "unknown_model"
        return _json(404, error_body(f"The model '{body.model}' does not exist; this server serves "
                                     f"'{config.served_name}'.", "invalid_request_error", "model_not_found", "model"))

    @app.post("/v1/chat/completions", responses=generation)
    async def chat(body: ChatRequest, request: Request):
        if (refused := _unknown_model(body, request)) is not None:
            return refused
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            prompt_ids = await state.tokenizer.encode_chat(messages)
        except TemplateError as exc:  # the model's chat template refuses these messages (e.g. roles out of order)
            if isinstance(exc, SERVER_TEMPLATE_ERRORS):  # the template itself is broken: the server's fault (500)
                raise
            request.scope["state"]["reason"] = "invalid"
            return _json(400, error_body(f"This model's chat template refuses these messages: {exc}",
                                         "invalid_request_error", 400, "messages"))
        return await _generate("chat", body, prompt_ids, request)

    @app.post("/v1/completions", responses=generation)
    async def completions(body: CompletionRequest, request: Request):
        if (refused := _unknown_model(body, request)) is not None:
            return refused
        prompt_ids = (list(body.prompt) if isinstance(body.prompt, list)
                      else await state.tokenizer.encode(body.prompt))
        return await _generate("completion", body, prompt_ids, request)

    async def _generate(kind: str, body, prompt_ids: list[int], request: Request):
        info = request.scope["state"]
        limit = state.backend.max_model_len
        if prompt_ids and isinstance(prompt_ids[0], int) and kind == "completion":
            vocab = len(state.tokenizer)
            if any(t < 0 or t >= vocab for t in prompt_ids):
                info["reason"] = "invalid"
                return _json(400, error_body(f"Token ids must be in [0, {vocab}).", "invalid_request_error", 400,
                                             "prompt"))
        asked = body.requested_tokens()
        if len(prompt_ids) + (asked or 1) > limit:
            info["reason"] = "too_long"
            detail = (f"{len(prompt_ids)} in the prompt" + (f" + {asked} to generate" if asked else "") +
                      f" = {len(prompt_ids) + (asked or 1)} tokens, more than this model's context of {limit} "
                      "tokens. Shorten the prompt or lower max_tokens.")
            return _json(400, error_body(detail, "invalid_request_error", 400,
                                         "max_tokens" if asked and len(prompt_ids) < limit else "messages"))
        max_tokens = asked or (limit - len(prompt_ids))
        from .backends import sampling_kwargs

        sampling = sampling_kwargs(body, max_tokens)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        writer = ChunkWriter(kind, info["request_id"], config.served_name, len(prompt_ids), include_usage)
        engine_id = f"{info['request_id']}-{uuid.uuid4().hex[:8]}"  # unique even if a client reuses ids
        started = time.perf_counter()
        timeout = config.request_timeout_s
        if body.stream:
            return await _stream(writer, body, prompt_ids, sampling, engine_id, info, started, timeout)
        try:
            async with asyncio.timeout(timeout):
                result = await _cancel_on_disconnect(
                    request, state.backend.complete(writer, body, prompt_ids, sampling, engine_id))
        except TimeoutError:
            info["reason"] = "timeout"
            info["output_tokens"] = writer.completion_tokens  # generated, then thrown away
            return _json(504, error_body(f"No complete answer within {timeout:g} s.", "timeout", 504))
        except EngineDead as exc:
            info["reason"] = "engine_dead"
            return _json(503, error_body(str(exc), "service_unavailable", 503), {"Retry-After": "5"})
        except UpstreamError as exc:
            return _json(exc.status, upstream_error_json(exc))
        if result is None:
            info["client_gone"] = True
            info["reason"] = "client_gone"
            return Response(status_code=STATUS_CLIENT_GONE)
        info["output_tokens"] = writer.completion_tokens
        info["ttft"] = time.perf_counter() - started
        return result

    async def _stream(writer, body, prompt_ids, sampling, engine_id, info, started, timeout):
        events = state.backend.stream(writer, body, prompt_ids, sampling, engine_id)
        deadline = asyncio.get_running_loop().time() + timeout
        try:  # the first event before the headers: an upstream refusal keeps its status code
            async with asyncio.timeout_at(deadline):
                first = await anext(events)
        except TimeoutError:
            await events.aclose()
            return _json(504, error_body(f"No answer within {timeout:g} s.", "timeout", 504))
        except EngineDead as exc:
            info["reason"] = "engine_dead"
            return _json(503, error_body(str(exc), "service_unavailable", 503), {"Retry-After": "5"})
        except UpstreamError as exc:
            return _json(exc.status, upstream_error_json(exc))

        async def body_iter():
            info["streaming"] = True  # the 200 is on its way: a cut from now on is counted apart
            try:
                yield first
                async with asyncio.timeout_at(deadline):
                    async for event in events:
                        if info["ttft"] is None and writer.completion_tokens > 0:
                            info["ttft"] = time.perf_counter() - started
                        yield event
            except TimeoutError:
                info["reason"] = "timeout"
                yield stream_error(f"The answer took longer than {timeout:g} s and was cut.", "timeout", 504)
            except EngineDead as exc:
                info["reason"] = "engine_dead"
                yield stream_error(str(exc), "service_unavailable", 503)
            except asyncio.CancelledError:  # the engine request is aborted
                if state.draining:  # cut by the server's stop (the drain timed out, or a second signal)
                    info["reason"] = "shutdown"
                else:  # the client went away
                    info["client_gone"] = True
                    info["reason"] = "client_gone"
                raise
            finally:
                info["output_tokens"] = writer.completion_tokens
                await events.aclose()

        return StreamingResponse(body_iter(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    return app


def _exit_if_failed(task: asyncio.Task) -> None:
    """A service whose engine cannot start is of no use: end the process (the supervisor sees why)."""
    if task.cancelled() or task.exception() is None:
        return
    import os
    import signal

    log.error("the backend failed to start (%s); exiting", task.exception())
    os.kill(os.getpid(), signal.SIGTERM)
