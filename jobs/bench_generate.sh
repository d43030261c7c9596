#!/usr/bin/env bash
#SBATCH --job-name=tpimpi-bench-loop
#SBATCH --ntasks=8
#SBATCH --output=data/results/slurm-%x-%j.out
# Decode latency and TTFT of the default model at several rank counts, beside Hugging Face
# transformers (in memory) and Accelerate (disk offload) on the same weights, prompt and cores, all in
# one 8-task job, $ROUNDS times over so drift on a shared machine hits every system. Appends JSON lines to $OUT.
# jobs/sweep.sh submits the same as one job per point instead (and memory modes too).
# Launch: mpirun inside the allocation, like jobs/bench.sbatch (which says why not srun).
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
RANKS=${RANKS:-"1 2 4 8"}
NEW_TOKENS=${NEW_TOKENS:-32}
REPEAT=${REPEAT:-5}
OUT=${OUT:-data/results/bench.jsonl}
MODEL_ARGS=${MODEL:+--model $MODEL}

source jobs/mpi-env.sh
BUDGET=${BUDGET:-560M}   # below Accelerate's peak (VmHWM 876-1118 MiB here), for the same-memory comparison
BUDGET_RANKS=${BUDGET_RANKS:-"1 2"}
RATIOS2=${RATIOS2:-0.36,0.64}  # 2 ranks: rank 0's share, less by the head's 113 MB of the 404 MB of layers
ROUNDS=${ROUNDS:-3}   # the whole sequence again: the report takes each configuration's median over rounds
for round in $(seq "$ROUNDS"); do
  echo "round $round of $ROUNDS"
  for baseline in transformers accelerate; do
    python3 -m tpimpi.bench --baseline "$baseline" $MODEL_ARGS --new-tokens "$NEW_TOKENS" --repeat "$REPEAT" --out "$OUT"
  done
  for n in $RANKS; do
    mpirun -np "$n" python3 -m tpimpi.bench $MODEL_ARGS --new-tokens "$NEW_TOKENS" --repeat "$REPEAT" --out "$OUT" \
      --resident --label resident
  done
  # rank 0 also holds the output head: a smaller share of the layers evens out memory and time
  mpirun -np 2 python3 -m tpimpi.bench $MODEL_ARGS --new-tokens "$NEW_TOKENS" --repeat "$REPEAT" --out "$OUT" \
    --resident --ratios "$RATIOS2" --label "resident-ratios-$RATIOS2"
  for n in $BUDGET_RANKS; do
    for io in cache mmap; do
      mpirun -np "$n" python3 -m tpimpi.bench $MODEL_ARGS --new-tokens "$NEW_TOKENS" --repeat "$REPEAT" --out "$OUT" \
        --mem-budget "$BUDGET" --io "$io" --label "budget-$BUDGET-$io"
    done
  done
done
