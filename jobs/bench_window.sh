#!/usr/bin/env bash
#SBATCH --job-name=tpimpi-window
#SBATCH --ntasks=4
#SBATCH --output=data/results/slurm-%x-%j.out
# Decode latency and peak memory of the default model against the window W (README, "Streaming"): at
# each rank count, every block streamed through W buffers for each W in $WINDOWS, then the resident run
# the report compares them with. Appends JSON lines to $OUT, then redraws the report (the window table,
# latency_vs_window.png and memory_vs_window.png) from every results file.
# --ntasks: the largest rank count in $RANKS.
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
RANKS=${RANKS:-"1 2 4"}
WINDOWS=${WINDOWS:-"1 2 4 8 16"}   # each at most the smallest rank's block count (tpimpi.generate --plan)
IOS=${IOS:-"cache mmap"}           # copy blocks from the page cache, or map them
NEW_TOKENS=${NEW_TOKENS:-16}
REPEAT=${REPEAT:-5}
OUT=${OUT:-data/results/window.jsonl}
REPORT=${REPORT:-data/results/report}

source jobs/mpi-env.sh
bench() { mpirun -np "$1" python3 -m tpimpi.bench --new-tokens "$NEW_TOKENS" --repeat "$REPEAT" --out "$OUT" "${@:2}"; }

for n in $RANKS; do
  for io in $IOS; do
    for w in $WINDOWS; do
      bench "$n" --window "$w" --io "$io" --label "window-$w-$io"
    done
  done
  bench "$n" --resident --label resident-sweep
done
python3 -m tpimpi.report data/results/*.jsonl --out "$REPORT"
