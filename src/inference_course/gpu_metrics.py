"""A small GPU exporter for Prometheus that speaks dcgm-exporter's language, read through NVML.

In production, GPU metrics come from NVIDIA's dcgm-exporter (a container next to DCGM). Neither runs on the
course's machines (no container runtime with GPUs, no DCGM), so this module exports a subset of
dcgm-exporter's default counters (``etc/default-counters.csv`` of github.com/NVIDIA/dcgm-exporter, release
4.5.3-4.8.2) with the same metric NAMES, UNITS and LABELS, read from NVML through NVIDIA's own Python binding
(PyPI ``nvidia-ml-py``, module ``pynvml``). A dashboard query written against this exporter therefore runs
unchanged against dcgm-exporter::

    DCGM_FI_DEV_GPU_UTIL{gpu="0",UUID="GPU-...",pci_bus_id="00000000:04:00.0",device="nvidia0",
                         modelName="NVIDIA H200",Hostname="...",DCGM_FI_DRIVER_VERSION="580.159.04"} 87

What differs from dcgm-exporter: values are read from NVML when Prometheus scrapes (dcgm-exporter reads
DCGM's cache, sampled every 30 s by default), fields a GPU does not support are left out (dcgm-exporter
also skips blank values), and there is no pod/namespace attribution. dcgm-exporter's main branch renamed
the ``Hostname`` label to ``hostname`` after that release: the course's dashboard groups by neither.

Without NVML (no NVIDIA driver, the binding not installed) or without a GPU there is nothing to export:
``unavailable_reason()`` says why, ``available()`` is False, and the server refuses to start (exit code 3)
instead of exporting made-up numbers. Run it as a managed server (``servers.gpu_metrics_server``) or::

    python -m inference_course.gpu_metrics --port 9400
"""
from __future__ import annotations

import argparse
import math
import shutil
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass

# dcgm-exporter's names, Prometheus types and units (its CSV's help texts give the units).
GPU_UTIL = "DCGM_FI_DEV_GPU_UTIL"          # gauge, %
FB_USED = "DCGM_FI_DEV_FB_USED"            # gauge, MiB
FB_FREE = "DCGM_FI_DEV_FB_FREE"            # gauge, MiB
POWER_USAGE = "DCGM_FI_DEV_POWER_USAGE"    # gauge, W
GPU_TEMP = "DCGM_FI_DEV_GPU_TEMP"          # gauge, degrees C
SM_CLOCK = "DCGM_FI_DEV_SM_CLOCK"          # gauge, MHz
MEM_CLOCK = "DCGM_FI_DEV_MEM_CLOCK"        # gauge, MHz
HELP = {
    GPU_UTIL: "GPU utilization (in %).",
    FB_USED: "Framebuffer memory used (in MiB).",
    FB_FREE: "Framebuffer memory free (in MiB).",
    POWER_USAGE: "Power draw (in W).",
    GPU_TEMP: "GPU temperature (in C).",
    SM_CLOCK: "SM clock frequency (in MHz).",
    MEM_CLOCK: "Memory clock frequency (in MHz).",
}
METRICS = tuple(HELP)
# The labels dcgm-exporter puts on every GPU metric (MIG labels aside), in its order; the driver version is
# the one "label" field of its default CSV.
LABELS = ("gpu", "UUID", "pci_bus_id", "device", "modelName", "Hostname", "DCGM_FI_DRIVER_VERSION")
PREFIX = "DCGM_FI_"
MIB = 2 ** 20


class NVMLUnavailable(RuntimeError):
    """NVML cannot be used here: no binding, no NVIDIA driver, or no GPU. The message says which."""


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict
    value: float


def _pynvml():
    try:
        import pynvml
    except ImportError as exc:
        raise NVMLUnavailable(f"NVIDIA's NVML binding is not installed ({exc}); it comes with the gpu extra: "
                              "pip install nvidia-ml-py") from None
    return pynvml


def unavailable_reason() -> str | None:
    """None when NVML works and sees at least one GPU; otherwise why not, in one line."""
    try:
        nvml = _pynvml()
    except NVMLUnavailable as exc:
        return str(exc)
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        return f"NVML did not initialize ({type(exc).__name__}: {exc}): no NVIDIA driver on this machine"
    try:
        count = nvml.nvmlDeviceGetCount()
    finally:
        nvml.nvmlShutdown()
    return None if count > 0 else "NVML initialized but sees no GPU"


def available() -> bool:
    """True when NVML works here and sees a GPU (see ``unavailable_reason`` for why not)."""
    return unavailable_reason() is None


def is_gpu_query(expr: str) -> bool:
    """True when a PromQL expression reads only dcgm-exporter metrics (a GPU panel of the dashboard)."""
    from .monitoring import metric_names

    names = metric_names(expr)
    return bool(names) and all(name.startswith(PREFIX) for name in names)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _memory(nvml, handle):
    """Framebuffer memory, in NVML's v2 form where the driver has it: ``used`` then excludes the memory the
    driver reserves, as in nvidia-smi's memory.used and DCGM's FB_USED; else the v1 form."""
    version = getattr(nvml, "nvmlMemory_v2", None)
    if version is not None:
        try:
            return nvml.nvmlDeviceGetMemoryInfo(handle, version=version)
        except (nvml.NVMLError, TypeError):
            pass  # an older driver (no nvmlDeviceGetMemoryInfo_v2) or binding (no version argument)
    return nvml.nvmlDeviceGetMemoryInfo(handle)


def read_samples(nvml, hostname: str | None = None) -> list[Sample]:
    """One reading of every GPU NVML sees, translated to dcgm-exporter's names, units and labels.
    ``nvml`` is the ``pynvml`` module, already initialized. A field the GPU does not support (NVMLError) is
    left out, never replaced by a number."""
    hostname = hostname or socket.gethostname()
    driver = _text(nvml.nvmlSystemGetDriverVersion())
    memory = {}  # one memory reading per GPU and scrape: used and free from the same moment

    def mem(h):
        key = id(h)  # NVML handles are ctypes pointers: not hashable, and the same object for one GPU's reads
        if key not in memory:
            memory[key] = _memory(nvml, h)
        return memory[key]

    readers = {
        GPU_UTIL: lambda h: nvml.nvmlDeviceGetUtilizationRates(h).gpu,                         # %
        FB_USED: lambda h: mem(h).used // MIB,                                                  # bytes -> MiB
        FB_FREE: lambda h: mem(h).free // MIB,                                                  # bytes -> MiB
        POWER_USAGE: lambda h: nvml.nvmlDeviceGetPowerUsage(h) / 1000.0,                        # mW -> W
        GPU_TEMP: lambda h: nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU),        # C
        SM_CLOCK: lambda h: nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM),                 # MHz
        MEM_CLOCK: lambda h: nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_MEM),               # MHz
    }
    samples = []
    for index in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        labels = {"gpu": str(index), "UUID": _text(nvml.nvmlDeviceGetUUID(handle)),
                  "pci_bus_id": _text(nvml.nvmlDeviceGetPciInfo(handle).busId), "device": f"nvidia{index}",
                  "modelName": _text(nvml.nvmlDeviceGetName(handle)), "Hostname": hostname,
                  "DCGM_FI_DRIVER_VERSION": driver}
        for name, read in readers.items():
            try:
                value = float(read(handle))
            except nvml.NVMLError:
                continue
            samples.append(Sample(name, labels, value))
    return samples


SMI_FIELDS = ("index", "uuid", "name", "utilization.gpu", "memory.used", "memory.total", "power.draw")


def nvidia_smi(fields=SMI_FIELDS) -> list[dict]:
    """One reading of ``nvidia-smi --query-gpu=FIELDS --format=csv,noheader,nounits``, the reference to check
    the exporter against: one dict per GPU, numbers as floats ("[N/A]" as NaN), names and UUIDs as text."""
    binary = shutil.which("nvidia-smi")
    if not binary:
        raise NVMLUnavailable("nvidia-smi is not on PATH: no NVIDIA driver on this machine")
    done = subprocess.run([binary, f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"],
                          capture_output=True, text=True, timeout=60)
    if done.returncode:
        raise NVMLUnavailable(f"nvidia-smi failed ({done.returncode}): {(done.stdout + done.stderr).strip()}")

    def value(field, text):
        if field in ("uuid", "name"):
            return text
        try:
            return float(text)
        except ValueError:
            return math.nan  # "[N/A]", "[Not Supported]"

    return [{f: value(f, v.strip()) for f, v in zip(fields, line.split(","))}
            for line in done.stdout.strip().splitlines() if line.strip()]


class DCGMStyleCollector:
    """A prometheus_client collector: every scrape reads NVML once (``read_samples``)."""

    def __init__(self, nvml, hostname: str | None = None):
        self.nvml = nvml
        self.hostname = hostname

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        families = {name: GaugeMetricFamily(name, HELP[name], labels=LABELS) for name in METRICS}
        for sample in read_samples(self.nvml, self.hostname):
            families[sample.name].add_metric([sample.labels[k] for k in LABELS], sample.value)
        return [family for family in families.values() if family.samples]


def registry(nvml, hostname: str | None = None):
    """A CollectorRegistry holding only the GPU collector (no process or Python metrics)."""
    from prometheus_client import CollectorRegistry

    reg = CollectorRegistry(auto_describe=False)
    reg.register(DCGMStyleCollector(nvml, hostname))
    return reg


def serve(host: str, port: int) -> int:
    """Serve ``/metrics`` until SIGTERM or SIGINT; exit code 3 (and the reason on stderr) without NVML or GPU."""
    from prometheus_client import start_http_server

    reason = unavailable_reason()
    if reason:
        print(f"gpu_metrics: cannot export GPU metrics: {reason}", file=sys.stderr, flush=True)
        return 3
    nvml = _pynvml()
    nvml.nvmlInit()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server, thread = start_http_server(port, addr=host, registry=registry(nvml))
    gpus = [_text(nvml.nvmlDeviceGetName(nvml.nvmlDeviceGetHandleByIndex(i))) for i in range(nvml.nvmlDeviceGetCount())]
    print(f"gpu_metrics: serving {', '.join(METRICS)} for {len(gpus)} GPU(s) {gpus} at http://{host}:{port}/metrics",
          flush=True)
    try:
        stop.wait()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        nvml.nvmlShutdown()
    print("gpu_metrics: stopped", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m inference_course.gpu_metrics", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9400, help="dcgm-exporter's default port")
    args = parser.parse_args(argv)
    return serve(args.host, args.port)


if __name__ == "__main__":
    sys.exit(main())
