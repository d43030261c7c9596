#!/usr/bin/env bash
#SBATCH --job-name=tpimpi-kernels
#SBATCH --ntasks=1
#SBATCH --output=data/results/slurm-%x-%j.out
# The kernel candidates for quantized blocks (README, "Storage formats"; BENCHMARKS.md, "Kernels for
# quantized blocks"): one thread, median ms of x [T, in] @ W.T for every matrix of the default model's
# layer and of a 1.7B shape (hidden 2048, FFN 8192), T = 1 and 8. Run it on a quiet machine: the figures
# are the table in BENCHMARKS.md. A small setting: SHAPES=smollm2-135m TOKENS=1 REPEAT=5.
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
SHAPES=${SHAPES:-smollm2-135m,smollm2-1.7b}
TOKENS=${TOKENS:-1,8}
REPEAT=${REPEAT:-30}
OUT=${OUT:-data/results/kernels.json}

mkdir -p "$(dirname "$OUT")"
python3 -m tpimpi.quant.bench --shapes "$SHAPES" --tokens "$TOKENS" --repeat "$REPEAT" --json "$OUT" \
  | tee "${OUT%.json}.md"
