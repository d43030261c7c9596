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
#  5. cold-cache streaming (target: decode reads at >= 0.9x the raw O_DIRECT rate): the same GGUF split
#     for MID_RANKS ranks, every block streamed (--window 2 --io direct) with --compute bfloat16, page cache
#     dropped before each run: as converted by default (blocks in GGUF layout: the exact kernel) and with
#     --int4pack (blocks in the int4 kernel's layout, multiplied as read); --disk measures the raw
#     O_DIRECT read of the same files in the same run. About 5 minutes on a quiet machine;
#  6. with BIG=1 only: the Llama-2-70B shape, all 80 layers in q4_0 with --int4pack (43.1 GB = 40.2 GiB:
#     checked against df; BIG_LAYOUT=gguf: 38.8 GB, the GGUF layout), 8 ranks, window 2, --compute bfloat16, from the page cache and with --io direct (page
#     cache dropped before each): peak RSS of every rank (target 0.5 GB), TTFT, s/token, and the decode
#     read bandwidth against raw O_DIRECT (--disk; target 0.9x).
# Run it on a quiet machine, as root (to drop the page cache). A small setting: NEW_TOKENS=4 REPEAT=1
# SKIP_17B=1 MID_SHAPE=smollm2-135m; only the streaming sections: STREAM_ONLY=1 (BIG=1 BIG_SHAPE=llama2-7b
# BIG_LAYERS=2 runs section 6's code on a small store).
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
NEW_TOKENS=${NEW_TOKENS:-32}
REPEAT=${REPEAT:-3}
THREADS=${THREADS:-2}
WORK=${WORK:-data/quant}          # stores and GGUFs written here
OUT=${OUT:-data/results/quant.jsonl}
BIG=${BIG:-0}                     # 1: also the 70B shape (writes ~39 GB under $WORK, removed after unless KEEP=1)
SKIP_17B=${SKIP_17B:-0}
STREAM_ONLY=${STREAM_ONLY:-0}     # 1: sections 5 and 6 only
MID_SHAPE=${MID_SHAPE:-smollm2-1.7b}  # section 5's shape (tpimpi.synth --gguf: smollm2-1.7b or smollm2-135m)
MID_RANKS=${MID_RANKS:-2}
MID_TOKENS=${MID_TOKENS:-8}
BIG_SHAPE=${BIG_SHAPE:-llama2-70b}
BIG_LAYERS=${BIG_LAYERS:-}        # section 6 on the first K layers only (default: all)
BIG_LAYOUT=${BIG_LAYOUT:-int4pack}  # or gguf: the store as converted by default (streamed blocks: exact kernel)
PROMPT=${PROMPT:-"Write a short story about a lighthouse keeper."}

source jobs/mpi-env.sh
mkdir -p "$WORK" "$(dirname "$OUT")"
GGUF=$(python3 -c 'from tpimpi.models import default_model_path as d; print(d())')
drop_caches() {  # cold cache: nothing of the stores left in memory (needs root)
  sync
  if ! echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; then
    echo "cannot drop the page cache (not root?): the cold-cache figures below are not cold"
  fi
}
bench() { mpirun -np "$1" python3 -m tpimpi.bench --new-tokens "$NEW_TOKENS" --repeat "$REPEAT" --threads "$THREADS" \
  --prompt "$PROMPT" --out "$OUT" "${@:2}"; }

if [ "$STREAM_ONLY" != 1 ]; then
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
fi  # STREAM_ONLY

echo "== 5. cold-cache streaming, $MID_SHAPE Q4_0, $MID_RANKS ranks, window 2, --io direct, --compute bfloat16"
mid="$WORK/${MID_SHAPE}-q4_0.gguf"
[ -f "$mid" ] || python3 -m tpimpi.synth --shape "$MID_SHAPE" --dtype q4_0 --gguf "$mid" --quiet
for layout in gguf int4pack; do
  flag=(); [ "$layout" = int4pack ] && flag=(--int4pack)
  st="$WORK/mid-n$MID_RANKS-$layout"
  python3 -m tpimpi.convert "$mid" --ranks "$MID_RANKS" --dtype auto "${flag[@]}" --out "$st" --quiet
  drop_caches
  mpirun -np "$MID_RANKS" python3 -m tpimpi.bench --model "$st" --window 2 --io direct --compute bfloat16 --disk \
    --new-tokens "$MID_TOKENS" --repeat "$REPEAT" --threads 1 --prompt "$PROMPT" --out "$OUT" \
    --label "mid-$MID_SHAPE-n$MID_RANKS-$layout-w2-direct-cold"
done

if [ "$BIG" = 1 ]; then
  echo "== 6. $BIG_SHAPE${BIG_LAYERS:+ (first $BIG_LAYERS layers)}, q4_0 ($BIG_LAYOUT layout), 8 ranks, window 2, --compute bfloat16"
  layers=${BIG_LAYERS:-80}
  need=$((42 * 1024 * 1024 * layers / 80))   # KiB: the 70B shape's 80 layers: 40.2 GiB with --int4pack (36.2 without)
  big="$WORK/big-$BIG_SHAPE${BIG_LAYERS:+-$BIG_LAYERS}-q4_0-$BIG_LAYOUT"
  free=$(df -k --output=avail "$WORK" | tail -1)
  if [ ! -f "$big/manifest.json" ] && [ "$free" -lt "$need" ]; then   # a store kept (KEEP=1) needs no room
    echo "only $((free / 1024 / 1024)) GiB free under $WORK; the 70B shape needs about $((need / 1024 / 1024))"; exit 1
  fi
  flag=(); [ "$BIG_LAYOUT" = int4pack ] && flag=(--int4pack)
  [ -f "$big/manifest.json" ] || python3 -m tpimpi.synth --shape "$BIG_SHAPE" ${BIG_LAYERS:+--layers "$BIG_LAYERS"} \
    --ranks 8 --dtype q4_0 "${flag[@]}" --out "$big" --quiet
  for io in cache direct; do
    drop_caches
    mpirun -np 8 python3 -m tpimpi.bench --model "$big" --window 2 --io "$io" --compute bfloat16 --max-seq-len 256 \
      --new-tokens 4 --repeat 1 --warmup 0 --threads 1 --disk --out "$OUT" \
      --label "big-$BIG_SHAPE${BIG_LAYERS:+-$BIG_LAYERS}-q4_0-$BIG_LAYOUT-w2-$io"
  done
  [ "${KEEP:-0}" = 1 ] || rm -rf "$big"
fi
