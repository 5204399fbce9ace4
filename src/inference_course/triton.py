"""The Triton Inference Server without Docker: find the binary, set up its Python backend, start it.

``nvidia-pytriton`` (PyPI) bundles the real ``tritonserver`` binary (2.51), its libraries and the
Python backend with one backend *stub* per Python version. The course uses only that binary; learners
with Docker can run NGC's ``nvcr.io/nvidia/tritonserver:24.08-py3`` on the same model repository.

The bundled Python backend was built against numpy 1.x: with numpy 2 ``pb_utils.Tensor(name, array)``
fails with "output tensor shape does not match size of output". Python models in this course therefore
move tensors through DLPack (``to_dlpack`` / ``Tensor.from_dlpack``), which works with both.

Model repositories are real files: each Triton lab keeps ``model_repository/<model>/config.pbtxt`` and
``<model>/<version>/model.py`` in its folder (they mount into NGC's container as they are). A notebook
copies a model into the run's repository with ``copy_model`` (filling in per-run values: parameters,
text substitutions, version folders), shows what changed with ``diff_text`` (difflib), and
``parse_config`` reads a config with Triton's own protobuf (``model_config_pb2``).
"""
from __future__ import annotations

import difflib
import importlib.util
import json
import math
import os
import re
import shutil
import sys
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .servers import HOST, ManagedServer, ServerError, free_port, http_ok

ENV_BINARY = "TRITONSERVER_BIN"
NGC_IMAGE = "nvcr.io/nvidia/tritonserver:24.08-py3"


def pytriton_root() -> Path | None:
    """The installed ``pytriton`` package folder, if nvidia-pytriton is installed."""
    spec = importlib.util.find_spec("pytriton")
    if not spec or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def find_tritonserver() -> Path:
    """``$TRITONSERVER_BIN``, else a ``tritonserver`` on PATH, else the binary bundled in nvidia-pytriton."""
    forced = os.environ.get(ENV_BINARY)
    if forced:
        if not os.access(forced, os.X_OK):
            raise ServerError(f"{ENV_BINARY}={forced} is not an executable file. Fix: unset {ENV_BINARY} to use "
                              "the binary bundled in nvidia-pytriton, or point it at a tritonserver executable.")
        return Path(forced)
    on_path = shutil.which("tritonserver")
    if on_path:
        return Path(on_path)
    root = pytriton_root()
    if root and (root / "tritonserver" / "bin" / "tritonserver").exists():
        return root / "tritonserver" / "bin" / "tritonserver"
    raise ServerError(
        "No Triton server binary found. Fix: `pip install --no-deps nvidia-pytriton==0.7.0` (bundles "
        f"tritonserver 2.51 for Linux x86-64, glibc >= 2.35), or put `tritonserver` on PATH, or set {ENV_BINARY}; "
        f"with Docker, in a Triton lab's folder: `docker run --rm -p8000-8002:8000-8002 -v $PWD/model_repository:/models {NGC_IMAGE} "
        "tritonserver --model-repository=/models`."
    )


def is_bundled(binary: Path) -> bool:
    root = pytriton_root()
    return bool(root) and Path(binary).resolve().is_relative_to((root / "tritonserver").resolve())


def library_dir() -> Path | None:
    """Folder of the shared libraries the bundled binary and its Python backend load."""
    root = pytriton_root()
    if root is None:
        return None
    libs = root.parent / "nvidia_pytriton.libs"
    return libs if libs.is_dir() else None


def backend_directory(python: str | None = None) -> Path:
    """A ``--backend-directory`` whose Python backend runs this interpreter's Python version.

    The bundled backend ships stubs for Python 3.8-3.13 in ``python_backend_stubs/3.X``; Triton looks
    for ``triton_python_backend_stub`` beside ``libtriton_python.so``, so the matching one is copied in.
    """
    from .models import cache_dir

    version = python or f"{sys.version_info.major}.{sys.version_info.minor}"
    root = pytriton_root()
    if root is None:
        raise ServerError("nvidia-pytriton is not installed; its Python backend is needed.")
    source = root / "tritonserver" / "backends" / "python"
    stub = root / "tritonserver" / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise ServerError(f"nvidia-pytriton has no Python backend stub for Python {version}; use Python 3.8-3.13.")
    target_root = cache_dir() / "triton-backends" / f"py{version}"
    target = target_root / "python"
    target.mkdir(parents=True, exist_ok=True)
    for item in (source / "libtriton_python.so", source / "triton_python_backend_utils.py", stub):
        dest = target / item.name
        if not dest.exists() or dest.read_bytes() != item.read_bytes():
            # A new file moved into place: a running server keeps the old inode (no ETXTBSY, no SIGBUS).
            tmp = dest.with_name(f".{dest.name}.{os.getpid()}")
            shutil.copy2(item, tmp)
            os.replace(tmp, dest)
    return target_root


def install_python_backends(backends: Mapping[str, str | os.PathLike], binary: Path | None = None) -> Path:
    """Copy each Python-based backend's ``model.py`` to ``<backend directory>/<name>/model.py``, where Triton
    looks for a backend named in ``config.pbtxt`` (``backend: "<name>"``) that has no shared library."""
    binary = binary or find_tritonserver()
    if not is_bundled(binary):
        raise ServerError(
            f"{binary} uses its own backend directory (/opt/tritonserver/backends in NVIDIA's container): mount "
            "each Python-based backend there, e.g. `-v $PWD/backends/vllm_course:/opt/tritonserver/backends/"
            "vllm_course`")
    root = backend_directory()
    for name, folder in backends.items():
        source = Path(folder) / "model.py"
        if not source.is_file():
            raise FileNotFoundError(f"{source} does not exist: a Python-based backend is a folder with a model.py")
        target = root / name / "model.py"
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".model.py.{os.getpid()}")
        shutil.copy2(source, tmp)
        os.replace(tmp, target)
    return root


def server_env() -> dict[str, str]:
    """Environment for the server: bundled libraries on the loader path, this interpreter first on PATH
    (the Python backend runs models with the ``python3`` it finds there)."""
    import sysconfig

    env: dict[str, str] = {}
    libs = library_dir()
    # The backend stub links libpython3.X.so by name. When this interpreter has its own shared
    # libpython (pyenv, a venv made from it), put that one first, or the stub loads the system's
    # libpython of the same minor version and e.g. `import ssl` fails with an undefined symbol.
    own = sysconfig.get_config_var("LIBDIR") if sysconfig.get_config_var("Py_ENABLE_SHARED") else None
    dirs = [str(libs) if libs else None, own if own and os.path.isdir(own) else None,
            os.environ.get("LD_LIBRARY_PATH")]
    if any(dirs[:2]):
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, dirs))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    paths = [p for p in sys.path if p and os.path.isdir(p)]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    from .profiles import get_profile

    env.update(get_profile().vllm_env)  # for the vLLM engines that Python-backend models start
    return env


# -- token-streaming generate models (Lab 2.2's hand-written `llm`, Lab 2.3's `llm_vllm`) -------------------

def stream_inputs(input_ids, max_tokens: int | None = None, ignore_eos: bool | None = None):
    """The gRPC inputs of a generate model: INPUT_IDS (INT64), and MAX_TOKENS / IGNORE_EOS when given (only
    models that declare IGNORE_EOS take it)."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    ids = np.asarray(input_ids, dtype=np.int64).reshape(-1)
    inputs = [grpcclient.InferInput("INPUT_IDS", [ids.size], "INT64")]
    inputs[0].set_data_from_numpy(ids)
    if max_tokens is not None:
        inputs.append(grpcclient.InferInput("MAX_TOKENS", [1], "INT32"))
        inputs[-1].set_data_from_numpy(np.array([max_tokens], dtype=np.int32))
    if ignore_eos is not None:
        inputs.append(grpcclient.InferInput("IGNORE_EOS", [1], "BOOL"))
        inputs[-1].set_data_from_numpy(np.array([ignore_eos], dtype=bool))
    return inputs


@dataclass
class StreamResult:
    token_ids: list[int]
    arrival_s: list[float]  # seconds after the request was sent, one per token

    @property
    def ttft_s(self) -> float:
        return self.arrival_s[0] if self.arrival_s else math.nan

    @property
    def total_s(self) -> float:
        return self.arrival_s[-1] if self.arrival_s else math.nan


def stream_generate(grpc_url: str, model: str, input_ids, max_tokens: int | None = None,
                    on_token=None, timeout_s: float = 120.0) -> StreamResult:
    """Send one generate request over a gRPC stream and collect the token responses as they arrive (a
    response may carry several tokens: each gets the response's arrival time).

    ``on_token(token_id, seconds_since_send)`` runs for each token (e.g. to print it live)."""
    import queue
    import time

    import tritonclient.grpc as grpcclient

    arrivals: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(grpc_url)
    try:
        client.start_stream(callback=lambda result, error: arrivals.put((time.perf_counter(), result, error)))
        tokens, times = [], []
        t0 = time.perf_counter()
        client.async_stream_infer(model, stream_inputs(input_ids, max_tokens), enable_empty_final_response=True)
        while True:
            t, result, error = arrivals.get(timeout=timeout_s)
            if error is not None:
                raise RuntimeError(f"generate failed: {error}")
            response = result.get_response()
            if response.outputs:  # one token (Lab 2.2's model) or several (vllm_course, when it lags the engine)
                for token in result.as_numpy("TOKEN_ID").reshape(-1).tolist():
                    tokens.append(int(token))
                    times.append(t - t0)
                    if on_token:
                        on_token(int(token), t - t0)
            if response.parameters["triton_final_response"].bool_param:
                break
        return StreamResult(tokens, times)
    finally:
        client.stop_stream()
        client.close()


def triton_server(model_repository: str | os.PathLike, *, model_control_mode: str = "none",
                  load_models: tuple[str, ...] | list[str] = (), extra_args: tuple[str, ...] | list[str] = (),
                  startup_timeout: float = 120.0, strict_model_config: bool = True,
                  log_verbose: int = 0, exit_timeout_s: int = 5,
                  python_backends: Mapping[str, str | os.PathLike] | None = None) -> ManagedServer:
    """A real ``tritonserver`` on free loopback ports (HTTP, gRPC, metrics), not yet started.

    Use it as a context manager; ``server.ports`` holds ``http``, ``grpc`` and ``metrics``.
    ``exit_timeout_s``: how long the server waits at shutdown for in-flight requests and open client
    connections (Triton's default is 30 s; a client left open would make every stop that slow).
    ``python_backends``: ``{name: folder}`` of Python-based backends (a folder with a ``model.py``, such as
    Triton Lab 2.3's ``backends/vllm_course``), installed where ``backend: "<name>"`` finds them.
    """
    binary = find_tritonserver()
    if python_backends:
        install_python_backends(python_backends, binary)
    http, grpc, metrics = free_port(), free_port(), free_port()
    while len({http, grpc, metrics}) < 3:
        grpc, metrics = free_port(), free_port()
    cmd = [
        str(binary),
        f"--model-repository={Path(model_repository).resolve()}",
        f"--http-address={HOST}", f"--http-port={http}",
        f"--grpc-address={HOST}", f"--grpc-port={grpc}",
        f"--metrics-address={HOST}", f"--metrics-port={metrics}",
        f"--model-control-mode={model_control_mode}",
        f"--strict-model-config={'true' if strict_model_config else 'false'}",
        f"--log-verbose={log_verbose}",
        f"--exit-timeout-secs={exit_timeout_s}",
    ]
    if is_bundled(binary):
        cmd.append(f"--backend-directory={backend_directory()}")
        # the response cache's implementation (--cache-config local,size=...) ships beside the binary, not
        # in /opt/tritonserver/caches where the server looks by default
        caches = pytriton_root() / "tritonserver" / "caches"
        if caches.is_dir() and not any(a.startswith("--cache-directory") for a in extra_args):
            cmd.append(f"--cache-directory={caches}")
    cmd += [f"--load-model={name}" for name in load_models]
    cmd += list(extra_args)
    server = ManagedServer("tritonserver", cmd, port=http, ready_path="/v2/health/ready", env=server_env(),
                           startup_timeout=startup_timeout,
                           ports={"http": http, "grpc": grpc, "metrics": metrics})
    return server


def metrics_url(server: ManagedServer) -> str:
    return f"http://{HOST}:{server.ports['metrics']}/metrics"


def grpc_url(server: ManagedServer) -> str:
    return f"{HOST}:{server.ports['grpc']}"


def http_url(server: ManagedServer) -> str:
    return f"{HOST}:{server.ports['http']}"


def model_ready(server: ManagedServer, model: str) -> bool:
    return http_ok(f"{server.url}/v2/models/{model}/ready")


def write_model(repository: str | os.PathLike, name: str, config: str, model_py: str | None = None,
                version: int = 1) -> Path:
    """Write ``<repository>/<name>/config.pbtxt`` and, for the Python backend, ``<version>/model.py``."""
    model_dir = Path(repository) / name
    (model_dir / str(version)).mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(textwrap.dedent(config).strip() + "\n")
    if model_py is not None:
        (model_dir / str(version) / "model.py").write_text(textwrap.dedent(model_py).lstrip())
    return model_dir


# -- file-based model repositories ------------------------------------------------------------------


def parse_config(path: str | os.PathLike):
    """A ``config.pbtxt`` (or a model folder holding one) parsed into Triton's own protobuf ``ModelConfig``
    (``tritonclient.grpc.model_config_pb2``). A typo in a field name or an enum value raises
    ``google.protobuf.text_format.ParseError`` naming the line and column."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    path = Path(path)
    if path.is_dir():
        path = path / "config.pbtxt"
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def _parameter_pattern(key: str) -> re.Pattern:
    return re.compile(r'(key:\s*"' + re.escape(key) + r'"\s*value:\s*\{\s*string_value:\s*)"(?:[^"\\]|\\.)*"')


def substitute(text: str, *, parameters: dict | None = None, replace: dict | None = None,
               append: str | None = None) -> str:
    """``text`` of a config.pbtxt with per-run values filled in.

    ``parameters``: ``{key: value}`` sets the ``string_value`` of parameters that the config already
    declares (a key it lacks raises KeyError, so a typo cannot pass silently). ``replace``: ``{old: new}``
    plain-text substitutions, each ``old`` must occur in the text (else ValueError). ``append``: lines
    added at the end (e.g. a ``dynamic_batching`` block)."""
    for key, value in (parameters or {}).items():
        pattern = _parameter_pattern(key)
        if not pattern.search(text):
            declared = re.findall(r'key:\s*"([^"]+)"', text)
            raise KeyError(f"parameter {key!r} is not declared in the config (it declares {declared})")
        quoted = json.dumps(str(value), ensure_ascii=False)
        text = pattern.sub(lambda m: m.group(1) + quoted, text)
    for old, new in (replace or {}).items():
        if old not in text:
            raise ValueError(f"{old!r} does not occur in the config; nothing to replace")
        text = text.replace(old, new)
    if append:
        text = text.rstrip("\n") + "\n" + textwrap.dedent(append).strip() + "\n"
    return text


def _version_folders(model_dir: Path) -> list[str]:
    return sorted((p.name for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=int)


def copy_model(source_repository: str | os.PathLike, model: str, target_repository: str | os.PathLike, *,
               name: str | None = None, parameters: dict | None = None, replace: dict | None = None,
               append: str | None = None, versions: dict | None = None, validate: bool = True) -> Path:
    """Copy ``<source_repository>/<model>`` into ``<target_repository>/<name or model>`` and return it.

    ``config.pbtxt`` is written through ``substitute`` (``parameters``, ``replace``, ``append``); version folders
    are copied whole (``__pycache__`` left out). ``versions`` renames them: ``{source: target}`` where
    target is a version or a list of versions (one source folder copied to several), e.g.
    ``{1: [1, 2, 3]}``; ``{}`` copies no version folder. Only the versions named are copied. With
    ``validate`` the written config is parsed with Triton's protobuf (``parse_config``)."""
    source = Path(source_repository) / model
    if not (source / "config.pbtxt").is_file():
        raise FileNotFoundError(f"{source / 'config.pbtxt'} does not exist: is {model!r} in {source_repository}?")
    target = Path(target_repository) / (name or model)
    target.mkdir(parents=True, exist_ok=True)
    config = substitute((source / "config.pbtxt").read_text(), parameters=parameters, replace=replace,
                        append=append)
    (target / "config.pbtxt").write_text(config)
    if versions is None:
        versions = {v: v for v in _version_folders(source)}
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for src_version, dests in versions.items():
        folder = source / str(src_version)
        if not folder.is_dir():
            raise FileNotFoundError(f"{model!r} has no version folder {src_version} in {source_repository}")
        for dest in (dests if isinstance(dests, (list, tuple)) else [dests]):
            shutil.copytree(folder, target / str(dest), ignore=ignore, dirs_exist_ok=True)
    if validate:
        parse_config(target / "config.pbtxt")
    return target


def diff_text(old: str | os.PathLike, new: str | os.PathLike, *, old_label: str | None = None,
              new_label: str | None = None, context: int = 1) -> str:
    """A unified diff (``difflib.unified_diff``) of two files (paths) or texts: what a copy changed."""
    def read(item):
        return Path(item).read_text() if isinstance(item, Path) else str(item)

    a, b = read(old), read(new)
    labels = (old_label or (str(old) if isinstance(old, Path) else "a"),
              new_label or (str(new) if isinstance(new, Path) else "b"))
    lines = difflib.unified_diff(a.splitlines(keepends=True), b.splitlines(keepends=True),
                                 fromfile=labels[0], tofile=labels[1], n=context)
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines).rstrip("\n")



# -- traces ------------------------------------------------------------------------------------------


@dataclass
class Span:
    """One traced request of Triton's trace mode ``triton``: a model's request, or a child request an
    ensemble step or a BLS call made (``parent_id`` names the request that made it)."""
    id: int
    model: str
    parent_id: int | None
    timestamps: dict[str, int]  # name (REQUEST_START, QUEUE_START, COMPUTE_START, ...) -> ns

    def ms(self, start: str, end: str) -> float:
        """Milliseconds from timestamp ``start`` to ``end``; KeyError names what the span has."""
        missing = [name for name in (start, end) if name not in self.timestamps]
        if missing:
            raise KeyError(f"span {self.id} ({self.model}) has no {missing}; it has {sorted(self.timestamps)}")
        return (self.timestamps[end] - self.timestamps[start]) / 1e6


def read_traces(paths) -> list[Span]:
    """The spans in trace files written with ``--trace-config triton,file=...`` (``mode=triton``,
    ``level=TIMESTAMPS``; with ``log_frequency`` N each N traces go to ``<file>.<k>``).

    Each file is a JSON array of records that share an ``id``: one names the model (and ``parent_id`` for
    a child request), the others each carry timestamps. They are merged into one ``Span`` per id, in the
    order of their REQUEST_START. A file that is not complete JSON, or a record of an id never named (a file
    cut by a crash), raises ValueError."""
    spans: dict[int, dict] = {}
    for path in ([paths] if isinstance(paths, (str, os.PathLike)) else paths):
        text = Path(path).read_text().strip()
        if not text:
            continue
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:  # a file the server is still writing
            raise ValueError(f"{path} is not complete JSON yet ({exc}): read it again once the server wrote it") from exc
        for record in records:
            span = spans.setdefault(int(record["id"]), {"model": None, "parent_id": None, "timestamps": {}})
            if "model_name" in record:
                span["model"] = record["model_name"]
                span["parent_id"] = int(record["parent_id"]) if "parent_id" in record else None
            for stamp in record.get("timestamps", ()):
                span["timestamps"][stamp["name"]] = int(stamp["ns"])
    unnamed = [i for i, span in spans.items() if span["model"] is None]
    if unnamed:
        raise ValueError(f"trace ids {unnamed} have timestamps but no model_name record: a file is incomplete")
    out = [Span(i, s["model"], s["parent_id"], s["timestamps"]) for i, s in spans.items()]
    return sorted(out, key=lambda s: s.timestamps.get("REQUEST_START", 0))


def tree(root: str | os.PathLike) -> str:
    """The files under ``root`` as an indented listing (what ``tree`` would print); ``__pycache__`` left out."""
    root = Path(root)
    lines = [root.name + "/"]
    for path in sorted(root.rglob("*")):
        if "__pycache__" in path.parts:
            continue
        depth = len(path.relative_to(root).parts)
        lines.append("    " * depth + path.name + ("/" if path.is_dir() else ""))
    return "\n".join(lines)

# A Python-backend model that doubles a FP32 vector, tensors crossing through DLPack (numpy 1 and 2).
DOUBLER_CONFIG = """
backend: "python"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""

DOUBLER_MODEL = '''
import torch
from torch.utils.dlpack import from_dlpack, to_dlpack
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """OUTPUT0 = 2 * INPUT0. Tensors cross via DLPack: the bundled backend mis-sizes numpy 2 arrays."""

    def execute(self, requests):
        responses = []
        for request in requests:
            x = from_dlpack(pb_utils.get_input_tensor_by_name(request, "INPUT0").to_dlpack())
            y = (x * 2).contiguous()
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor.from_dlpack("OUTPUT0", to_dlpack(y))]))
        return responses
'''
