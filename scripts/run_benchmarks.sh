#!/usr/bin/env bash
# Regenerate every number, table and plot of docs/benchmarks.md, in one go.
#
#   scripts/run_benchmarks.sh              # the full set (about an hour on 2 quiet cores)
#   SIZE=small scripts/run_benchmarks.sh   # a quarter of the work
#   QUICK=1 scripts/run_benchmarks.sh      # everything at a tiny size (checks the script)
#
# Needs `make setup`; for the peers, `.venv/bin/pip install -e '.[peers]'` (transformers,
# llama-cpp-python) and llama.cpp's own binaries, which `--build-peers` builds on first use
# (../shared/peers/build_llamacpp.sh, about 5 minutes on 2 cores, once; or point
# PEREGRINE_LLAMACPP_BIN at a folder holding llama-bench, llama-batched-bench and
# llama-server). Results go to docs/bench-results/ (JSON + markdown), plots to docs/images/,
# and the tables between the <!-- BEGIN bench:NAME --> markers of docs/benchmarks.md are
# rewritten from them. Run it on a quiet machine: other load skews every number.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
OUT=${OUT:-docs/bench-results}
IMAGES=${IMAGES:-docs/images}
DOC=${DOC:-docs/benchmarks.md}
THREADS=${THREADS:-$(nproc)}
bench() { "$PY" -m peregrine.cli bench "$@"; }

# SIZE=full: the sizes the tables below were designed for. SIZE=small: a quarter of the
# work (what a busy machine can do in a session). SIZE=quick: seconds, to check the script.
SIZE=${SIZE:-full}
[[ "${QUICK:-0}" == 1 ]] && SIZE=quick
case "$SIZE" in
  full)
    OFFLINE=(--num-prompts 64 --input-len 32-512 --output-len 32-256)
    WORKLOADS=(--workloads pp512,tg128,batch32x64x128 --repetitions 5)
    SEQS=16
    LATENCY=(--input-lens 32,128,512,1024 --batch-sizes 1,4,16,64 --output-len 32 --iters 3)
    SERVE=(--num-prompts 8,32,96 --input-len 64-256 --output-len 64-128)
    SPEC_TOKENS=96 ;;
  small)
    OFFLINE=(--num-prompts 32 --input-len 32-256 --output-len 32-128)
    WORKLOADS=(--workloads pp512,tg128,batch32x64x128 --repetitions 3)
    SEQS=8
    LATENCY=(--input-lens 32,128,512 --batch-sizes 1,4,16 --output-len 16 --iters 2)
    SERVE=(--num-prompts 4,16,48 --input-len 64-128 --output-len 32-64)
    SPEC_TOKENS=64 ;;
  quick)
    OFFLINE=(--num-prompts 4 --input-len 16-64 --output-len 4-16)
    WORKLOADS=(--workloads pp64,tg16,batch4x16x16 --repetitions 1)
    SEQS=2
    LATENCY=(--input-lens 32,128 --batch-sizes 1,4 --output-len 8 --iters 1)
    SERVE=(--num-prompts 2,4,8 --input-len 16-64 --output-len 4-16)
    SPEC_TOKENS=8 ;;
  *) echo "SIZE must be full, small or quick" >&2; exit 2 ;;
esac
COMMON=(--threads "$THREADS" --seed 0)
mkdir -p "$OUT" "$IMAGES"

# The CPU roof (float32 matmul FLOP/s, memory bandwidth), measured afresh for this machine.
"$PY" -c "from peregrine.bench.roofline import cpu_peak; print(cpu_peak($THREADS, remeasure=True))"

# 1. llama.cpp's own benchmarks, ours beside its binaries: prefill (llama-bench pp512), one
#    stream decode (tg128), 32 sequences x 64-token prompts x 128 new tokens
#    (llama-batched-bench); ratios to llama.cpp, MFU/MBU.
bench compare --engines peregrine,llama.cpp "${WORKLOADS[@]}" "${COMMON[@]}" --build-peers \
  --output-dir "$OUT/workloads" --output "$OUT/workloads.json"

# 2. Offline throughput, one random workload: ours (continuous and static batching) and the
#    peers that run any workload (llama.cpp through llama-cpp-python: no binary runs it).
bench compare --engines peregrine:continuous,peregrine:static,transformers,llama.cpp-python \
  "${OFFLINE[@]}" "${COMMON[@]}" --kv-cache-memory 3 --hf-batch-size 16 \
  --output-dir "$OUT/compare" --output "$OUT/throughput.json"

# 3. Serving: 1, 8 and 32 concurrent streams, ours and llama.cpp's llama-server (32 parallel
#    slots, continuous batching), same GGUF.
bench serve --launch peregrine,llama.cpp --max-concurrency 1,8,32 "${SERVE[@]}" \
  "${COMMON[@]}" --goodput ttft:2000 tpot:200 --server-args "--kv-cache-memory 3" \
  --build-peers --output "$OUT/serve.json"

# 4. Latency: TTFT by prompt length, decode speed by batch size.
bench latency "${LATENCY[@]}" "${COMMON[@]}" --kv-cache-memory 3 --output "$OUT/latency.json"

# 5. Our three batching policies when a batch holds a quarter of the requests, where static
#    batching waits for each batch's longest request.
bench throughput --batching continuous,dynamic,static --max-num-seqs "$SEQS" \
  "${OFFLINE[@]}" "${COMMON[@]}" --kv-cache-memory 3 --output "$OUT/batching.json"

# 6. Speculative decoding: decode speed with and without each proposer, copy-heavy and chat.
bench spec --proposers ngram,layers:24 --workloads copy,chat --batch-sizes 1,8 \
  --max-tokens "$SPEC_TOKENS" --threads "$THREADS" --kv-cache-memory 1 --output "$OUT/spec.json"

# Plots and the tables of docs/benchmarks.md.
bench plot "$OUT/throughput.json" "$OUT/batching.json" "$OUT/latency.json" "$OUT/serve.json" \
  --out-dir "$IMAGES"
bench report --doc "$DOC" --results-dir "$OUT"
