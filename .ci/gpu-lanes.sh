#!/usr/bin/env bash
# Solution notebooks on a GPU machine with several GPUs, one lane of notebooks per GPU, in parallel.
# Companion of .ci/gpu-device.sh (same staging: shared/gpu/README.md). The lanes run in their own
# session, so they outlive the device call that started them (one call may run 10 minutes); executed
# copies go under /tmp/lanes, outside the repository, and the lanes run from a copy of the repository
# in /tmp/lanes/repo (each device call copies the working tree anew, under any process still in it).
#   bash .ci/gpu-lanes.sh start "FILTER FILTER" "FILTER" ...   lane i runs its filters in order on GPU i
#   LANE_FIRST=1 bash .ci/gpu-lanes.sh start "FILTER"          a lane added later, on GPU 1, from its own copy
#                                                              of the tree (the running lanes keep theirs)
#   bash .ci/gpu-lanes.sh wait SECONDS                         wait for the lanes (at most SECONDS), then
#                                                              copy executed notebooks, reports and logs to $OUT
# FILTER: a substring of a solution notebook's path (python -m inference_course course --only).
set -uo pipefail
OUT=${OUT:-/tmp/out}
LANES=/tmp/lanes
mkdir -p "$OUT" "$LANES"
# shellcheck source=.ci/gpu-install.sh
source "$(dirname "$0")/gpu-install.sh"
export COURSE_PROFILE=gpu
case "${1:-}" in
  start)
    shift
    # The lanes run from a copy: every device call copies the working tree anew, and a process whose
    # working directory was replaced under it fails at its next os.getcwd() (transformers' import does one).
    first=${LANE_FIRST:-0}
    repo="$LANES/repo$first"
    rm -rf "$repo" && mkdir -p "$repo"
    # .measurements/ (what a notebook hands to a later one) is left behind: a lane reads only its own run's
    tar -c --exclude=./.git --exclude='./.gpu*' --exclude=./.venv --exclude='*/.measurements' . | tar -x -C "$repo"
    cd "$repo" || exit 1
    export PYTHONPATH=/root/site:$PWD/src
    python3 -m inference_course model > "$LANES/model.log" 2>&1 || { tail -5 "$LANES/model.log"; exit 1; }
    i=$first
    for lane in "$@"; do
      # shellcheck disable=SC2086  # the lane's filters are meant to split on spaces
      setsid nohup bash -c '
        gpu=$1; shift
        for f in "$@"; do
          CUDA_VISIBLE_DEVICES=$gpu python3 -m inference_course course --out "'"$LANES"'/$gpu" --only "$f"
        done
        echo LANE-DONE' _ "$i" $lane > "$LANES/lane$i.log" 2>&1 < /dev/null &
      echo "lane $i (GPU $i): $lane"
      i=$((i + 1))
    done ;;
  wait)
    deadline=$(( $(date +%s) + ${2:-500} ))
    while [ "$(date +%s)" -lt "$deadline" ]; do
      done_lanes=$(grep -l LANE-DONE "$LANES"/lane*.log 2>/dev/null | wc -l)
      all_lanes=$(ls "$LANES"/lane*.log 2>/dev/null | wc -l)
      [ "$done_lanes" -ge "$all_lanes" ] && break
      sleep 10
    done
    for log in "$LANES"/lane*.log; do echo "== $log"; grep -E "^(ok |ERR)|LANE-DONE|Error|error" "$log" | tail -8; done
    (cd "$LANES" && find . -path './repo*' -prune -o -name '*.ipynb' -path '*Track*' -print | tar -cf "$OUT/executed.tar" -T -)
    # what notebooks handed to later ones (e.g. Triton Lab 2.3's .measurements/), to re-run a reader here
    (cd "$LANES" && find repo* -path '*/.measurements/*.json' -print | tar -cf "$OUT/measurements.tar" -T -) 2>/dev/null
    cat "$LANES"/*/REPORT.md > "$OUT/REPORT.md" 2>/dev/null
    cp "$LANES"/lane*.log "$OUT/" 2>/dev/null
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.txt" 2>&1
    true ;;
  *) echo "usage: $0 start LANE... | wait SECONDS"; exit 2 ;;
esac
