#!/usr/bin/env python3
"""Extra parts for the GPU machine: what Lab 2.5 and Triton Lab 2.3 need beyond shared/gpu/stage.py's set.

Run here, in the project's root, AFTER `python3 ../shared/gpu/stage.py` (which deletes every .gpuNN/ first):
    python3 .ci/gpu-extras.py
It writes the next free .gpuNN/ folders (git-ignored); send each with one `run` after the main parts, like
them (`cp .gpuNN/* /root/stage/`). `.ci/gpu-device.sh` and `.ci/gpu-lanes.sh` unpack them.

What was missing on the H200 run of 2026-11-30, and how each part carries it:
- wheels: locust and oteltest (Lab 2.5/04), onnx and onnxruntime (Triton Lab 2.3), one tar; openvino alone in
  a second (its wheel is ~59 MB: over stage.py's 48 MB parts, under the 64 MiB one transfer may carry with
  the working tree). A wheel whose project the main parts already hold in another version is left out: two
  versions of one project stop pip's install there (seen with greenlet).
- promtools.tar: Debian's prometheus, promtool, alertmanager, amtool and hey (Triton Lab 2.4/01; they link only libc),
  xz-compressed;
  unpacked into /root/promtools, which the scripts put on PATH.
- rootfs-alertmanager.tar: Debian's Alertmanager reads /usr/share/prometheus/alertmanager/default.tmpl and
  fails to apply its config without it (Lab 2.5/03 failed so); the scripts unpack rootfs-*.tar under /.
"""
from __future__ import annotations

import glob
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

STAGE = Path(__file__).resolve().parents[2] / "shared" / "gpu" / "stage.py"
# nvidia-ml-py: the GPU image already has one (gpu-image-packages.txt); staging it pins the version the course's
# GPU exporter (inference_course.gpu_metrics, Lab 2.5/02) was written against.
WHEELS = ["locust>=2.40", "oteltest>=0.49", "onnx==1.23.2", "onnxruntime==1.32.0", "openvino==2026.4.1",
          "nvidia-ml-py==13.615.71"]
ALONE = ("openvino-",)  # wheels too big to share a part
BINARIES = {"prometheus": "prometheus", "promtool": "promtool", "amtool": "amtool",
            "alertmanager": "prometheus-alertmanager", "hey": "hey"}  # name there -> Debian's name here
TEMPLATES = Path("/usr/share/prometheus/alertmanager")
PART_LIMIT = 60 * 1024 * 1024


def project(wheel: str) -> str:
    return re.sub(r"[-_.]+", "-", Path(wheel).name.split("-")[0]).lower()


def next_folder() -> Path:
    taken = [int(d[4:]) for d in glob.glob(".gpu[0-9][0-9]")]
    folder = Path(".gpu%02d" % (1 + max(taken or [0])))
    folder.mkdir()
    return folder


def tar_wheels(wheels: list[Path], name: str) -> Path:
    folder = next_folder()
    with tarfile.open(folder / name, "w") as t:
        for wheel in wheels:
            t.add(wheel, arcname=f"wheels/{wheel.name}")
    return folder


def main() -> int:
    if not glob.glob(".gpu01/part.*"):
        sys.exit("no .gpu01/part.*: run `python3 ../shared/gpu/stage.py` first (it deletes every .gpuNN/)")
    main_wheels = {project(w): Path(w).name for w in glob.glob("wheels-gpu/*.whl")}
    before = set(glob.glob(".gpu[0-9][0-9]"))
    subprocess.run([sys.executable, str(STAGE), "--only", *WHEELS], check=True)
    for folder in set(glob.glob(".gpu[0-9][0-9]")) - before:
        shutil.rmtree(folder)  # stage.py's single tar: repacked below
    keep, alone, dropped = [], [], []
    for wheel in sorted(Path("wheels-gpu-extra").glob("*.whl")):
        held = main_wheels.get(project(wheel.name))
        if held and held != wheel.name:
            dropped.append(f"{wheel.name} (the main parts hold {held})")
        elif not held:
            (alone if wheel.name.startswith(ALONE) else keep).append(wheel)
    written = [tar_wheels(keep, "extra-wheels.tar")]
    written += [tar_wheels([w], f"extra-{project(w.name)}.tar") for w in alone]

    folder = next_folder()
    with tarfile.open(folder / "promtools.tar", "w:xz") as t:
        for there, here in BINARIES.items():
            binary = shutil.which(here)
            if not binary:
                sys.exit(f"{here} is not installed here: apt-get install prometheus prometheus-alertmanager")
            t.add(binary, arcname=f"promtools/{there}")
    with tarfile.open(folder / "rootfs-alertmanager.tar", "w") as t:
        t.add(TEMPLATES, arcname=str(TEMPLATES).lstrip("/"))
    written.append(folder)

    for folder in written:
        size = sum(f.stat().st_size for f in folder.iterdir())
        assert size < PART_LIMIT, f"{folder} holds {size / 2**20:.0f} MiB: too much for one transfer"
        print(f"{folder}: {', '.join(sorted(f.name for f in folder.iterdir()))} ({size / 2**20:.1f} MiB)")
    for line in dropped:
        print("left out:", line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
