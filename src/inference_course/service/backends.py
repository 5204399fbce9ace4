"""What sits behind the service: the two architectures of Lab 2.3.

(a) ``EngineBackend``: the service owns the engine. vLLM's ``AsyncLLM`` (the engine client behind
    ``vllm serve``; the same API in vLLM 0.24 and 0.32) runs in the service's process and event loop;
    its EngineCore runs in a child process. One process to deploy, no extra network hop, and the
    service sees every token as the engine produces it. Disconnects reach the engine directly: when a
    client goes away the request's generator is cancelled and ``AsyncLLM.generate`` aborts it.

(b) ``UpstreamBackend``: a thin gateway. A ``vllm serve`` process runs beside the service, which
    checks and forwards each request over HTTP (httpx) and streams the bytes back unchanged. The
    gateway can be restarted, scaled and upgraded apart from the engine, at the price of one more hop
    and one more copy of every chunk. Closing the upstream response when the client disconnects is
    what makes ``vllm serve`` abort the request.

Both give the application the same things: ``start``/``stop``, a ``state`` (``starting``, ``ready``,
``dead``), the model's ``max_model_len``, and for one validated request either the stream of
server-sent events (``stream``) or the whole response (``complete``).
"""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from .wire import ChunkWriter, Delta, error_body, sse

log = logging.getLogger("inference_course.service")


class EngineDead(RuntimeError):
    """The engine behind the service is gone: answer 503 and fail readiness."""


class UpstreamError(RuntimeError):
    """The upstream server answered an error; carries its status and body to pass on."""

    def __init__(self, status: int, body: bytes):
        super().__init__(f"upstream answered {status}")
        self.status, self.body = status, body


def sampling_kwargs(req, max_tokens: int) -> dict[str, Any]:
    """The request's sampling settings as ``vllm.SamplingParams`` keyword arguments."""
    return dict(max_tokens=max_tokens, temperature=float(req.temperature), top_p=float(req.top_p),
                seed=req.seed, stop=req.stops() or None, ignore_eos=req.ignore_eos,
                presence_penalty=float(req.presence_penalty), frequency_penalty=float(req.frequency_penalty))


class EngineBackend:
    """Architecture (a): an in-process ``vllm.v1.engine.async_llm.AsyncLLM``."""

    kind = "engine"

    def __init__(self, model: str, served_name: str, engine_kwargs: dict[str, Any]):
        self.model, self.served_name, self.engine_kwargs = model, served_name, dict(engine_kwargs)
        self.engine = None
        self.max_model_len: int | None = None
        self.start_error: str | None = None

    @property
    def state(self) -> str:
        if self.engine is None:
            return "dead" if self.start_error else "starting"
        return "dead" if self.engine.errored else "ready"

    async def start(self) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(model=self.model, served_model_name=[self.served_name], disable_log_stats=False,
                               **self.engine_kwargs)
        try:
            # Building the engine takes tens of seconds (weights, KV cache, warm-up). In a worker thread
            # the event loop keeps answering /health and /ready meanwhile; AsyncLLM starts its output
            # handler on this loop at the first request.
            # OPENAI_API_SERVER: the defaults `vllm serve` gets (on a large GPU vLLM raises
            # max_num_batched_tokens and max_num_seqs for an API server, not for ENGINE_CONTEXT).
            self.engine = await asyncio.to_thread(AsyncLLM.from_engine_args, args,
                                                  usage_context=UsageContext.OPENAI_API_SERVER)
        except Exception as exc:
            self.start_error = f"{type(exc).__name__}: {exc}"
            log.error("engine failed to start: %s", self.start_error)
            raise
        self.max_model_len = self.engine.model_config.max_model_len

    async def stop(self) -> None:
        if self.engine is not None:
            await asyncio.to_thread(self.engine.shutdown)

    async def deltas(self, prompt_ids: list[int], sampling: dict, request_id: str) -> AsyncIterator[Delta]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.exceptions import EngineDeadError

        if self.state != "ready":
            raise EngineDead(f"the engine is {self.state}")
        params = SamplingParams(output_kind=RequestOutputKind.DELTA, **sampling)
        try:
            async for out in self.engine.generate({"prompt_token_ids": prompt_ids}, params, request_id):
                piece = out.outputs[0]
                yield Delta(piece.text, len(piece.token_ids), piece.finish_reason)
        except EngineDeadError as exc:
            raise EngineDead("the engine died while serving this request") from exc

    async def stream(self, writer: ChunkWriter, req, prompt_ids: list[int], sampling: dict,
                     request_id: str) -> AsyncIterator[bytes]:
        yield writer.opening()
        async for delta in self.deltas(prompt_ids, sampling, request_id):
            event = writer.add(delta)
            if event:
                yield event
        yield writer.closing()

    async def complete(self, writer: ChunkWriter, req, prompt_ids: list[int], sampling: dict,
                       request_id: str) -> dict:
        async for delta in self.deltas(prompt_ids, sampling, request_id):
            writer.add(delta)
        return writer.response()


class UpstreamBackend:
    """Architecture (b): forward to a ``vllm serve`` at ``url`` with httpx, bytes through unchanged."""

    kind = "upstream"

    def __init__(self, url: str, served_name: str, api_key: str | None = None, poll_s: float = 0.5):
        self.url, self.served_name, self.poll_s = url.rstrip("/"), served_name, poll_s
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = None
        self.max_model_len: int | None = None
        self._state = "starting"
        self._watch: asyncio.Task | None = None

    @property
    def state(self) -> str:
        return self._state

    async def start(self) -> None:
        import httpx

        # No timeout on reads: a long generation streams for minutes; the service's own per-request
        # timeout bounds it. Enough connections for every request the service admits.
        self.client = httpx.AsyncClient(base_url=self.url, headers=self.headers, trust_env=False,
                                        timeout=httpx.Timeout(10.0, read=None),
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=256))
        while self.max_model_len is None:
            try:
                answer = await self.client.get("/v1/models")
                if answer.status_code == 200:
                    models = answer.json()["data"]
                    self.max_model_len = next((m.get("max_model_len") for m in models
                                               if m["id"] == self.served_name), None) or models[0]["max_model_len"]
                    break
            except Exception:  # not up yet
                pass
            await asyncio.sleep(self.poll_s)
        self._state = "ready"
        self._watch = asyncio.create_task(self._watch_health())

    async def _watch_health(self) -> None:
        """Readiness follows the upstream's /health, checked every second."""
        while True:
            await asyncio.sleep(1.0)
            try:
                ok = (await self.client.get("/health", timeout=2.0)).status_code == 200
            except Exception:
                ok = False
            self._state = "ready" if ok else "dead"

    async def stop(self) -> None:
        if self._watch:
            self._watch.cancel()
        if self.client:
            await self.client.aclose()

    def _path(self, writer: ChunkWriter) -> str:
        return "/v1/chat/completions" if writer.kind == "chat" else "/v1/completions"

    def _body(self, req) -> dict:
        body = req.model_dump(exclude_none=True)
        body["model"] = self.served_name
        return body

    async def stream(self, writer: ChunkWriter, req, prompt_ids: list[int], sampling: dict,
                     request_id: str) -> AsyncIterator[bytes]:
        import httpx

        if self.state != "ready":
            raise EngineDead(f"the upstream is {self.state}")
        request = self.client.build_request("POST", self._path(writer), json=self._body(req),
                                            headers={"X-Request-Id": request_id})
        try:
            response = await self.client.send(request, stream=True)
        except httpx.TransportError as exc:
            raise EngineDead(f"the upstream is unreachable: {type(exc).__name__}") from exc
        try:  # leaving this block early (client gone, timeout) closes the upstream stream: vLLM aborts
            if response.status_code != 200:
                raise UpstreamError(response.status_code, await response.aread())
            async for data in response.aiter_raw():
                # Count token events for the service's metrics without parsing JSON: vLLM streams one
                # event per engine step, written without spaces; its chat role event has no
                # '"delta":{"content":' (the role comes first) and is not counted.
                writer.completion_tokens += data.count(b'"delta":{"content":') + data.count(b'"text":')
                yield data
        except httpx.TransportError as exc:
            raise EngineDead(f"the upstream broke off: {type(exc).__name__}") from exc
        finally:
            await response.aclose()

    async def complete(self, writer: ChunkWriter, req, prompt_ids: list[int], sampling: dict,
                       request_id: str) -> dict:
        import httpx

        if self.state != "ready":
            raise EngineDead(f"the upstream is {self.state}")
        try:
            response = await self.client.post(self._path(writer), json=self._body(req),
                                              headers={"X-Request-Id": request_id})
        except httpx.TransportError as exc:
            raise EngineDead(f"the upstream is unreachable: {type(exc).__name__}") from exc
        if response.status_code != 200:
            raise UpstreamError(response.status_code, response.content)
        body = response.json()
        writer.completion_tokens = body.get("usage", {}).get("completion_tokens", 0)
        return body


def stream_error(message: str, type_: str, code: int) -> bytes:
    """An error reported inside an already started stream (the openai SDK raises it as APIError)."""
    return sse(error_body(message, type_, code)) + b"data: [DONE]\n\n"


def upstream_error_json(error: UpstreamError) -> dict:
    try:
        return json.loads(error.body)
    except ValueError:
        return error_body(error.body.decode(errors="replace")[:500] or "upstream error", "upstream_error",
                          error.status)
