"""Lab 2.2 (Triton track): many models, many versions, and how to change them safely.

What only this lab teaches, written to be read:

- The lab's models are real files in ``model_repository/`` beside this module (``MODEL_REPOSITORY``):
  ``<model>/config.pbtxt`` and ``<model>/1/model.py``. The writers below copy one into a run's
  repository with ``inference_course.triton.copy_model`` and fill in what differs per run (model
  folder, instance kind, sleep times, batch limits) as config parameters or text substitutions.
- ``llm``: a Python-backend *generate* model around transformers, decoupled (one response per
  token through ``response_sender``), and ``stream_generate`` that consumes it with gRPC streaming.
- Model writers: the LLM, a small MLP classifier whose versions live side by side (weights and a
  ``behavior.json`` per version folder), and a ``sleeper`` whose compute time is set by its config.
- ``ABGateway``: Triton has no A/B feature; this small router in front of it splits traffic by weight
  or by a sticky user key and records every outcome.
- ``bootstrap_diff_ci`` / ``proportion_diff_ci``: confidence intervals with numpy only.
- ``CanaryController``: shifts traffic to a candidate version in steps, checks health and SLO gates
  after each step, and promotes or rolls back, logging every decision.

Tensors cross the Python backend through DLPack only: the bundled backend (tritonserver 2.51) mis-sizes
numpy 2 arrays and its BYTES tensors crash the stub, so text travels as token ids (INT64) and the
client tokenizes and detokenizes. The small models use numpy's own DLPack support (a stub that
imports torch needs seconds to start); the server log then shows a harmless "PyCapsule_GetPointer
called with incorrect name" traceback per tensor (the backend tries another capsule name first).
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from inference_course import triton

MODEL_REPOSITORY = Path(__file__).resolve().parent / "model_repository"


def model_file(model: str, filename: str = "config.pbtxt", version: int | None = None) -> str:
    """The text of a file of the lab's model repository, e.g. ``model_file("llm", "model.py", 1)``."""
    folder = MODEL_REPOSITORY / model
    return ((folder / str(version)) if version is not None else folder).joinpath(filename).read_text()


def start_server(repository, *, model_control_mode: str = "none", load_models=(), extra_args=(), **kw):
    """``inference_course.triton.triton_server`` with a 2 s exit timeout (use it with ``with``)."""
    kw.setdefault("exit_timeout_s", 2)
    return triton.triton_server(repository, model_control_mode=model_control_mode, load_models=load_models,
                                extra_args=list(extra_args), **kw)


# -- the LLM generate model (Python backend, decoupled) ----------------------------------------------

# model_repository/llm/1/model.py: token-by-token generation, one response per token (decoupled).
LLM_MODEL_PY = model_file("llm", "model.py", 1)


def _llm_changes(model_dir: str, *, kind: str = "KIND_CPU", temperature: float = 0.0, max_tokens: int = 32,
                 seed: int = 0, dtype: str = "float32") -> dict:
    replace = {} if kind == "KIND_CPU" else {"kind: KIND_CPU": f"kind: {kind}"}
    return {"parameters": {"model_dir": model_dir, "temperature": temperature, "max_tokens": max_tokens,
                           "seed": seed, "dtype": dtype}, "replace": replace}


def llm_config(model_dir: str, **kw) -> str:
    """config.pbtxt of the generate model (``model_repository/llm/config.pbtxt``) with the model folder,
    instance ``kind``, ``temperature``, ``max_tokens``, ``seed`` and ``dtype`` (a torch dtype name;
    float32, the default, keeps greedy answers identical to a float32 reference on CPU or GPU) filled in."""
    return triton.substitute(model_file("llm"), **_llm_changes(model_dir, **kw))


def write_llm_model(repository, name: str, model_dir: str, **config_kw) -> Path:
    """Copy ``model_repository/llm`` to ``<repository>/<name>`` with the per-run values filled in."""
    return triton.copy_model(MODEL_REPOSITORY, "llm", repository, name=name,
                             **_llm_changes(str(model_dir), **config_kw))


# The streaming client (one generate request, its tokens and their arrival times) lives in the package,
# which Lab 2.3 uses too; named here as the notebooks call it (mm.stream_generate).
StreamResult = triton.StreamResult
stream_generate = triton.stream_generate


# -- small non-LLM models ---------------------------------------------------------------------------

# model_repository/clf: config.pbtxt (shared by all versions) and 1/model.py (the same in every version).
CLASSIFIER_CONFIG = model_file("clf")
CLASSIFIER_MODEL_PY = model_file("clf", "model.py", 1)


def write_classifier_version(repository, name: str, version: int, layers, *, behavior: dict | None = None,
                             config: str = CLASSIFIER_CONFIG) -> Path:
    """One version folder of the classifier: model.py (copied from ``model_repository/clf/1``),
    weights.npz (``layers`` = [(W, b), ...]) and behavior.json. Writes ``config`` as config.pbtxt too
    (shared by all versions of the model)."""
    model_dir = triton.copy_model(MODEL_REPOSITORY, "clf", repository, name=name, versions={1: version})
    if config != CLASSIFIER_CONFIG:
        (model_dir / "config.pbtxt").write_text(config)
    folder = model_dir / str(version)
    arrays = {}
    for i, (W, b) in enumerate(layers):
        arrays[f"W{i}"], arrays[f"b{i}"] = np.asarray(W, np.float32), np.asarray(b, np.float32)
    np.savez(folder / "weights.npz", **arrays)
    (folder / "behavior.json").write_text(json.dumps(behavior or {}))
    return folder


def make_moons(n: int, noise: float = 0.2, seed: int = 0):
    """A labelled 2-class task (two interleaved half circles): features (n, 2) float32, labels (n,)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    angle = rng.uniform(0, math.pi, n)
    x = np.where(labels == 0, np.cos(angle), 1 - np.cos(angle))
    y = np.where(labels == 0, np.sin(angle), 0.5 - np.sin(angle))
    features = np.stack([x, y], axis=1) + rng.normal(0, noise, (n, 2))
    return features.astype(np.float32), labels.astype(np.int64)


def train_mlp(features, labels, hidden: int = 0, steps: int = 500, lr: float = 0.05, seed: int = 0):
    """Train a 2-class softmax classifier with numpy (full-batch Adam): ``hidden=0`` is logistic
    regression, ``hidden=H`` one ReLU layer of H units. Returns [(W, b), ...] for
    ``write_classifier_version``."""
    rng = np.random.default_rng(seed)
    x, y = np.asarray(features, np.float64), np.asarray(labels)
    sizes = [x.shape[1], *([hidden] if hidden else []), 2]
    params = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        params += [rng.normal(0, math.sqrt(2 / n_in), (n_in, n_out)), np.zeros(n_out)]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    onehot = np.eye(2)[y]
    for t in range(1, steps + 1):
        acts, h = [x], x
        for i in range(0, len(params), 2):
            h = h @ params[i] + params[i + 1]
            if i < len(params) - 2:
                h = np.maximum(h, 0)
            acts.append(h)
        e = np.exp(h - h.max(axis=1, keepdims=True))
        grad_out = (e / e.sum(axis=1, keepdims=True) - onehot) / len(x)
        grads = [None] * len(params)
        for i in range(len(params) - 2, -1, -2):
            grads[i], grads[i + 1] = acts[i // 2].T @ grad_out, grad_out.sum(axis=0)
            if i:
                grad_out = (grad_out @ params[i].T) * (acts[i // 2] > 0)
        for j, g in enumerate(grads):  # Adam
            m[j] = 0.9 * m[j] + 0.1 * g
            v[j] = 0.999 * v[j] + 0.001 * g * g
            params[j] -= lr * (m[j] / (1 - 0.9 ** t)) / (np.sqrt(v[j] / (1 - 0.999 ** t)) + 1e-8)
    return [(params[i].astype(np.float32), params[i + 1].astype(np.float32)) for i in range(0, len(params), 2)]


def predict(layers, features):
    """The classifier's forward pass in numpy (what the served model computes): class ids."""
    h = np.asarray(features, np.float32)
    for i, (W, b) in enumerate(layers):
        h = h @ W + b
        if i < len(layers) - 1:
            h = np.maximum(h, 0)
    return h.argmax(axis=1)


# model_repository/sleeper/1/model.py: sleeps base_ms + per_item_ms * rows per execution.
SLEEPER_MODEL_PY = model_file("sleeper", "model.py", 1)


def _sleeper_changes(*, base_ms: float = 20, per_item_ms: float = 2, max_batch_size: int = 16,
                     instance_count: int = 1, extra: str = "", instance_extra: str = "") -> dict:
    replace = {}
    if max_batch_size != 16:
        replace["max_batch_size: 16\n"] = f"max_batch_size: {max_batch_size}\n"
    if instance_count != 1 or instance_extra:
        replace["{ kind: KIND_CPU count: 1 }"] = f"{{ kind: KIND_CPU count: {instance_count} {instance_extra} }}"
    return {"parameters": {"base_ms": base_ms, "per_item_ms": per_item_ms}, "replace": replace,
            "append": extra or None}


def sleeper_config(**kw) -> str:
    """config.pbtxt of the sleeper (``model_repository/sleeper/config.pbtxt``) with ``base_ms``,
    ``per_item_ms``, ``max_batch_size`` and ``instance_count`` filled in; ``extra`` is appended (e.g. a
    dynamic_batching block) and ``instance_extra`` goes inside the instance group (e.g. a rate_limiter
    block)."""
    return triton.substitute(model_file("sleeper"), **_sleeper_changes(**kw))


def write_sleeper(repository, name: str = "sleeper", **config_kw) -> Path:
    """Copy ``model_repository/sleeper`` to ``<repository>/<name>`` with ``sleeper_config``'s changes."""
    return triton.copy_model(MODEL_REPOSITORY, "sleeper", repository, name=name, **_sleeper_changes(**config_kw))


def sleeper_call(http_url: str, model: str = "sleeper", rows: int = 1, priority: int = 0,
                 timeout_us: int = 0, record: list | None = None, backoff_s: float = 0.01):
    """A ``make_call`` for ``inference_course.bench.closed_loop``: each worker gets its own HTTP client
    and sends ``rows`` rows per request with the given priority. With ``record``, every finished
    request appends (priority, latency_s, ok). A rejected request waits ``backoff_s`` before the
    worker goes on (as real clients back off), so rejections do not turn into a busy loop."""
    def make_call():
        import tritonclient.http as httpclient

        client = httpclient.InferenceServerClient(http_url)
        data = np.ones((rows, 4), dtype=np.float32)

        def call():
            inp = httpclient.InferInput("INPUT", list(data.shape), "FP32")
            inp.set_data_from_numpy(data, binary_data=True)
            t0 = time.perf_counter()
            try:
                client.infer(model, [inp], priority=priority, timeout=timeout_us or None)
            except Exception:
                if record is not None:
                    record.append((priority, time.perf_counter() - t0, False))
                time.sleep(backoff_s)
                raise
            if record is not None:
                record.append((priority, time.perf_counter() - t0, True))
        return call
    return make_call


def model_stats(http_client, model: str) -> dict:
    """Cumulative counters from Triton's statistics API for the model's versions: inference_count
    (rows), execution_count (batches run), success/fail counts, and average queue/compute ms."""
    stats = http_client.get_inference_statistics(model)["model_stats"]
    out = {"inference_count": 0, "execution_count": 0, "success": 0, "fail": 0, "queue_ns": 0, "compute_ns": 0}
    for s in stats:
        out["inference_count"] += int(s.get("inference_count", 0))
        out["execution_count"] += int(s.get("execution_count", 0))
        inf = s["inference_stats"]
        out["success"] += int(inf["success"]["count"])
        out["fail"] += int(inf["fail"]["count"])
        out["queue_ns"] += int(inf["queue"]["ns"])
        out["compute_ns"] += int(inf["compute_infer"]["ns"])
    return out


def stats_delta(before: dict, after: dict) -> dict:
    d = {k: after[k] - before[k] for k in before}
    d["avg_batch_rows"] = d["inference_count"] / d["execution_count"] if d["execution_count"] else math.nan
    d["avg_queue_ms"] = d["queue_ns"] / 1e6 / d["success"] if d["success"] else math.nan
    return d


def set_served_versions(http_client, model: str, versions) -> None:
    """Reload ``model`` with ``version_policy: specific`` = ``versions`` (a config override through the
    repository API): versions that are not listed are unloaded."""
    config = http_client.get_model_config(model)
    config["version_policy"] = {"specific": {"versions": [int(v) for v in versions]}}
    http_client.load_model(model, config=json.dumps(config))


def process_tree_rss(pid: int) -> int:
    """Resident memory (bytes) of a process and all its descendants (the Python backend runs one stub
    process per model instance)."""
    import psutil

    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


# -- the A/B gateway --------------------------------------------------------------------------------

def sticky_bucket(user_id: str, salt: str = "ab") -> float:
    """A stable number in [0, 1) for a user: the same user always lands in the same bucket."""
    digest = hashlib.sha256(f"{salt}:{user_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


@dataclass
class Outcome:
    version: str
    user_id: str | None
    latency_s: float
    ok: bool
    error: str = ""
    prediction: int | None = None
    label: int | None = None

    @property
    def correct(self) -> bool | None:
        return None if self.label is None or self.prediction is None else self.prediction == self.label


class ABGateway:
    """Routes each request to one version of one Triton model and records the outcome.

    ``weights`` maps version -> share of traffic. With a ``user_id`` the choice is sticky: the user's
    hash bucket picks the version, so a user keeps seeing one version, and raising a version's weight
    only moves users *to* it (buckets are laid out in the order of ``weights``). Without one, the choice
    is random. Thread-safe: each thread gets its own HTTP client."""

    def __init__(self, http_url: str, model: str, weights: dict, *, salt: str = "ab", seed: int = 0):
        self.http_url, self.model, self.salt = http_url, model, salt
        self.set_weights(weights)
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._local = threading.local()
        self._rng = random.Random(seed)

    def set_weights(self, weights: dict) -> None:
        total = sum(weights.values())
        if total <= 0 or any(w < 0 for w in weights.values()):
            raise ValueError(f"weights must be >= 0 with a positive sum, got {weights}")
        self.weights = {str(v): w / total for v, w in weights.items()}

    def choose(self, user_id: str | None = None) -> str:
        with getattr(self, "_lock", threading.Lock()):
            u = sticky_bucket(user_id, self.salt) if user_id is not None else self._rng.random()
        edge = 0.0
        for version, weight in self.weights.items():
            edge += weight
            if u < edge:
                return version
        return next(v for v, w in reversed(self.weights.items()) if w > 0)

    def _client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            import tritonclient.http as httpclient

            client = self._local.client = httpclient.InferenceServerClient(self.http_url)
        return client

    def infer(self, features, user_id: str | None = None, label: int | None = None, *,
              version: str | None = None, record: bool = True) -> Outcome:
        """Route (or send to ``version``), call Triton, and record the outcome (unless ``record`` is
        False, e.g. for warm-up requests)."""
        import tritonclient.http as httpclient

        version = str(version) if version is not None else self.choose(user_id)
        x = np.asarray(features, dtype=np.float32).reshape(1, -1)
        inp = httpclient.InferInput("FEATURES", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        t0 = time.perf_counter()
        try:
            probs = self._client().infer(self.model, [inp], model_version=version).as_numpy("PROBS")
            outcome = Outcome(version, user_id, time.perf_counter() - t0, True,
                              prediction=int(np.argmax(probs[0])), label=label)
        except Exception as exc:  # a failed request is data
            outcome = Outcome(version, user_id, time.perf_counter() - t0, False, error=str(exc)[:200], label=label)
        if record:
            with self._lock:
                self.outcomes.append(outcome)
        return outcome

    def table(self, start: int = 0):
        """The recorded outcomes (from index ``start``) as a pandas DataFrame."""
        import pandas as pd

        rows = [{**asdict(o), "correct": o.correct} for o in self.outcomes[start:]]
        return pd.DataFrame(rows, columns=["version", "user_id", "latency_s", "ok", "error", "prediction",
                                           "label", "correct"])


# -- statistics (numpy only) ------------------------------------------------------------------------

def bootstrap_diff_ci(a, b, stat=np.mean, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0):
    """Point estimate and (1 - alpha) percentile-bootstrap interval of stat(b) - stat(a)."""
    rng = np.random.default_rng(seed)
    a, b = np.asarray(a, float), np.asarray(b, float)
    ia = rng.integers(0, a.size, (n_boot, a.size))
    ib = rng.integers(0, b.size, (n_boot, b.size))
    if stat is np.mean:
        diffs = b[ib].mean(axis=1) - a[ia].mean(axis=1)
    else:
        diffs = np.array([stat(b[j]) - stat(a[i]) for i, j in zip(ia, ib)])
    low, high = np.quantile(diffs, [alpha / 2, 1 - alpha / 2])
    return float(stat(b) - stat(a)), float(low), float(high)


def proportion_diff_ci(k_a: int, n_a: int, k_b: int, n_b: int, z: float = 1.96):
    """p_b - p_a with its normal-approximation (Wald) interval; z = 1.96 for 95 %."""
    p_a, p_b = k_a / n_a, k_b / n_b
    se = math.sqrt(p_a * (1 - p_a) / n_a + p_b * (1 - p_b) / n_b)
    return p_b - p_a, p_b - p_a - z * se, p_b - p_a + z * se


# -- canary, promote, rollback ----------------------------------------------------------------------

@dataclass
class Gates:
    """What a candidate must show at every step: readiness, error rate, and p95 latency."""

    max_error_rate: float = 0.02
    max_p95_ms: float = 100.0
    min_requests: int = 30  # candidate requests per step before a gate is judged


@dataclass
class Decision:
    step: int
    weight: float
    requests: int
    errors: int
    error_rate: float
    p95_ms: float
    action: str  # "continue", "promote" or "rollback"
    reason: str


@dataclass
class CanaryController:
    """Shift traffic from ``baseline`` to ``candidate`` through ``steps`` (candidate shares); after
    each step, judge the candidate's requests of that step against ``gates``. A failed gate rolls back
    (all traffic to the baseline, and ``on_rollback`` runs, e.g. to unload the candidate); passing the
    last step promotes (all traffic to the candidate, then ``on_promote``). Every decision is logged.

    ``send()`` sends one request through the gateway (the controller calls it from ``concurrency``
    threads until the candidate has ``gates.min_requests`` requests in the step)."""

    gateway: ABGateway
    baseline: str
    candidate: str
    send: object
    gates: Gates = field(default_factory=Gates)
    steps: tuple = (0.1, 0.25, 0.5, 1.0)
    concurrency: int = 4
    max_requests_per_step: int = 2000
    warmup: object = None  # e.g. lambda version: gateway.infer(x, version=version, record=False)
    on_promote: object = None
    on_rollback: object = None
    log: object = print
    decisions: list = field(default_factory=list)

    def _drive_step(self) -> list[Outcome]:
        start = len(self.gateway.outcomes)
        lock, count = threading.Lock(), [0]

        def candidate_seen():
            return sum(1 for o in self.gateway.outcomes[start:] if o.version == self.candidate)

        def worker():
            while True:
                with lock:
                    if count[0] >= self.max_requests_per_step or candidate_seen() >= self.gates.min_requests:
                        return
                    count[0] += 1
                self.send()

        threads = [threading.Thread(target=worker) for _ in range(self.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return [o for o in self.gateway.outcomes[start:] if o.version == self.candidate]

    def _decide(self, index: int, weight: float, outcomes: list[Outcome], ready: bool) -> Decision:
        n = len(outcomes)
        errors = sum(not o.ok for o in outcomes)
        rate = errors / n if n else math.nan
        ok_lat = [o.latency_s * 1000 for o in outcomes if o.ok]
        p95 = float(np.percentile(ok_lat, 95)) if ok_lat else math.nan
        g = self.gates
        if not ready:
            action, reason = "rollback", "candidate not ready (health check failed)"
        elif n < g.min_requests:
            action, reason = "rollback", f"only {n} candidate requests < {g.min_requests}: cannot judge"
        elif rate > g.max_error_rate:
            action, reason = "rollback", f"error rate {rate:.1%} > {g.max_error_rate:.1%}"
        elif not p95 <= g.max_p95_ms:
            action, reason = "rollback", f"p95 {p95:.1f} ms > {g.max_p95_ms:.1f} ms"
        elif index == len(self.steps) - 1:
            action, reason = "promote", "all gates passed at every step"
        else:
            action, reason = "continue", "gates passed"
        return Decision(index, weight, n, errors, rate, p95, action, reason)

    def run(self, is_ready=None) -> str:
        """Run the rollout; returns "promoted" or "rolled back". ``is_ready()`` is the health check
        (default: Triton's readiness endpoint for the candidate version)."""
        if is_ready is None:
            def is_ready():
                try:
                    return self.gateway._client().is_model_ready(self.gateway.model, self.candidate)
                except Exception:
                    return False
        if self.warmup is not None and is_ready():
            for version in (self.baseline, self.candidate):  # first requests pay connection set-up
                for _ in range(3):
                    self.warmup(version)
        for index, weight in enumerate(self.steps):
            self.gateway.set_weights({self.candidate: weight, self.baseline: 1 - weight})
            ready = is_ready()
            outcomes = self._drive_step() if ready else []
            decision = self._decide(index, weight, outcomes, ready)
            self.decisions.append(decision)
            if self.log:
                self.log(f"step {index} candidate={self.candidate} share={weight:.0%}: n={decision.requests} "
                         f"errors={decision.errors} p95={decision.p95_ms:.1f} ms -> {decision.action} "
                         f"({decision.reason})")
            if decision.action == "rollback":
                self.gateway.set_weights({self.baseline: 1.0})
                if self.on_rollback:
                    self.on_rollback()
                return "rolled back"
            if decision.action == "promote":
                self.gateway.set_weights({self.candidate: 1.0})
                if self.on_promote:
                    self.on_promote()
                return "promoted"
        return "promoted"

    def table(self):
        import pandas as pd

        return pd.DataFrame([asdict(d) for d in self.decisions])
