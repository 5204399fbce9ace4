"""The GPU exporter (inference_course.gpu_metrics): dcgm-exporter's names, units and labels from NVML.

- Without a GPU (the cpu profile, CI): the exporter says why and refuses to start; the translation from NVML's
  readings to dcgm-exporter's names, units and labels is unit-tested against a FAKE NVML (fixed numbers at
  the pynvml function boundary: these tests check arithmetic and names, never a GPU);
- with a GPU (skipped elsewhere): the real exporter, started as a managed server, against nvidia-smi.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from inference_course import gpu_metrics, monitoring, servers

GPU_HERE = gpu_metrics.available()
# dcgm-exporter's default counters (etc/default-counters.csv, release 4.5.3-4.8.2): name -> (type, unit in help)
DCGM_DEFAULTS = {
    "DCGM_FI_DEV_GPU_UTIL": ("gauge", "(in %)"), "DCGM_FI_DEV_FB_USED": ("gauge", "(in MiB)"),
    "DCGM_FI_DEV_FB_FREE": ("gauge", "(in MiB)"), "DCGM_FI_DEV_POWER_USAGE": ("gauge", "(in W)"),
    "DCGM_FI_DEV_GPU_TEMP": ("gauge", "(in C)"), "DCGM_FI_DEV_SM_CLOCK": ("gauge", "(in MHz)"),
    "DCGM_FI_DEV_MEM_CLOCK": ("gauge", "(in MHz)"),
}


class FakeNVMLError(Exception):
    pass


class FakeNVML:
    """A stand-in for the pynvml module with fixed readings for two GPUs (NOT a GPU: for the translation only).
    GPU 1 does not support temperature (NVML raises NotSupported), like some boards."""
    NVMLError = FakeNVMLError
    NVML_TEMPERATURE_GPU, NVML_CLOCK_SM, NVML_CLOCK_MEM = 0, 1, 2
    nvmlMemory_v2 = 0x02000028

    class _Obj:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    def __init__(self, v2: bool = True):
        self.v2 = v2
        if not v2:
            self.nvmlMemory_v2 = None

    def nvmlSystemGetDriverVersion(self):
        return "580.159.04"

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, i):
        return ("handle", i)

    def nvmlDeviceGetUUID(self, h):
        return f"GPU-0000000{h[1]}-aaaa-bbbb-cccc-dddddddddddd"

    def nvmlDeviceGetPciInfo(self, h):
        return self._Obj(busId=f"00000000:{4 + h[1]:02X}:00.0".encode())  # a bytes field, as pynvml's struct

    def nvmlDeviceGetName(self, h):
        return "NVIDIA H200"

    def nvmlDeviceGetUtilizationRates(self, h):
        return self._Obj(gpu=[87, 0][h[1]], memory=40)

    def nvmlDeviceGetMemoryInfo(self, h, version=None):
        total = 143771 * 2**20
        reserved = 512 * 2**20 if version else 0
        used = [130_000 * 2**20 + 123_456, 0][h[1]]  # GPU 0: 130,000 MiB and a bit; v1 counts reserved as used
        used_v1 = used + 512 * 2**20
        return self._Obj(total=total, reserved=reserved, used=used if version else used_v1,
                         free=total - reserved - used)

    def nvmlDeviceGetPowerUsage(self, h):
        return [412_345, 71_000][h[1]]  # milliwatts

    def nvmlDeviceGetTemperature(self, h, sensor):
        if h[1] == 1:
            raise FakeNVMLError("Not Supported")
        return 45

    def nvmlDeviceGetClockInfo(self, h, clock):
        return {self.NVML_CLOCK_SM: 1980, self.NVML_CLOCK_MEM: 2619}[clock]


def parse(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_names_types_and_units_match_dcgm_exporters_defaults():
    assert set(gpu_metrics.METRICS) == set(DCGM_DEFAULTS)
    for name, (kind, unit) in DCGM_DEFAULTS.items():
        assert unit in gpu_metrics.HELP[name], f"{name}: the help text must carry dcgm-exporter's unit {unit}"
    assert gpu_metrics.LABELS[:6] == ("gpu", "UUID", "pci_bus_id", "device", "modelName", "Hostname")


def test_translation_to_dcgm_names_units_and_labels_with_a_fake_nvml():
    samples = gpu_metrics.read_samples(FakeNVML(), hostname="node-1")
    by = {(s.name, s.labels["gpu"]): s for s in samples}
    assert by[("DCGM_FI_DEV_GPU_UTIL", "0")].value == 87
    assert by[("DCGM_FI_DEV_FB_USED", "0")].value == 130_000          # bytes -> MiB, whole MiB like DCGM
    assert by[("DCGM_FI_DEV_FB_FREE", "0")].value == 143771 - 512 - 130_000 - 1  # the partial MiB went to used
    assert by[("DCGM_FI_DEV_POWER_USAGE", "0")].value == pytest.approx(412.345)  # mW -> W
    assert by[("DCGM_FI_DEV_POWER_USAGE", "1")].value == pytest.approx(71.0)
    assert by[("DCGM_FI_DEV_SM_CLOCK", "0")].value == 1980
    assert by[("DCGM_FI_DEV_GPU_TEMP", "0")].value == 45
    assert ("DCGM_FI_DEV_GPU_TEMP", "1") not in by, "an unsupported field is left out, never exported as a number"
    labels = by[("DCGM_FI_DEV_GPU_UTIL", "1")].labels
    assert labels == {"gpu": "1", "UUID": "GPU-00000001-aaaa-bbbb-cccc-dddddddddddd", "pci_bus_id": "00000000:05:00.0",
                      "device": "nvidia1", "modelName": "NVIDIA H200", "Hostname": "node-1",
                      "DCGM_FI_DRIVER_VERSION": "580.159.04"}


def test_memory_falls_back_to_nvmls_v1_form_with_a_fake_nvml():
    used = {s.labels["gpu"]: s.value for s in gpu_metrics.read_samples(FakeNVML(v2=False), "h")
            if s.name == "DCGM_FI_DEV_FB_USED"}
    assert used == {"0": 130_000 + 512, "1": 512}  # v1 counts the driver's reserved memory as used


def test_exposition_is_dcgm_exporters_text_with_a_fake_nvml():
    families = parse(generate_latest(gpu_metrics.registry(FakeNVML(), hostname="node-1")).decode())
    assert set(families) == set(DCGM_DEFAULTS), "only the GPU metrics: no process_ or python_ families"
    for name, family in families.items():
        assert family.type == "gauge" and family.documentation == gpu_metrics.HELP[name]
        for sample in family.samples:
            assert sample.name == name, "dcgm-exporter's exact name: no _total or unit suffix"
            assert set(sample.labels) == set(gpu_metrics.LABELS)
    assert len(families["DCGM_FI_DEV_GPU_TEMP"].samples) == 1 and len(families["DCGM_FI_DEV_GPU_UTIL"].samples) == 2


def test_without_the_binding_it_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    reason = gpu_metrics.unavailable_reason()
    assert "nvidia-ml-py" in reason and not gpu_metrics.available()
    with pytest.raises(servers.ServerError, match="nvidia-ml-py"):
        servers.gpu_metrics_server()


@pytest.mark.skipif(GPU_HERE, reason="a GPU is here: the exporter starts (test_exporter_agrees_with_nvidia_smi)")
def test_without_a_gpu_the_exporter_refuses_to_start_and_says_why():
    reason = gpu_metrics.unavailable_reason()
    assert reason, "no GPU here, so there must be a reason"
    done = subprocess.run([sys.executable, "-m", "inference_course.gpu_metrics", "--port", str(servers.free_port())],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stdout + done.stderr
    assert "cannot export GPU metrics" in done.stderr and reason in done.stderr
    with pytest.raises(servers.ServerError, match="no GPU metrics to export here"):
        servers.gpu_metrics_server()


def test_is_gpu_query():
    assert gpu_metrics.is_gpu_query("max by (instance, gpu) (DCGM_FI_DEV_FB_USED + DCGM_FI_DEV_FB_FREE)")
    assert not gpu_metrics.is_gpu_query("sum(rate(vllm:generation_tokens_total[1m]))")
    assert not gpu_metrics.is_gpu_query("DCGM_FI_DEV_GPU_UTIL * on() group_left sum(vllm:num_requests_running)")
    assert not gpu_metrics.is_gpu_query("vector(1)")


def test_the_dashboards_gpu_panels_read_what_the_exporter_exports():
    dashboard = json.loads(monitoring.DASHBOARD.read_text(encoding="utf-8"))
    gpu_panels = {p["title"]: p for p in dashboard["panels"]
                  if any(gpu_metrics.is_gpu_query(t["expr"]) for t in p["targets"])}
    units = {title: p["fieldConfig"]["defaults"]["unit"] for title, p in gpu_panels.items()}
    # Grafana's units for dcgm-exporter's: % (0-100), MiB, W.
    assert sorted(units.values()) == ["mbytes", "percent", "watt"], units
    for title, panel in gpu_panels.items():
        for target in panel["targets"]:
            assert gpu_metrics.is_gpu_query(target["expr"]), f"panel '{title}' mixes GPU and other metrics"
            assert monitoring.metric_names(target["expr"]) <= set(gpu_metrics.METRICS), target["expr"]
            assert "Hostname" not in target["expr"] and "hostname" not in target["expr"], (
                "dcgm-exporter renamed Hostname to hostname after 4.5.3-4.8.2: group by neither")
    used = set().union(*(monitoring.metric_names(t["expr"]) for p in gpu_panels.values() for t in p["targets"]))
    assert {"DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_POWER_USAGE"} <= used


@pytest.mark.engine
@pytest.mark.skipif(not GPU_HERE, reason=f"needs a GPU: {gpu_metrics.unavailable_reason()}")
def test_exporter_agrees_with_nvidia_smi():
    """The real exporter, started as a managed server, against nvidia-smi read just before and just after its
    scrape: the same GPUs (UUID, name), memory used within 1% of the GPU's memory, utilization in 0-100,
    power within the larger of 10% and 10 W of nvidia-smi's range. Stopping it leaves nothing running."""
    with servers.gpu_metrics_server() as exporter:
        time.sleep(1.0)  # one utilization sample period
        with httpx.Client(base_url=exporter.url, trust_env=False, timeout=30) as client:
            before = gpu_metrics.nvidia_smi()
            page = monitoring.scrape(client)
            after = gpu_metrics.nvidia_smi()
        pid = exporter.pid
    assert not exporter.running()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    by_uuid = {labels["UUID"]: labels for labels, _ in page["DCGM_FI_DEV_FB_USED"]}
    assert set(by_uuid) == {row["uuid"] for row in before}, "the exporter and nvidia-smi see the same GPUs"
    report = []
    for b, a in zip(before, after):
        assert by_uuid[b["uuid"]]["modelName"] == b["name"]
        assert by_uuid[b["uuid"]]["gpu"] == str(int(b["index"]))

        def value(name):
            return monitoring.metric(page, name, UUID=b["uuid"])

        used, util, power = value("DCGM_FI_DEV_FB_USED"), value("DCGM_FI_DEV_GPU_UTIL"), value("DCGM_FI_DEV_POWER_USAGE")
        report.append(f"GPU {int(b['index'])}: memory used {used:.0f} MiB (nvidia-smi {b['memory.used']:.0f}-"
                      f"{a['memory.used']:.0f}), utilization {util:.0f}% ({b['utilization.gpu']:.0f}-"
                      f"{a['utilization.gpu']:.0f}), power {power:.1f} W ({b['power.draw']:.1f}-{a['power.draw']:.1f})")
        tolerance = 0.01 * b["memory.total"]
        low, high = sorted((b["memory.used"], a["memory.used"]))
        assert low - tolerance <= used <= high + tolerance, report[-1]
        assert 0 <= util <= 100, report[-1]
        if not math.isnan(b["power.draw"]):  # nvidia-smi prints [N/A] where the board reports no power
            low, high = sorted((b["power.draw"], a["power.draw"]))
            slack = max(0.10 * high, 10.0)
            assert low - slack <= power <= high + slack, report[-1]
        total = used + value("DCGM_FI_DEV_FB_FREE")
        assert total <= b["memory.total"] + 1, f"used + free ({total:.0f} MiB) exceeds memory.total: {report[-1]}"
    print("\n".join(report))
