# Sourced by .ci/gpu-device.sh and .ci/gpu-lanes.sh on the GPU machine: unpack and install the staged parts
# once per machine, then the environment both use.
if [ ! -d /root/site/vllm ]; then
  cat /root/stage/part.* | tar -x -C /root
  # Extra parts (.ci/gpu-extras.py): wheels and promtools under /root, rootfs-*.tar (files the Debian
  # binaries read at fixed paths) under /.
  for extra in /root/stage/*.tar; do
    case "$extra" in */rootfs-*.tar) tar -xf "$extra" -C / ;; *) [ -f "$extra" ] && tar -xf "$extra" -C /root ;; esac
  done
  python3 -m pip install -q --no-index --no-deps --no-compile --target /root/site /root/wheels/*.whl
  # The Python backend's stub ignores PYTHONPATH (shared/NOTES.md): a .pth file in the system interpreter's
  # site-packages makes the staged packages visible to it too, as installing into that interpreter would.
  # Without it Triton Lab 2.3's py_openvino failed there (2026-11-30: "No module named 'openvino'";
  # torch and onnxruntime come with the image). Added after that run; not yet run on the GPU machine.
  site_dir=$(python3 -c 'import site; print(site.getsitepackages()[0])')
  mkdir -p "$site_dir" && echo /root/site > "$site_dir/zz-course-staged.pth"
fi
export PYTHONPATH=/root/site:$PWD/src PATH=/root/site/bin:/root/promtools:$PATH VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
