#!/usr/bin/env bash
#SBATCH --job-name=tpimpi-streaming
#SBATCH --ntasks=8
#SBATCH --output=data/results/slurm-%x-%j.out
# The sliding-window scheduler's figures (README, "Streaming"): streaming vs resident for the default
# model and a 1.7B-shaped synthetic model at 1, 2 and 4 ranks; peak memory of a Llama-2-70B-shaped
# model at 8 ranks with a window of 2 in bfloat16; and decode's read bandwidth against the disk's
# raw O_DIRECT bandwidth. Appends JSON lines to $OUT. Synthetic stores go to $STORES (a few GB each).
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
RANKS=${RANKS:-"1 2 4"}
REPEAT=${REPEAT:-5}
NEW_TOKENS=${NEW_TOKENS:-16}
STORES=${STORES:-data/stores}
BIG_TOKENS=${BIG_TOKENS:-8}       # the 1.7B-shaped model: about 3.4 GB read per token in bfloat16
BIG_REPEAT=${BIG_REPEAT:-3}
L70_LAYERS=${L70_LAYERS:-4}
L70_TOKENS=${L70_TOKENS:-4}       # a 70B-shaped token reads about 8 GB here: fewer, slower tokens
L70_REPEAT=${L70_REPEAT:-2}
OUT=${OUT:-data/results/streaming.jsonl}

source jobs/mpi-env.sh
bench() { mpirun -np "$1" python3 -m tpimpi.bench --new-tokens "$NEW_TOKENS" --repeat "$REPEAT" --out "$OUT" "${@:2}"; }
# (later options win: the 70B run overrides --new-tokens and --repeat)
synth() { [ -f "$1/manifest.json" ] || python3 -m tpimpi.synth --out "$@"; }

for n in $RANKS; do
  bench "$n" --resident --label default-resident
  bench "$n" --window 2 --label default-window2
  bench "$n" --window 2 --io direct --label default-window2-direct
  synth "$STORES/smollm2-1.7b-n$n" --shape smollm2-1.7b --ranks "$n" --dtype bfloat16
  for mode in "--resident" "--window 2"; do
    bench "$n" --model "$STORES/smollm2-1.7b-n$n" $mode --compute bfloat16 --label "1.7b${mode// /}" \
      --new-tokens "$BIG_TOKENS" --repeat "$BIG_REPEAT"
  done
done
# cold cache: every block read with O_DIRECT, next to the raw O_DIRECT read of the same files
bench 1 --model "$STORES/smollm2-1.7b-n1" --window 2 --io direct --compute bfloat16 --disk --label 1.7b-direct \
  --new-tokens "$BIG_TOKENS" --repeat "$BIG_REPEAT"
synth "$STORES/llama2-70b-n8" --shape llama2-70b --layers "$L70_LAYERS" --ranks 8 --dtype bfloat16
bench 8 --model "$STORES/llama2-70b-n8" --window 2 --compute bfloat16 --max-seq-len 2048 --label 70b-window2 \
  --new-tokens "$L70_TOKENS" --repeat "$L70_REPEAT" --warmup 0
