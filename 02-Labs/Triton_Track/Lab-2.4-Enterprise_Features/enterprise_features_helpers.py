"""Helpers of Triton Lab 2.4 (Enterprise Features): what only this lab teaches.

The models themselves are files in ``model_repository/`` (open them); this module copies them into a run's
repository with the values of the run, builds the requests the notebooks send, drives the external load
tool (``hey``), and turns Triton's traces and statistics into per-hop times.

Text crosses every model of this lab as its UTF-8 bytes in a UINT8 tensor (see
``model_repository/tokenize/config.pbtxt`` for why not TYPE_STRING).
"""
from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np

from inference_course import triton

MODEL_REPOSITORY = Path(__file__).resolve().parent / "model_repository"

# notebook 01: the text pipeline, its three steps and the three ways of chaining them on the server
STEPS = ("tokenize", "lm_step", "detokenize")
PIPELINES = {"ensemble": "pipeline_ensemble", "bls": "pipeline_bls", "fused": "pipeline_fused"}
ON_MODEL = ("lm_step", "pipeline_fused")  # the models that run the language model (KIND_GPU on a GPU)


def write_pipeline_models(repository, model_dir, *, kind: str = "KIND_CPU", threads: int = 0,
                          max_tokens: int = 16) -> dict[str, Path]:
    """Copy the six models of notebook 01 into ``repository`` with the model folder filled in. ``kind``
    is the instance kind of the two models that run the language model; the tokenizer models and the BLS
    model stay on the CPU (they run no tensor work worth a GPU). ``threads``: torch threads per model
    instance (0: torch's default)."""
    written = {name: write_model(repository, name, model_dir, kind=kind, threads=threads, max_tokens=max_tokens)
               for name in (*STEPS, PIPELINES["bls"], PIPELINES["fused"])}
    written[PIPELINES["ensemble"]] = triton.copy_model(MODEL_REPOSITORY, PIPELINES["ensemble"], repository)
    return written


# -- requests -------------------------------------------------------------------------------------------


def text_bytes(text: str) -> np.ndarray:
    """A string as the UINT8 tensor the lab's models read."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


def decode_text(array) -> str:
    """The UINT8 tensor a model returned, as a string."""
    return bytes(np.asarray(array, dtype=np.uint8).reshape(-1)).decode("utf-8")


def http_inputs(text: str | None = None, max_tokens: int | None = None, **tensors):
    """``tritonclient.http.InferInput`` objects: ``TEXT`` (UINT8), ``MAX_TOKENS`` (INT32) and any other
    ``name=numpy array`` (INT64 arrays become INT64 inputs, and so on)."""
    import tritonclient.http as httpclient
    from tritonclient.utils import np_to_triton_dtype

    arrays = {}
    if text is not None:
        arrays["TEXT"] = text_bytes(text)
    if max_tokens is not None:
        arrays["MAX_TOKENS"] = np.array([max_tokens], dtype=np.int32)
    arrays.update(tensors)
    inputs = []
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        item = httpclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        item.set_data_from_numpy(array)
        inputs.append(item)
    return inputs


def json_body(text: str, max_tokens: int | None = None) -> dict:
    """The KServe v2 JSON body of a request to a pipeline model (what ``hey`` posts)."""
    data = list(text.encode("utf-8"))
    inputs = [{"name": "TEXT", "shape": [len(data)], "datatype": "UINT8", "data": data}]
    if max_tokens is not None:
        inputs.append({"name": "MAX_TOKENS", "shape": [1], "datatype": "INT32", "data": [int(max_tokens)]})
    return {"inputs": inputs}


def client_side(client, text: str) -> tuple[str, int]:
    """The pipeline chained by the client: three requests, the tensors travelling back and forth.
    Returns the next token's text and its id."""
    ids = client.infer("tokenize", http_inputs(text)).as_numpy("INPUT_IDS")
    next_id = client.infer("lm_step", http_inputs(INPUT_IDS=ids)).as_numpy("NEXT_ID")
    out = client.infer("detokenize", http_inputs(TOKEN_IDS=next_id)).as_numpy("TEXT")
    return decode_text(out), int(next_id.reshape(-1)[0])


def client_side_loop(client, text: str, max_tokens: int, eos_ids) -> tuple[str, int]:
    """The BLS model's loop run by the client: one lm_step request per new token. Returns the text and the
    number of steps."""
    sequence = client.infer("tokenize", http_inputs(text)).as_numpy("INPUT_IDS").reshape(-1)
    new = []
    while len(new) < max_tokens:
        token = int(client.infer("lm_step", http_inputs(INPUT_IDS=sequence)).as_numpy("NEXT_ID").reshape(-1)[0])
        new.append(token)
        if token in eos_ids:
            break
        sequence = np.append(sequence, np.int64(token))
    out = client.infer("detokenize", http_inputs(TOKEN_IDS=np.asarray(new, dtype=np.int64))).as_numpy("TEXT")
    return decode_text(out), len(new)


# -- the external load tool ------------------------------------------------------------------------------


def find_hey() -> str:
    """The ``hey`` binary (a Go HTTP load generator; Debian package ``hey``), or a FileNotFoundError with the fix."""
    found = shutil.which("hey")
    if not found:
        raise FileNotFoundError("hey (an HTTP load generator) is not on PATH: `apt-get install hey` on Debian/Ubuntu, "
                                "or `go install github.com/rakyll/hey@latest`")
    return found


def hey(url: str, body: dict, *, requests: int, concurrency: int = 1, timeout_s: int = 60) -> dict:
    """Post ``body`` (JSON) to ``url`` ``requests`` times with ``hey`` and return its per-request records:
    ``{"seconds": [...], "status": [...]}`` (from ``hey -o csv``: response time, HTTP status)."""
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(body, f)
    try:
        done = subprocess.run([find_hey(), "-n", str(requests), "-c", str(concurrency), "-m", "POST",
                               "-T", "application/json", "-D", f.name, "-t", str(timeout_s), "-o", "csv", url],
                              capture_output=True, text=True, timeout=timeout_s * requests + 60)
    finally:
        Path(f.name).unlink(missing_ok=True)
    if done.returncode != 0:
        raise RuntimeError(f"hey exited with {done.returncode}: {done.stderr.strip()[-500:]}")
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    if len(rows) != requests:
        raise RuntimeError(f"hey reported {len(rows)} requests, expected {requests}: {done.stdout[-500:]}")
    return {"seconds": [float(r["response-time"]) for r in rows], "status": [int(r["status-code"]) for r in rows]}


# -- traces and statistics ----------------------------------------------------------------------------------


def trace_tree(spans, root_model: str) -> list[tuple[triton.Span, list[triton.Span]]]:
    """Each traced request of ``root_model`` with its child requests (ensemble steps or BLS calls), the
    children in the order they started."""
    children: dict[int, list] = {}
    for span in spans:
        if span.parent_id is not None:
            children.setdefault(span.parent_id, []).append(span)
    return [(span, sorted(children.get(span.id, []), key=lambda s: s.timestamps["REQUEST_START"]))
            for span in spans if span.model == root_model and span.parent_id is None]


def wait_for_traces(trace_file, root_model: str, requests: int, children: int | None = None,
                    timeout_s: float = 30.0) -> list[triton.Span]:
    """The spans of ``<trace_file>.*`` once ``requests`` traced requests of ``root_model`` are complete in them
    (each with ``children`` child requests when given): the server's trace thread writes the files a moment
    after the responses, so reading right away can miss the last ones."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            spans = triton.read_traces(sorted(Path(trace_file).parent.glob(Path(trace_file).name + ".*")))
            trees = trace_tree(spans, root_model)
            done = [r for r, kids in trees if "REQUEST_END" in r.timestamps
                    and (children is None or len(kids) == children)]
            if len(done) >= requests:
                return spans
        except ValueError:  # a file being written
            trees = []
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(trees)} traced {root_model} requests in {trace_file}.* after {timeout_s:.0f} s, "
                               f"expected {requests}")
        time.sleep(0.1)


def wait_for_statistics(client, model: str, count: int, timeout_s: float = 30.0) -> dict:
    """``model``'s statistics once its success count reached ``count`` (a request is counted when it is
    released, a moment after its response)."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        stats = client.get_inference_statistics(model)["model_stats"][0]
        if int(stats["inference_stats"]["success"]["count"]) >= count or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)


def span_phases(span: triton.Span) -> dict[str, float]:
    """A model's request split as the statistics API splits it, in ms: queue, compute_input, compute_infer,
    compute_output, and the request's whole time (request)."""
    return {"queue": span.ms("QUEUE_START", "COMPUTE_START"),
            "compute_input": span.ms("COMPUTE_START", "COMPUTE_INPUT_END"),
            "compute_infer": span.ms("COMPUTE_INPUT_END", "COMPUTE_OUTPUT_START"),
            "compute_output": span.ms("COMPUTE_OUTPUT_START", "COMPUTE_END"),
            "request": span.ms("REQUEST_START", "REQUEST_END")}


def stats_delta(before: dict, after: dict) -> dict[str, float]:
    """Per-request averages (ms) of one model's statistics between two snapshots
    (``get_inference_statistics(name)["model_stats"][0]``): success (the whole request), queue,
    compute_input, compute_infer, compute_output, and the request count."""
    out = {}
    count = int(after["inference_stats"]["success"]["count"]) - int(before["inference_stats"]["success"]["count"])
    for phase in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        ns = int(after["inference_stats"][phase]["ns"]) - int(before["inference_stats"][phase]["ns"])
        out[phase] = ns / count / 1e6 if count else float("nan")
    out["count"] = count
    return out



# -- notebook 02: response cache, warmup, sequence batcher ---------------------------------------------------

EMBED_MODELS = ("embed", "embed_cached", "embed_warm")


def write_model(repository, name, model_dir, *, source: str | None = None, kind: str = "KIND_CPU",
                threads: int | None = None, max_tokens: int | None = None, **copy_kw) -> Path:
    """Copy ``model_repository/<source or name>`` into ``repository`` as ``name`` with the model folder filled in
    (and ``threads``, ``max_tokens`` where the config has them; ``kind`` for the models that run the language
    model, ``ON_MODEL`` and the ``embed`` ones). ``copy_kw`` goes to ``triton.copy_model`` (``replace``,
    ``append``). Symbolic links (``embed_cached/1/model.py``) are copied as the file they point to."""
    source = source or name
    config = (MODEL_REPOSITORY / source / "config.pbtxt").read_text()
    params = {"model_dir": str(model_dir)}
    if threads is not None and '"threads"' in config:
        params["threads"] = threads
    if max_tokens is not None and '"max_tokens"' in config:
        params["max_tokens"] = max_tokens
    replace = dict(copy_kw.pop("replace", None) or {})
    if kind != "KIND_CPU" and (source in ON_MODEL or source.startswith("embed")):
        replace["kind: KIND_CPU"] = f"kind: {kind}"
    return triton.copy_model(MODEL_REPOSITORY, source, repository, name=name, parameters=params,
                             replace=replace or None, **copy_kw)


def sentences(count: int) -> list[str]:
    """``count`` distinct, deterministic sentences (the cache's key space)."""
    subjects = ("The cache", "A server", "This model", "Every request", "The client", "A replica", "The GPU",
                "An ensemble")
    verbs = ("answers", "stores", "evicts", "measures", "routes", "warms up", "batches", "traces")
    return [f"{subjects[i % len(subjects)]} {verbs[(i // len(subjects)) % len(verbs)]} item {i}." for i in range(count)]


def zipf_indices(items: int, requests: int, *, s: float = 1.1, seed: int = 0) -> list[int]:
    """``requests`` draws from ``items`` keys with Zipf-like popularity (key k has weight 1/(k+1)**s), seeded:
    a few keys are asked for often, most rarely - the skew that makes a cache pay."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, items + 1) ** s
    return rng.choice(items, size=requests, p=weights / weights.sum()).tolist()


def metric_values(metrics_text: str, prefix: str = "nv_cache") -> dict[str, float]:
    """The samples of Triton's /metrics whose name starts with ``prefix``, parsed by prometheus_client (names as
    Triton writes them):
    ``{name: value}`` for unlabelled samples, ``{name{model="m"}: value}`` for labelled ones (version left out)."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if not sample.name.startswith(prefix):
                continue
            labels = {k: v for k, v in sample.labels.items() if k != "version"}
            # the parser names a counter's samples <name>_total; Triton's own names have no such suffix
            name = sample.name.removesuffix("_total") if family.type == "counter" else sample.name
            key = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
            out[key] = float(sample.value)
    return out


def cache_counts(client, model: str) -> tuple[int, int]:
    """(hits, misses) of ``model``'s response cache so far, from the statistics API."""
    stats = client.get_inference_statistics(model)["model_stats"][0]["inference_stats"]
    return int(stats["cache_hit"]["count"]), int(stats["cache_miss"]["count"])


def session_turn(client, corrid: int, text: str, *, start: bool = False, end: bool = False) -> dict[str, int]:
    """One message of a conversation to the ``session`` model (sequence batcher): its running totals."""
    result = client.infer("session", http_inputs(TEXT=text_bytes(text).reshape(1, -1)), sequence_id=corrid,
                          sequence_start=start, sequence_end=end)
    return {name.lower(): int(result.as_numpy(name).reshape(-1)[0]) for name in ("TOTAL_TOKENS", "TURN", "SESSIONS")}


# -- notebook 03: OpenTelemetry, restricted APIs, model control, TLS -----------------------------------------


def span_tree(spans: list[dict], root_name: str) -> list[list[tuple[int, dict]]]:
    """The OpenTelemetry spans (``monitoring.SpanSink`` dicts) of each trace that contains a span named
    ``root_name``, as (depth, span) rows in depth-first order from the trace's root."""
    by_trace: dict[str, list[dict]] = {}
    for span in spans:
        by_trace.setdefault(span["trace_id"], []).append(span)
    trees = []
    for trace in by_trace.values():
        if not any(s["name"] == root_name for s in trace):
            continue
        children: dict = {}
        for s in trace:
            children.setdefault(s["parent_span_id"], []).append(s)
        ids = {s["span_id"] for s in trace}
        roots = [s for s in trace if s["parent_span_id"] not in ids]
        rows = []

        def walk(span, depth):
            rows.append((depth, span))
            for child in sorted(children.get(span["span_id"], []), key=lambda s: s["start"]):
                walk(child, depth + 1)

        for root in sorted(roots, key=lambda s: s["start"]):
            walk(root, 0)
        trees.append(rows)
    return trees


def make_certificates(folder, *, hosts=("localhost", "127.0.0.1")) -> dict[str, Path]:
    """A throwaway certificate authority, a server certificate for ``hosts`` and a client certificate, all
    signed by that CA, written as PEM files into ``folder`` (made with the ``cryptography`` package).
    Returns the paths: ca, server_cert, server_key, client_cert, client_key. For a lab only: the keys are
    not protected and the CA signs whatever this function asks."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(common):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def build(subject, key, issuer, issuer_key, *, ca=False, usage=None, sans=()):
        builder = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if usage:
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if sans:
            entries = []
            for host in sans:
                try:
                    entries.append(x509.IPAddress(ipaddress.ip_address(host)))
                except ValueError:
                    entries.append(x509.DNSName(host))
            builder = builder.add_extension(x509.SubjectAlternativeName(entries), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = build("course lab CA", ca_key, "course lab CA", ca_key, ca=True)
    server_key, client_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    server = build(hosts[0], server_key, "course lab CA", ca_key, usage=ExtendedKeyUsageOID.SERVER_AUTH, sans=hosts)
    client = build("lab client", client_key, "course lab CA", ca_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    paths = {}
    for label, item in (("ca", ca), ("server_cert", server), ("client_cert", client)):
        paths[label] = folder / f"{label}.pem"
        paths[label].write_bytes(item.public_bytes(serialization.Encoding.PEM))
    for label, key in (("server_key", server_key), ("client_key", client_key)):
        paths[label] = folder / f"{label}.pem"
        paths[label].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    return paths


def tls_args(certs: dict, *, mutual: bool = False) -> list[str]:
    """tritonserver flags for gRPC over TLS (``mutual``: the client must present a certificate the CA signed)."""
    args = [f"--grpc-server-cert={certs['server_cert']}", f"--grpc-server-key={certs['server_key']}",
            f"--grpc-root-cert={certs['ca']}"]
    return args + (["--grpc-use-ssl-mutual=true"] if mutual else ["--grpc-use-ssl=true"])


def grpc_client(url: str, certs: dict | None = None, *, client_cert: bool = False):
    """A ``tritonclient.grpc`` client: plain, over TLS trusting ``certs['ca']``, and with the client
    certificate when ``client_cert``. The server's certificate names ``localhost``: connect to
    ``localhost:<port>``."""
    import tritonclient.grpc as grpcclient

    if certs is None:
        return grpcclient.InferenceServerClient(url)
    kw = dict(ssl=True, root_certificates=str(certs["ca"]))
    if client_cert:
        kw.update(private_key=str(certs["client_key"]), certificate_chain=str(certs["client_cert"]))
    return grpcclient.InferenceServerClient(url, **kw)
