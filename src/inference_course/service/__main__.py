"""Run the service: ``python -m inference_course.service --model PATH [options]``.

API keys come from the environment (``COURSE_SERVICE_KEYS="tenant-a:key1,tenant-b:key2"``), never from
the command line, where every user of the machine could read them in the process list.

Shutdown on SIGTERM (what Kubernetes and ``podman stop`` send) drains instead of dropping work:

1. ``/ready`` turns 503 and new generation requests get 503 + ``Connection: close`` (a load balancer
   takes the replica out; a client retries elsewhere);
2. requests in flight, streams included, run to their end, for at most ``--drain-timeout`` seconds;
3. then uvicorn stops and the engine shuts down. A second SIGTERM or SIGINT stops at once.

Send SIGTERM to the service's process only, as the kubelet does to a container's PID 1: a signal to
the whole process group also reaches vLLM's EngineCore child, which then stops under the requests.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys

from .app import ServiceConfig, create_app
from .policy import parse_keys

ENV_KEYS = "COURSE_SERVICE_KEYS"


def _engine_value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m inference_course.service", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="model folder (its tokenizer and chat template are used)")
    p.add_argument("--served-model-name", default="smollm2")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--upstream", help="URL of a `vllm serve` to forward to (architecture b); "
                                      "without it the service owns an in-process engine (architecture a)")
    p.add_argument("--rate-limit", type=float, help="requests per second per API key (token bucket)")
    p.add_argument("--rate-burst", type=int, default=10)
    p.add_argument("--max-in-flight", type=int, default=64, help="admission cap; 0 for none")
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--drain-timeout", type=float, default=30.0)
    p.add_argument("--engine-arg", action="append", default=[], metavar="NAME=VALUE",
                   help="vLLM engine argument (AsyncEngineArgs field), repeatable: --engine-arg max_num_seqs=8")
    p.add_argument("--profile-engine", action="store_true",
                   help="start from the course profile's engine settings (dtype, max_model_len, memory, eager) "
                        "and its engine environment (profiles.Profile.vllm_env)")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> ServiceConfig:
    engine: dict = {}
    if args.profile_engine:
        from ..profiles import get_profile

        profile = get_profile()
        engine.update(profile.vllm_engine_kwargs())
        # and the profile's engine environment (cpu: the model runs inside the EngineCore process, no
        # worker process), the same as servers.service_server gives a service started on the host
        profile.apply_vllm_env()
    for item in args.engine_arg:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--engine-arg takes NAME=VALUE, got {item!r}")
        engine[name.strip().replace("-", "_")] = _engine_value(value)
    return ServiceConfig(
        model=args.model, served_name=args.served_model_name, upstream=args.upstream,
        upstream_api_key=os.environ.get("COURSE_UPSTREAM_KEY"),
        api_keys=parse_keys(os.environ.get(ENV_KEYS)), rate_limit=args.rate_limit, rate_burst=args.rate_burst,
        max_in_flight=args.max_in_flight or None, request_timeout_s=args.request_timeout,
        max_body_bytes=args.max_body_bytes, drain_timeout_s=args.drain_timeout, engine_kwargs=engine)


def serve(config: ServiceConfig, host: str, port: int) -> None:
    import uvicorn

    app = create_app(config)
    state = app.state.service

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if state.draining:  # a second signal: stop now
                return super().handle_exit(sig, frame)
            state.draining = True
            logging.getLogger("inference_course.service").warning(
                "signal %s: draining %d request(s) in flight (at most %g s)", sig, state.admission.in_flight,
                config.drain_timeout_s)
            loop = asyncio.get_event_loop()
            loop.call_soon_threadsafe(lambda: loop.create_task(self._drain(sig, frame)))

        async def _drain(self, sig, frame):
            loop = asyncio.get_running_loop()
            deadline = loop.time() + config.drain_timeout_s
            while state.admission.in_flight > 0 and loop.time() < deadline:
                await asyncio.sleep(0.05)
            logging.getLogger("inference_course.service").warning(
                "drained; %d request(s) still in flight; stopping", state.admission.in_flight)
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets=None):
            await super().shutdown(sockets)
            # uvicorn has cancelled what was still in flight; let those requests end (their access-log
            # line) before the process ends: uvicorn re-raises the signal right after this returns.
            pending = [task for task in self.server_state.tasks if not task.done()]
            if pending:
                await asyncio.wait(pending, timeout=5)

    # The drain above is the graceful part. When uvicorn then stops, what is still in flight (a request
    # that outlived the drain, or everything after a second signal) gets 1 s more, not a second
    # drain_timeout_s: uvicorn's own graceful wait would double the promised bound.
    server = DrainingServer(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=1))
    server.run()


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    # vLLM's periodic stats lines would bury the access log; the engine's warnings and errors stay.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    # httpx logs every request at INFO: in architecture (b), one line per upstream health check (1/s).
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = parse_args(argv)
    serve(config_from_args(args), args.host, args.port)


if __name__ == "__main__":
    main()
