#!/usr/bin/env bash
# One command for a GPU machine (issue 11): build the CUDA extension, run the GPU-marked tests, then the
# benchmarks at their headline shapes, writing CSVs and a summary to OUTDIR (aim: within 8 minutes on an
# H100/H200). Each step has its own time limit; a failed step is recorded in the summary and the rest still run.
#
#   benchmarks/gpu_check.sh OUTDIR             # on the GPU machine (no registry needed: torch/triton installed)
#   benchmarks/gpu_check.sh --dry-run OUTDIR   # the same pipeline on CPU at tiny sizes (tests/test_gpu_check.py)
set -uo pipefail

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
if [[ $# -ne 1 ]]; then echo "usage: $0 [--dry-run] OUTDIR" >&2; exit 2; fi
OUT="$(mkdir -p "$1" && cd "$1" && pwd)"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"
SUMMARY="$OUT/summary.md"
FAILED=0

if [[ $DRY -eq 1 ]]; then
  DEV=(--device cpu); QUICK=(--quick); LIMIT=300
else
  DEV=(--device cuda); QUICK=(); LIMIT=150
fi

{
  echo "# gpu_check $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo '-dirty')"
  echo "- mode: $([[ $DRY -eq 1 ]] && echo 'dry run (CPU, tiny sizes)' || echo 'GPU')"
  echo "- device: $($PY -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")' 2>&1)"
  echo
  echo "| step | status | seconds | output |"
  echo "|---|---|---:|---|"
} > "$SUMMARY"

step() {  # step NAME LIMIT_S OUTFILE CMD...
  local name="$1" limit="$2" file="$3"; shift 3
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local status="ok"
  if [[ $rc -ne 0 ]]; then status="FAILED (rc $rc)"; FAILED=1; fi
  echo "| $name | $status | $((SECONDS - t0)) | $file |" >> "$SUMMARY"
  echo "[gpu_check] $name: $status ($((SECONDS - t0)) s)"
}

# 1. the CUDA extension (in place; the dry run checks that the CPU build is importable)
if [[ $DRY -eq 1 ]]; then
  step build 60 build.log "$PY" -m mat_kernels
else
  step build 240 build.log env MAX_JOBS="$(nproc)" "$PY" setup.py build_ext --inplace
fi
# 2. the GPU-marked tests (all skipped on CPU: the dry run checks they collect)
step gpu_tests "$LIMIT" gpu_tests.xml "$PY" -m pytest -q -m gpu tests --junitxml "$OUT/gpu_tests.xml"
# 3. static figures of the Triton kernels (any machine)
step static 300 static.json "$PY" benchmarks/triton_static.py --arch 90 --json "$OUT/static.json"
# 4. benchmarks at their headline shapes
step psg_variants "$LIMIT" psg_variants.csv "$PY" benchmarks/bench_psg_variants.py "${QUICK[@]}" \
  --csv "$OUT/psg_variants.csv"
step lambda_max "$LIMIT" lambda_max.csv "$PY" benchmarks/bench_segment_grams.py "${DEV[@]}" "${QUICK[@]}" \
  --csv "$OUT/lambda_max.csv"
step model_lambda_max "$LIMIT" model_lambda_max.csv "$PY" benchmarks/bench_model_lambda_max.py "${DEV[@]}" \
  "${QUICK[@]}" --csv "$OUT/model_lambda_max.csv"
step sparse_backward "$LIMIT" sparse_backward.csv "$PY" benchmarks/bench_sparse_grad.py "${DEV[@]}" \
  "${QUICK[@]}" --csv "$OUT/sparse_backward.csv"
# one linear's forward + backward + optimizer step with frozen modules, BERT-base shapes, bf16 (issue 19)
step frozen_step "$LIMIT" frozen_step.csv "$PY" benchmarks/bench_frozen_step.py --level layer "${DEV[@]}" \
  --dtype bf16 --layers bert-qkv,bert-out,bert-ffn-in,bert-ffn-out "${QUICK[@]}" --csv "$OUT/frozen_step.csv"

{
  echo
  for f in "$OUT"/*.csv; do
    [[ -e "$f" ]] || continue
    echo "## $(basename "$f") ($(($(wc -l < "$f") - 1)) rows)"
    echo
    echo '```'
    head -n 25 "$f"
    echo '```'
    echo
  done
} >> "$SUMMARY"
echo "[gpu_check] summary: $SUMMARY"
exit $FAILED
