"""Load shapes for Lab 2.5 (notebook 04): ramp -> steady -> burst against an OpenAI-compatible server.

Run it as its own process (locust monkey-patches the standard library with gevent, so never import it into a
notebook kernel)::

    python -m locust -f locustfile.py --headless --host http://127.0.0.1:8000 --csv out/run --only-summary

What it does:

* ``CompletionUser`` sends streaming ``/v1/completions`` requests and reads the stream. Locust's own clock for a
  ``stream=True`` request stops when the response headers arrive, so the user reports the times itself, as
  request types of their own: ``TTFT`` (first token chunk) and ``E2E`` (last chunk), each named after the stage
  of the load shape it was sent in (``ramp``, ``steady``, ``burst``). In locust's CSV every (type, name) pair is
  a row: the TTFT of the steady stage alone is the row ``TTFT,steady``.
* Each user sends at most ``user_rate`` requests per second (``constant_throughput``): with ``U`` users the
  offered load is at most ``U × user_rate`` req/s, as long as a request takes less than ``1 / user_rate``.
* ``StagesShape`` (a ``LoadTestShape``) walks through the stages: how many users, for how long, and how fast
  they are started. When the last stage ends it returns None and locust stops.
* A stage with ``"send": false`` (the notebook ends with one, "drain") keeps its users but they start no new
  request: the requests sent in the stage before it run to their end and are counted. Locust stops a user that
  is still inside a request when the test ends, and that request would then be missing from the statistics.

The settings come from a JSON file named by ``$LOCUST_CONFIG`` (the notebook writes one sized for its
profile); without it, the defaults below apply::

    {"model": "smollm2", "max_tokens": 32, "user_rate": 1.0, "prompts": ["..."],
     "stages": [{"name": "ramp", "duration": 6, "users": 4, "spawn_rate": 1}, ...]}
"""
from __future__ import annotations

import itertools
import json
import os
import time

from locust import HttpUser, LoadTestShape, constant_throughput, task

DEFAULTS = {
    "model": "smollm2",
    "max_tokens": 32,
    "user_rate": 1.0,
    "prompts": ["Explain in one paragraph what a KV cache is and why an inference server keeps one."],
    "stages": [
        {"name": "ramp", "duration": 6, "users": 4, "spawn_rate": 1},     # 0 -> 4 users over about 4 s
        {"name": "steady", "duration": 12, "users": 4, "spawn_rate": 1},
        {"name": "burst", "duration": 6, "users": 12, "spawn_rate": 100},  # 3x the users, all at once
    ],
}


def load_config(path: str | None = None) -> dict:
    """DEFAULTS, updated with the JSON file at ``path`` (default: ``$LOCUST_CONFIG``) when there is one."""
    config = dict(DEFAULTS)
    path = path or os.environ.get("LOCUST_CONFIG")
    if path:
        with open(path, encoding="utf-8") as f:
            config.update(json.load(f))
    return config


CONFIG = load_config()


def stage_at(run_time: float, stages: list[dict] = CONFIG["stages"]) -> dict | None:
    """The stage that is running ``run_time`` seconds after the start (None once the last one has ended)."""
    end = 0.0
    for stage in stages:
        end += stage["duration"]
        if run_time < end:
            return stage
    return None


class StagesShape(LoadTestShape):
    """ramp -> steady -> burst, as listed in CONFIG["stages"]."""

    def tick(self):
        stage = stage_at(self.get_run_time())
        if stage is None:
            return None  # the last stage has ended: stop the test
        return stage["users"], stage["spawn_rate"]


class CompletionUser(HttpUser):
    wait_time = constant_throughput(CONFIG["user_rate"])
    prompts = itertools.cycle(CONFIG["prompts"])

    def stage_name(self) -> str:
        shape = self.environment.shape_class
        stage = stage_at(shape.get_run_time()) if shape is not None else None
        return stage["name"] if stage else "after"

    def report(self, request_type: str, name: str, seconds: float, exception=None) -> None:
        self.environment.events.request.fire(request_type=request_type, name=name, response_time=seconds * 1000,
                                             response_length=0, exception=exception, context={})

    def sends(self) -> bool:
        shape = self.environment.shape_class
        stage = stage_at(shape.get_run_time()) if shape is not None else None
        return stage is None or stage.get("send", True)

    @task
    def completion(self):
        if not self.sends():
            time.sleep(0.2)  # a draining stage: let the requests in flight finish, start none
            return
        stage = self.stage_name()
        body = {"model": CONFIG["model"], "prompt": next(self.prompts), "max_tokens": CONFIG["max_tokens"],
                "temperature": 0, "ignore_eos": True, "stream": True}
        start = time.perf_counter()
        first = last = None
        with self.client.post("/v1/completions", json=body, stream=True, catch_response=True,
                              name="/v1/completions") as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}")
                return
            for line in response.iter_lines(chunk_size=None):
                if not line.startswith(b"data:") or line.strip() == b"data: [DONE]":
                    continue
                if json.loads(line[5:]).get("choices"):  # a token chunk
                    last = time.perf_counter()
                    first = first or last
            if first is None:
                response.failure("the stream ended without any token chunk")
                return
            # Locust's clock stopped at the headers (stream=True); count the whole stream instead.
            response.request_meta["response_time"] = (last - start) * 1000
        self.report("TTFT", stage, first - start)
        self.report("E2E", stage, last - start)
