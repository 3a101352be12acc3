#!/usr/bin/env bash
# The open issues' GPU checks in one device call: each benchmark under its own time limit (9.5 minutes in
# all at most; each limit lies well above the step's expected time), its JSON record under $OUT and every
# step's output in $OUT/log.txt, so whatever finished comes back even when a later step runs over. The
# device image has torch, transformers, accelerate and the rest; it lacks diffusers, faiss-cpu and
# open-clip-torch (the CLIP BPE vocabulary), which travel as wheels.
#
#   here, once:      bash benchmarks/device_checks.sh --fetch     # the wheels, into .whl/ (git-ignored)
#   the device call: command "bash benchmarks/device_checks.sh", carry [".whl"], timeout_s 600
#   a smoke run of the same steps on this CPU (tiny model, small sizes):
#                    OUT=/tmp/device-smoke bash benchmarks/device_checks.sh --smoke
#                    (or: python -m pytest -m slow -k device_checks, before a device call)
# Tracked files and these wheels come to about 63.6 MiB of the 64 MiB a call may carry: should the tree
# grow past it, fetch without faiss-cpu (then only the mitigation step fails).
set -u
cd "$(dirname "$0")/.." || exit 1  # the repository root: the paths below are relative to it
MODE=${1:-device}                  # device, --fetch or --smoke
[[ $MODE == device || $MODE == --fetch || $MODE == --smoke ]] || { echo "usage: $0 [--fetch | --smoke]"; exit 2; }
WHEELS=(diffusers==0.42.1 open-clip-torch==3.3.0 importlib_metadata==10.2.0 zipp==4.1.2 faiss-cpu==1.15.1)

if [[ $MODE == --fetch ]]; then
    exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl "${WHEELS[@]}"
fi
: "${OUT:?set OUT, the folder the records go to (the device machine sets it)}"
mkdir -p "$OUT"
LOG="$OUT/log.txt"
if [[ $MODE == --smoke ]]; then
    COMMON=(--size tiny --device cpu)
    SIZES=(--prompts 8 --loop-prompts 2 --repeats 1 --num-inference-steps 4)
    EXPLAIN=(--repeats 1 --num-inference-steps 4)
    MITIGATION=(--num-inference-steps 4 --index-rows 1000 --batch-size 2)
    SPEEDUPS=(channels_last)
else
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl >>"$LOG" 2>&1 || { echo "the carried wheels did not install: see $LOG"; exit 1; }
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
    nvidia-smi >>"$LOG" 2>&1
    COMMON=(--device cuda)
    SIZES=()
    EXPLAIN=()
    MITIGATION=(--batch-size 4)  # seven timed runs, each after a warm-up, fit the step's limit
    SPEEDUPS=(eager_attention channels_last compile cuda_graphs)
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

step() {  # step NAME SECONDS COMMAND...: run it under a time limit, its output appended to the log
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit} s): $*" >>"$LOG"
    local started=$SECONDS
    timeout "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    echo "=== $name: rc $rc after $((SECONDS - started)) s" | tee -a "$LOG"
}

step detect_throughput 150 python3 benchmarks/detect_throughput.py "${COMMON[@]}" "${SIZES[@]}" \
    --out "$OUT/detect_throughput.json"
step explain_latency 90 python3 benchmarks/explain_latency.py "${COMMON[@]}" "${EXPLAIN[@]}" \
    --out "$OUT/explain_latency.json"
step mitigation_overhead 120 python3 benchmarks/mitigation_overhead.py "${COMMON[@]}" "${MITIGATION[@]}" \
    --out "$OUT/mitigation_overhead.json"
if [[ $MODE == device ]]; then
    step pytest_gpu 60 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py
fi
step detect_speedups 150 python3 benchmarks/detect_throughput.py "${COMMON[@]}" "${SIZES[@]}" \
    --speedups "${SPEEDUPS[@]}" --out "$OUT/detect_speedups.json"
