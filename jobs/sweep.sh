#!/usr/bin/env bash
# Submits a benchmark sweep: the transformers baseline, then jobs/bench.sbatch once for every rank count
# in RANKS and memory mode in WINDOWS. Run it (not sbatch it) from anywhere; it prints the job ids.
#
#   bash jobs/sweep.sh
#   RANKS="2 4" WINDOWS="resident 1 2 4" NEW_TOKENS=64 SBATCH_ARGS="--partition=pi --time=30" bash jobs/sweep.sh
#
# One job per point, chained with --dependency=afterany, rather than one job looping over the points:
# each point gets exactly the allocation it measures (--ntasks=N, so Slurm places N tasks as it would
# for a user), the points run one after another so they never share cores or disks, a point that fails
# or runs out of time does not cost the others, and each has its own log (data/results/slurm-<name>-<id>.out).
# The results all land in one file, $OUT, as JSON lines labelled with the job name and id.
# jobs/bench_generate.sh is the other way: one 8-task job looping over the rank counts.
# Launch inside each job: mpirun (see jobs/bench.sbatch for why not srun).
set -euo pipefail
cd "$(dirname "$0")/.."

RANKS=${RANKS:-"1 2 4 8"}
WINDOWS=${WINDOWS:-"resident 2"}   # per point: "resident" or a window size W (blocks in memory)
BASELINE=${BASELINE:-transformers} # empty: no baseline job
NEW_TOKENS=${NEW_TOKENS:-32}
REPEAT=${REPEAT:-5}
OUT=${OUT:-data/results/bench.jsonl}
SBATCH_ARGS=${SBATCH_ARGS:-}       # for every job, e.g. "--partition=pi --time=30"
export NEW_TOKENS REPEAT OUT       # reach the jobs through sbatch's --export=ALL (so do MODEL, BENCH_ARGS)

prev=""
submit() {  # submit NAME NTASKS KEY=VALUE...: one bench.sbatch job after the previous one
  local name=$1 n=$2
  shift 2
  local vars
  vars=$(IFS=,; echo "$*")
  # shellcheck disable=SC2086  # SBATCH_ARGS is split into options on purpose
  prev=$(sbatch --parsable --job-name="$name" --ntasks="$n" --export="ALL,$vars" \
         ${prev:+--dependency=afterany:$prev} $SBATCH_ARGS jobs/bench.sbatch)
  prev=${prev%%;*}   # --parsable prints "id" or "id;cluster"
  echo "$prev $name"
}

if [ -n "$BASELINE" ]; then
  submit "tpimpi-bench-$BASELINE" 1 "BASELINE=$BASELINE" "WINDOW="
fi
for n in $RANKS; do
  for w in $WINDOWS; do
    submit "tpimpi-bench-n$n-w$w" "$n" "BASELINE=" "WINDOW=$w"
  done
done
echo "the last job is $prev: wait for it with  scontrol show job $prev  or  squeue -j $prev"
