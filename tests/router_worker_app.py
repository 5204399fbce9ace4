"""A stand-in OpenAI-compatible worker for the router tests (tests/test_router.py).

It answers ``/health``, ``/v1/models`` and ``/v1/completions`` (plain and streamed) with its own name
(environment variable ``WORKER_NAME``) as the completion text, so a test sees which worker the router chose,
in a second and without an engine. The router under test is the real one (PyPI ``vllm-router``); the labs put
it in front of real ``vllm serve`` replicas.
"""
from __future__ import annotations

import json
import os

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

NAME = os.environ.get("WORKER_NAME", "worker")
app = FastAPI()
app.state.served = 0


@app.get("/health")
def health() -> dict:
    return {}


@app.get("/v1/models")
def models() -> dict:
    return {"object": "list", "data": [{"id": "m", "object": "model", "created": 0, "owned_by": NAME}]}


@app.get("/served")
def served() -> dict:
    """How many completions this worker answered (the third count beside the client's and the router's)."""
    return {"worker": NAME, "served": app.state.served}


def _choice(text: str, finish: str | None) -> dict:
    return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}


@app.post("/v1/completions")
async def completions(request: Request):
    body = await request.json()
    app.state.served += 1
    head = {"id": f"cmpl-{NAME}-{app.state.served}", "object": "text_completion", "created": 0,
            "model": body.get("model", "m")}
    if body.get("stream"):
        async def events():
            yield f"data: {json.dumps({**head, 'choices': [_choice(NAME, None)]})}\n\n"
            yield f"data: {json.dumps({**head, 'choices': [_choice('', 'stop')]})}\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")
    return {**head, "choices": [_choice(NAME, "stop")],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
