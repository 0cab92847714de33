#!/usr/bin/env bash
# The GPU check (docs/gpu.md): kernel tests, Triton-vs-torch greedy parity, attention and
# quantized-GEMM kernels, decode MBU / prefill MFU, offline throughput against transformers.
# Each part runs in its own process under its own time limit, all of them within 8 minutes;
# a part that fails or runs out of time is recorded as such and the others still run.
#
#   scripts/gpu_check.sh                 on the GPU; writes to $OUT if set, else to
#                                        docs/bench-results/gpu: summary.json, summary.md,
#                                        gpu_check.log
#   scripts/gpu_check.sh --dry-run       the same code on the CPU at tiny sizes (Triton's
#                                        interpreter); writes to a fresh temporary folder
#   scripts/gpu_check.sh --only a,b      only those parts; files named summary-rerun.*
#   scripts/gpu_check.sh --out DIR       write there instead
#
# Parts: kernel_tests attention gemm parity decode offline offline_hf (scripts/gpu_bench.py).
# PYTHON names the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DRY=0 OUT_DIR="" ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT_DIR=${2:?--out needs a folder}; shift ;;
    --only) ONLY=${2:?--only needs part names}; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

# name:seconds. The limits add up to 460 s; with the wheels and the summary the whole run
# stays under 8 minutes, which leaves a 15-minute device budget room for one partial rerun.
# GPU_CHECK_PARTS replaces the list (the tests use it to make a part run out of time).
PARTS=${GPU_CHECK_PARTS:-"kernel_tests:80 attention:30 gemm:30 parity:60 decode:105 offline:100 offline_hf:55"}
TOTAL_S=470
RESULTS=docs/bench-results/gpu
for name in ${ONLY//,/ }; do
  if [[ " $PARTS" != *" $name:"* ]]; then
    echo "gpu_check.sh: no part named $name (parts: $PARTS)" >&2
    exit 2
  fi
done

if [ -z "$OUT_DIR" ]; then
  if [ $DRY = 1 ]; then OUT_DIR=$(mktemp -d /tmp/gpu_check_dry.XXXXXX)
  else OUT_DIR=${OUT:-$RESULTS}; fi
fi
if [ $DRY = 1 ] && [ "$(realpath -m "$OUT_DIR")" = "$(realpath -m $RESULTS)" ]; then
  echo "gpu_check.sh: a dry run never writes to $RESULTS (real GPU results live there)" >&2
  exit 2
fi
mkdir -p "$OUT_DIR"
NAME=summary
[ -n "$ONLY" ] && NAME=summary-rerun
LOG=$OUT_DIR/gpu_check${NAME#summary}.log
WORK=$(mktemp -d /tmp/gpu_check_work.XXXXXX)  # the parts' files; all of it is in the summary
trap 'rm -rf "$WORK"' EXIT
PY=${PYTHON:-python3}
DRYFLAG=""
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
if [ $DRY = 1 ]; then
  DRYFLAG=--dry-run
  export TRITON_INTERPRET=1  # before anything imports triton
fi

main() {
  local t0 spec name limit left start rc failed=0
  t0=$(date +%s)
  echo "gpu_check: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), dry run: $DRY, out: $OUT_DIR"
  if ls .whl/*.whl >/dev/null 2>&1; then
    # The pure-Python dependencies carried to the GPU machine (/work/shared/device.md). A
    # dry run installs them into its work folder only: on this machine they would shadow
    # the virtualenv's own versions.
    local site=/tmp/site
    [ $DRY = 1 ] && site=$WORK/site
    if "$PY" -m pip install -q --no-index --no-deps --target "$site" .whl/*.whl; then
      [ $DRY = 1 ] || export PYTHONPATH=$PYTHONPATH:$site
      echo "installed $(ls .whl/*.whl | wc -l) carried wheels into $site"
    else
      echo "installing the carried wheels failed; going on without them"
    fi
  fi
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv,noheader
  "$PY" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
  "$PY" -c 'import peregrine.engine.llm_engine' || echo "gpu_check: peregrine does not import" \
    "(were the wheels carried? see /work/shared/device.md); the engine parts will fail"
  for spec in $PARTS; do
    name=${spec%%:*} limit=${spec##*:}
    if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$name,"* ]]; then continue; fi
    left=$((TOTAL_S - ($(date +%s) - t0)))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$left" -lt 10 ]; then
      echo "== $name: skipped, no time left"
      echo "$name skip 0 0" >> "$WORK/status.tsv"
      failed=1
      continue
    fi
    echo "== $name (limit ${limit}s)"
    start=$(date +%s.%N)
    timeout -k 5 "$limit" "$PY" scripts/gpu_bench.py "$name" --work "$WORK" \
      --time-limit "$limit" $DRYFLAG
    rc=$?
    [ $rc = 0 ] || failed=1
    echo "$name $rc $(awk "BEGIN {print $(date +%s.%N) - $start}") $limit" >> "$WORK/status.tsv"
    echo "== $name: rc $rc"
  done
  "$PY" scripts/gpu_bench.py summary --work "$WORK" --out "$OUT_DIR" --name "$NAME" $DRYFLAG \
    || failed=1
  echo "gpu_check: $(($(date +%s) - t0)) s; $OUT_DIR/$NAME.json"
  return $failed
}

main 2>&1 | tee "$LOG"
