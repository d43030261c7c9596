#!/usr/bin/env bash
#SBATCH --job-name=tpimpi-lowmem
#SBATCH --ntasks=2
#SBATCH --output=data/results/slurm-%x-%j.out
# Small devices emulated on one machine (README, "Low-memory devices"): every rank runs in a memory
# cgroup of its own with a hard limit (python -m tpimpi.lowmem; needs root). For the default model
# and a 1.7B-shaped synthetic model whose slices do not fit in the limit: the resident run is ended by
# the OOM killer, and the default plan (a budget from the cgroup's limit) streams and finishes.
# The page cache is dropped before each limited run where we may (root), so the weight files' cache is
# charged to the ranks' cgroups as it would be on the devices. Appends JSON lines to $OUT; the
# outcome of each resident attempt is in the job's log.
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
RANKS=${RANKS:-2}
LIMIT=${LIMIT:-450M}           # per rank, for the default model (its resident plan: 623 and 465 MiB at 512 tokens)
BIG_LIMIT=${BIG_LIMIT:-700M}   # per rank, for the 1.7B shape (its resident plan: 2.2 and 2.0 GB)
NEW_TOKENS=${NEW_TOKENS:-16}
REPEAT=${REPEAT:-3}
MAX_SEQ=${MAX_SEQ:-512}
STORES=${STORES:-data/stores}
OUT=${OUT:-data/results/lowmem.jsonl}

source jobs/mpi-env.sh
drop_cache() { sync; echo 1 2>/dev/null >/proc/sys/vm/drop_caches || echo "(page cache not dropped: not root)"; }
limited() { local limit=$1; shift
  mpirun -np "$RANKS" python3 -m tpimpi.lowmem --limit "$limit" --report -- python3 -m tpimpi.bench \
    --max-seq-len "$MAX_SEQ" --new-tokens "$NEW_TOKENS" --repeat "$REPEAT" --out "$OUT" "$@"; }
attempt_resident() {  # expected to fail: the point is that the slice does not fit
  if limited "$@" --resident --label "resident-under-$1"; then echo "RESULT: resident fit in $1"
  else echo "RESULT: resident run under $1 per rank ended with status $? (does not fit)"; fi; }

# default model: the unlimited reference (also converts the store outside any cgroup), then limited runs
mpirun -np "$RANKS" python3 -m tpimpi.bench --max-seq-len "$MAX_SEQ" --new-tokens "$NEW_TOKENS" --repeat "$REPEAT" \
  --out "$OUT" --resident --label unlimited-resident
python3 -m tpimpi.generate --plan --ranks "$RANKS" --resident --max-seq-len "$MAX_SEQ"
drop_cache; attempt_resident "$LIMIT"
drop_cache; limited "$LIMIT" --label "limit-$LIMIT"

# 1.7B shape in bfloat16
BIG="$STORES/smollm2-1.7b-n$RANKS"
[ -f "$BIG/manifest.json" ] || python3 -m tpimpi.synth --shape smollm2-1.7b --ranks "$RANKS" --dtype bfloat16 --out "$BIG"
python3 -m tpimpi.generate --model "$BIG" --plan --ranks "$RANKS" --resident --max-seq-len "$MAX_SEQ"
drop_cache; attempt_resident "$BIG_LIMIT" --model "$BIG" --compute bfloat16
drop_cache; limited "$BIG_LIMIT" --model "$BIG" --compute bfloat16 --new-tokens 8 --label "1.7b-limit-$BIG_LIMIT"
