#!/usr/bin/env bash
# One self-contained GPU report: the card, a matmul peak measured in this call, then for gpt2-350m
# and llama-1b in bfloat16 with cuDNN attention the train step's tokens/s, TFLOP/s and MFU against
# the datasheet dense bf16 peak (and the measured one), and generation tokens/s.
#
#   bash benchmarks/gpu.sh              # on a machine with an NVIDIA GPU: python3 with jax[cuda],
#                                       # flax, optax, orbax (nothing is installed; no tfds/grain)
#   bash benchmarks/gpu.sh --tiny       # end to end on any CPU with tiny presets (or
#                                       # JAXFORMER_BENCH_TINY=1)
# PYTHON picks the interpreter; GPT2_BATCH, LLAMA_BATCH, STEPS change the sizes. JSON lines of
# every measurement go to ${OUT:-$TMPDIR/bench_gpu}.jsonl (TMPDIR default /tmp) beside the readable output.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TINY=${JAXFORMER_BENCH_TINY:-0}
[[ "${1:-}" == "--tiny" ]] && TINY=1
OUT=${OUT:-${TMPDIR:-/tmp}/bench_gpu}.jsonl
: >"$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" # the checkout, installed or not
export XLA_PYTHON_CLIENT_PREALLOCATE=false           # memory figures from XLA, not the pool
failures=0

run() { # run a bench command; keep its JSON line; a failure is reported and the script goes on
  echo "\$ python -m jaxformer.bench $*"
  local log
  log=$(mktemp)
  if "$PY" -m jaxformer.bench "$@" --json 2>&1 | tee "$log" | grep -v '^{'; then :; fi
  if [[ ${PIPESTATUS[0]} -ne 0 ]] || ! grep -q '^{' "$log"; then
    echo "  FAILED (last lines above)"
    failures=$((failures + 1))
  else
    grep '^{' "$log" | tail -1 >>"$OUT"
  fi
  rm -f "$log"
}

echo "== machine"
date -u
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv
else
  echo "no nvidia-smi (no NVIDIA GPU here)"
fi
"$PY" - <<'PY'
import jaxformer, jax, jaxlib  # jaxformer first: it quiets libtpu on hosts without a TPU
d = jax.devices()[0]
print(f"jax {jax.__version__}, jaxlib {jaxlib.__version__}, backend {jax.default_backend()}, "
      f"{jax.device_count()} x {d.device_kind}")
import sys
bad = [m for m in ("tensorflow_datasets", "grain") if m in sys.modules]
assert not bad, bad
PY

if [[ "$TINY" == 1 ]]; then
  echo "== tiny mode (CPU check of this script; numbers mean nothing)"
  MODELS=("gpt-tiny" "llama-tiny")
  SEQ=(128 128)
  BATCH=(8 8)
  ATTN=auto
  STEPS=${STEPS:-2}
  GEN=(--layers 2 --d-model 64 --heads 4 --vocab 512 --new-tokens 16 --batch 1 4 --repeats 1)
  PEAK=(--size 256 --repeats 2)
else
  MODELS=("gpt2-350m" "llama-1b")
  SEQ=(1024 2048)
  BATCH=("${GPT2_BATCH:-32}" "${LLAMA_BATCH:-8}")
  ATTN=cudnn
  STEPS=${STEPS:-10}
  GEN=(--preset gpt2-350m --dtype bfloat16 --new-tokens 256 --batch 1 16 64)
  PEAK=()
fi

echo "== matmul peak (measured in this call)"
run peak "${PEAK[@]}"

echo "== train step, bfloat16, attention=$ATTN"
for i in "${!MODELS[@]}"; do
  run train --preset "${MODELS[$i]}" --dtype bfloat16 --attention "$ATTN" \
    --seq-len "${SEQ[$i]}" --batch "${BATCH[$i]}" --steps "$STEPS" --warmup 2
done

echo "== generation (greedy, KV cache vs none)"
run generate "${GEN[@]}"

echo "== summary"
"$PY" - "$OUT" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
peak = next((r for r in rows if r["command"] == "peak"), {})
measured = peak.get("bfloat16_flops_per_second")
for r in rows:
    if r["command"] == "train":
        got = r["achieved_flops_per_second"]
        vs = f", {100 * got / measured:.1f}% of the measured bf16 matmul peak" if measured else ""
        print(f"{r['model']:10s} seq {r['seq_len']} batch {r['batch']}: "
              f"{r['tokens_per_second']:,.0f} tokens/s, {got / 1e12:.1f} TFLOP/s, "
              f"MFU {100 * r['mfu']:.1f}% of {r['peak_flops_per_second'] / 1e12:.0f} TFLOP/s "
              f"({r['peak_source']}){vs}; memory {r['peak_memory_bytes'] / 2**30:.1f} GiB")
    if r["command"] == "generate":
        for g in r["rows"]:
            print(f"generate {g['impl']:20s} batch {g['batch']:3d}: "
                  f"{g['tokens_per_second']:,.0f} tokens/s (same tokens: {g['same_tokens']})")
PY
echo "failures: $failures"
exit $((failures > 0))
