#!/usr/bin/env bash
#SBATCH --job-name=tpimpi-allreduce
#SBATCH --ntasks=8
#SBATCH --output=data/results/slurm-%x-%j.out
# The allreduce study (README, "Allreduce"): star, MPI Allreduce, Reduce+Bcast, ring and binomial tree
# at hidden-state sizes, on this machine's own transport and on an emulated edge link (latency and
# bandwidth injected per message; the TPI-LLM paper's testbed had 1 ms and 300 Mbps).
# Launch: mpirun inside the allocation.
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
RANKS=${RANKS:-"2 4 8"}
LATENCIES_MS=${LATENCIES_MS:-"0 1"}
BANDWIDTH_MBPS=${BANDWIDTH_MBPS:-300}
SIZES=${SIZES:-576,1024,2048,4096,8192}
OUT=${OUT:-data/results/allreduce.jsonl}

source jobs/mpi-env.sh
for n in $RANKS; do
  for lat in $LATENCIES_MS; do
    bw=$([ "$lat" = 0 ] && echo 0 || echo "$BANDWIDTH_MBPS")
    mpirun -np "$n" python3 -m tpimpi.netbench --sizes "$SIZES" --link-latency-ms "$lat" --link-bandwidth-mbps "$bw" \
      --reps 20 --out "$OUT"
  done
done
