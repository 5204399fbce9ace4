#!/usr/bin/env bash
# The GPU profile on the device machine (no network). The team's recipe for that machine lives in
# shared/gpu/README.md beside the checkout; in short:
# Here:   python3 ../shared/gpu/stage.py     -> .gpu01/ ... .gpuNN/ (wheels, git-ignored)
#         python3 .ci/gpu-extras.py          -> the next .gpuNN/: Lab 2.5 and Triton Lab 2.3 extras
# There:  one `run` per part:  mkdir -p /root/stage && cp .gpuNN/* /root/stage/
#         extra wheels staged apart (stage.py --only NAME) travel as a .tar of wheels/ in a part folder
#         then, back to back:  bash .ci/gpu-device.sh STEP [FILTER]
#         STEP: doctor | nbval | course | tests; FILTER (course, nbval): a path under 02-Labs, to run
#         only those solution notebooks, e.g. 02-Labs/Triton_Track (one command may run 10 minutes)
# Everything worth keeping is written under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
# shellcheck source=.ci/gpu-install.sh
source "$(dirname "$0")/gpu-install.sh"
export COURSE_PROFILE=gpu
NBVAL=(--nbval-lax --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg)
case "${1:-doctor}" in
  doctor)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.txt"
    python3 -m inference_course model
    python3 -m inference_course doctor 2>&1 | tee "$OUT/doctor.txt" ;;
  nbval)    # the committed solution outputs checked on the GPU profile
    python3 -m pytest "${2:-02-Labs}" "${NBVAL[@]}" 2>&1 | tee "$OUT/nbval.txt" ;;
  course)   # execute every solution notebook on the GPU; outputs written back for committing
    python3 -m inference_course course --inplace --out /tmp/course-results ${2:+--only "$2"} > "$OUT/course.txt" 2>&1
    status=$?
    tail -20 "$OUT/course.txt"
    cp /tmp/course-results/REPORT.md "$OUT/"
    tar -cf "$OUT/solutions.tar" 02-Labs/*/*/solutions/*.ipynb
    exit $status ;;
  tests)    # the package's tests on the GPU machine
    python3 -m pytest tests -p no:nbval 2>&1 | tee "$OUT/pytest-gpu.txt" ;;
  *) echo "unknown step $1"; exit 2 ;;
esac
