"""The course's OpenAI-compatible service in front of vLLM (Lab 2.3; Labs 2.4, 2.5 and the comparison
lab deploy, monitor and measure it).

What ``vllm serve`` leaves to you, this service adds: API keys on every route (per tenant), per-key
rate limits (429 + ``Retry-After``), a cap on requests in flight with no queue (503), strict
validation with clear errors, per-request timeouts, separate liveness (``/health``) and readiness
(``/ready``: 503 while the engine starts, is dead or the service drains), a drain on SIGTERM, request
ids, JSON access logs and Prometheus metrics. Two architectures behind the same routes:

* (a) the service owns an in-process vLLM ``AsyncLLM`` engine (``backends.EngineBackend``);
* (b) a thin gateway streaming through to a ``vllm serve`` (``backends.UpstreamBackend``).

Start it as a managed process (``inference_course.servers.service_server``) or from a shell::

    COURSE_SERVICE_KEYS="team-a:sk-a" python -m inference_course.service --model PATH --profile-engine

Files: ``wire.py`` (request models, SSE chunks), ``policy.py`` (keys, rate limits, admission),
``backends.py`` (a) and (b), ``app.py`` (routes, middleware, metrics, logs), ``__main__.py`` (the
command line and the drain on SIGTERM).
"""
from .app import ServiceConfig, create_app

__all__ = ["ServiceConfig", "create_app"]
