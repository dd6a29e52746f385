#!/usr/bin/env bash
# Run the GPU benchmarks one after the other; JSON results go to $OUT (if set) or
# benchmarks/results, and a log of everything to run_all_<mode>.log beside them.
#
#   benchmarks/run_all_gpu.sh [single|tp2] [NAME ...]
#     single (default, one GPU): floor k1 w0 w1 driver_overhead
#     tp2    (two GPUs):         floor, floor --tp 2, tp_decode (TP=1 then TP=2)
#   NAMEs pick a subset, e.g. `benchmarks/run_all_gpu.sh single w1` (a device call is
#   limited to 10 minutes; split the list over calls if the whole set does not fit).
#
# Run from the repo root. On the device machines Ray comes from .devbundle (carry it);
# it is sourced here when python3 has no Ray. Each benchmark gets its own time limit (STEP_TIMEOUT).
# EXTRA_ARGS go to every benchmark, W1_ARGS to w1 only; a CPU smoke test of this script:
#   EXTRA_ARGS="--shape tiny" W1_ARGS="--num-requests 8" benchmarks/run_all_gpu.sh single
set -uo pipefail
mode="${1:-single}"
shift || true
out_dir="${OUT:-benchmarks/results}"
mkdir -p "$out_dir"
log="$out_dir/run_all_${mode}.log"
step_timeout="${STEP_TIMEOUT:-480}"
# Only where Ray is missing: the bundle is built for the device machines' Python 3.12.
if [ -f .devbundle/activate.sh ] && ! python3 -c "import ray" 2>/dev/null; then
  source .devbundle/activate.sh
fi
export PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # keep multicast off

case "$mode" in
  single) default=(floor k1 w0 w1 driver_overhead) ;;
  tp2) default=(floor floor_tp2 tp_decode) ;;
  *) echo "usage: $0 [single|tp2] [NAME ...]" >&2; exit 2 ;;
esac
names=("$@")
[ ${#names[@]} -eq 0 ] && names=("${default[@]}")

status=0
extra=(${EXTRA_ARGS:-})
bench() {  # bench MODULE ARGS...: one benchmark, its own time limit, output to the log too
  local cmd=(python3 -m "benchmarks.$1" "${@:2}" "${extra[@]}" --out "$out_dir")
  echo "=== ${cmd[*]}" | tee -a "$log"
  timeout "$step_timeout" "${cmd[@]}" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -ne 0 ] && { echo "=== benchmarks.$1 failed (exit $rc)" | tee -a "$log"; status=1; }
  return 0
}

for name in "${names[@]}"; do
  case "$name" in
    floor) bench floor ;;
    floor_tp2) bench floor --tp 2 ;;
    k1)
      if [ -f benchmarks/k1_paged_attention.py ]; then bench k1_paged_attention
      else echo "=== benchmarks/k1_paged_attention.py not present: skipped" | tee -a "$log"; fi ;;
    w0) bench w0_latency ;;
    w1) bench w1_throughput ${W1_ARGS:-} ;;
    driver_overhead) bench driver_overhead ;;
    tp_decode) bench tp_decode --tps 1,2 ;;
    *) echo "unknown benchmark $name" >&2; status=1 ;;
  esac
done
exit $status
