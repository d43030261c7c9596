#!/usr/bin/env bash
#SBATCH --job-name=tpimpi-quant
#SBATCH --ntasks=8
#SBATCH --output=data/results/slurm-%x-%j.out
# The targets of quantized blocks (issue 10; README, "Storage formats"), side by side in one run:
#  1. store bytes of the default model kept as it is (auto: Q4_1 layers, Q8_0 embedding), and all in q4
#     (q4_1), against its float32 store (target: at most 0.16x);
#  2. its logits against transformers on the same GGUF (the slow test: within 1e-4, equal greedy tokens);
#  3. N=1 decode tokens/s on one rank, resident: float32 store; the GGUF kept (auto) computed in float32
#     (exact) and in bfloat16 (torch's int4 kernel); llama.cpp on the same GGUF when llama_cpp imports
#     (targets: auto >= 1.5x float32, >= 0.33x llama.cpp);
#  4. a 1.7B-shape Q4_0 GGUF (tpimpi.synth --gguf): tpimpi vs llama.cpp (target >= 0.5x);
#  5. with BIG=1 only: the Llama-2-70B shape, all 80 layers in q4_0 (about 39 GB: checked against df),
#     8 ranks, window 2, from the page cache and with --io direct: peak RSS of every rank (target 0.5 GB),
#     TTFT, s/token, and the decode read bandwidth against raw O_DIRECT (--disk; target 0.9x).
# Run it on a quiet machine. A small setting: NEW_TOKENS=4 REPEAT=1 SKIP_17B=1.
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
NEW_TOKENS=${NEW_TOKENS:-32}
REPEAT=${REPEAT:-3}
THREADS=${THREADS:-2}
WORK=${WORK:-data/quant}          # stores and GGUFs written here
OUT=${OUT:-data/results/quant.jsonl}
BIG=${BIG:-0}                     # 1: also the 70B shape (writes ~39 GB under $WORK, removed after unless KEEP=1)
SKIP_17B=${SKIP_17B:-0}
PROMPT=${PROMPT:-"Write a short story about a lighthouse keeper."}

source jobs/mpi-env.sh
mkdir -p "$WORK" "$(dirname "$OUT")"
GGUF=$(python3 -c 'from tpimpi.models import default_model_path as d; print(d())')

echo "== 1. store bytes"
for dt in float32 auto q4; do
  python3 -m tpimpi.convert "$GGUF" --ranks 1 --dtype "$dt" --out "$WORK/smol-$dt" --quiet
done
python3 - "$WORK" "$OUT" <<'PY'
import json, pathlib, sys
work, out = pathlib.Path(sys.argv[1]), sys.argv[2]
size = {dt: sum(f.stat().st_size for f in (work / f"smol-{dt}").glob("rank*.safetensors")) for dt in ("float32", "auto", "q4")}
row = {"bench": "store_bytes", **{f"{k}_bytes": v for k, v in size.items()},
       "auto_ratio": size["auto"] / size["float32"], "q4_ratio": size["q4"] / size["float32"]}
print(json.dumps(row))
open(out, "a").write(json.dumps(row) + "\n")
PY

echo "== 2. logits against transformers"
python3 -m pytest -q -m slow tests/test_quant.py -k default_model

echo "== 3. decode, default model, one rank"
bench() { mpirun -np "$1" python3 -m tpimpi.bench --new-tokens "$NEW_TOKENS" --repeat "$REPEAT" --threads "$THREADS" \
  --prompt "$PROMPT" --out "$OUT" "${@:2}"; }
bench 1 --model "$WORK/smol-float32" --resident --label quant-float32
bench 1 --model "$WORK/smol-auto" --resident --label quant-auto-f32compute
bench 1 --model "$WORK/smol-auto" --resident --compute bfloat16 --label quant-auto-bf16compute
llamacpp() {  # llama.cpp on a GGUF through tpimpi.bench: the same prompt ids, new tokens, repeats and threads
  python3 -m tpimpi.bench --baseline llama.cpp --model "$1" --new-tokens "$NEW_TOKENS" --repeat "$REPEAT" \
    --threads "$THREADS" --prompt "$PROMPT" --out "$OUT" --label "$2" \
    || echo "llama.cpp failed on $1 (exit $?): no baseline figure for $2"
}
llamacpp "$GGUF" llamacpp-default

if [ "$SKIP_17B" != 1 ]; then
  echo "== 4. a 1.7B-shape Q4_0 GGUF"
  [ -f "$WORK/smollm2-1.7b-q4_0.gguf" ] || python3 -m tpimpi.synth --shape smollm2-1.7b --dtype q4_0 \
    --gguf "$WORK/smollm2-1.7b-q4_0.gguf" --quiet
  python3 -m tpimpi.convert "$WORK/smollm2-1.7b-q4_0.gguf" --ranks 1 --dtype auto --out "$WORK/s17-auto" --quiet
  bench 1 --model "$WORK/s17-auto" --resident --label q17-auto-f32compute
  bench 1 --model "$WORK/s17-auto" --resident --compute bfloat16 --label q17-auto-bf16compute
  llamacpp "$WORK/smollm2-1.7b-q4_0.gguf" llamacpp-1.7b-q4_0
fi

if [ "$BIG" = 1 ]; then
  echo "== 5. Llama-2-70B shape, 80 layers, q4_0, 8 ranks, window 2"
  need=$((42 * 1024 * 1024))   # KiB: 39 GB of store and some room
  free=$(df -k --output=avail "$WORK" | tail -1)
  if [ "$free" -lt "$need" ]; then
    echo "only $((free / 1024 / 1024)) GiB free under $WORK; the 70B shape needs about 40"; exit 1
  fi
  [ -f "$WORK/l70-q4/manifest.json" ] || python3 -m tpimpi.synth --shape llama2-70b --ranks 8 --dtype q4_0 \
    --out "$WORK/l70-q4" --quiet
  for io in cache direct; do
    mpirun -np 8 python3 -m tpimpi.bench --model "$WORK/l70-q4" --window 2 --io "$io" --max-seq-len 256 \
      --new-tokens 4 --repeat 1 --warmup 0 --threads 1 --disk --out "$OUT" --label "l70-q4_0-w2-$io"
  done
  [ "${KEEP:-0}" = 1 ] || rm -rf "$WORK/l70-q4"
fi
