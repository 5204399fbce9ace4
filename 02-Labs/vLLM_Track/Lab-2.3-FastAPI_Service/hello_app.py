"""A teaching toy for Lab 2.3 notebook 01: the smallest FastAPI app that answers JSON and streams
server-sent events (SSE). There is no model here: ``/count`` streams a few numbered events on a timer,
so that the bytes an SSE client receives can be read without an engine in the way.

Run it the way the notebook does::

    python -m uvicorn hello_app:app --port 8000 --app-dir <this folder>

and try ``curl -N 'http://127.0.0.1:8000/count?n=3'`` (``-N``: print each event as it arrives).
"""
from __future__ import annotations

import asyncio
import json

from fastapi import FastAPI, Query
from fastapi.responses import StreamingResponse

app = FastAPI(title="hello (Lab 2.3 toy)")


@app.get("/")
async def hello(name: str = "world") -> dict:
    """A plain JSON answer: FastAPI turns the returned dict into the response body."""
    return {"message": f"hello, {name}"}


@app.get("/count")
async def count(n: int = Query(3, ge=1, le=20), delay_s: float = Query(0.1, ge=0, le=2)):
    """``n`` numbered events, one every ``delay_s`` seconds, then ``data: [DONE]``: the shape of an
    OpenAI stream. Each event is ``data: <json>`` followed by a blank line; ``: ping`` is a comment
    line (clients ignore it; servers send such lines to keep idle connections open)."""

    async def events():
        yield b": ping\n\n"
        for i in range(1, n + 1):
            await asyncio.sleep(delay_s)
            yield f"data: {json.dumps({'i': i, 'of': n})}\n\n".encode()
        yield b"data: [DONE]\n\n"

    # text/event-stream tells clients (a browser's EventSource, the openai SDK) that this is SSE.
    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
