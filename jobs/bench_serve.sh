#!/usr/bin/env bash
#SBATCH --job-name=tpimpi-bench-serve
#SBATCH --ntasks=2
#SBATCH --output=data/results/slurm-%x-%j.out
# Continuous batching under load: for each rank count, start `tpimpi.serve` on loopback and drive it with
# 1, 2, 4, 8, 16 concurrent streaming clients (tpimpi.serve.bench), then again with the latency target
# --max-token-latency-ms set to TARGET_FACTOR x the single-client per-token latency just measured.
# Appends one JSON line per point to $OUT; `python -m tpimpi.report` tables and plots them. Every server
# writes its step log and every load its clients' arrival times under $LOGS; after each target run
# `tpimpi.serve.tail` prints where the slow gaps came from (prompt rows, delivery, slow steps).
#   bash jobs/bench_serve.sh                                   # the full sweep (the lead's quiet machine)
#   DTYPE=bfloat16 bash jobs/bench_serve.sh                    # a bfloat16 store, --compute bfloat16
#   RANKS=1 CONCURRENCY="1 2" REQUESTS=1 MAX_TOKENS=8 bash jobs/bench_serve.sh   # a quick end-to-end check
set -euo pipefail
[ -n "${SLURM_JOB_ID:-}" ] || cd "$(dirname "$0")/.."
[ -f jobs/mpi-env.sh ] || { echo "run from the tpimpi checkout's root" >&2; exit 2; }

RANKS=${RANKS:-"1 2"}
CONCURRENCY=${CONCURRENCY:-"1 2 4 8 16"}
TARGET_CONCURRENCY=${TARGET_CONCURRENCY:-"8 16"}   # points re-run under the latency target
TARGET_FACTOR=${TARGET_FACTOR:-1.5}
REQUESTS=${REQUESTS:-4}          # per client: clients x this many, from one shared list
MAX_TOKENS=${MAX_TOKENS:-64}
MAX_BATCH=${MAX_BATCH:-16}
MODEL=${MODEL:-}                 # empty: the default model
PORT=${PORT:-18917}
OUT=${OUT:-data/results/serve.jsonl}
SERVE_ARGS=${SERVE_ARGS:-"--resident"}
DTYPE=${DTYPE:-}                 # bfloat16: convert the model to a bfloat16 store and compute in bfloat16
PYTHON=${PYTHON:-python3}
LOGS=${LOGS:-data/results/serve-logs/$(date -u +%Y%m%dT%H%M%S)}
if [ -n "$DTYPE" ]; then
  SERVE_ARGS="$SERVE_ARGS --dtype $DTYPE --compute $DTYPE"
fi

source jobs/mpi-env.sh
work=$(mktemp -d)
server=""
stop_server() {   # SIGTERM to rank 0 drains the server and every rank exits
  if [ -n "$server" ] && kill -0 "$server" 2>/dev/null; then
    kill -TERM "$(cat "$work/pid")" 2>/dev/null || kill -TERM "$server"
    wait "$server" || true
  fi
  server=""
}
trap 'stop_server; rm -rf "$work"' EXIT

start_server() {  # ranks, step log name, extra options
  local n=$1 log=$2; shift 2
  rm -f "$work/pid"
  # the model's name says its store format
  # (and its --threads, if given), so that the report keeps float32, bfloat16 and one-thread runs apart
  threads=$(sed -n 's/.*--threads[ =]\([0-9][0-9]*\).*/\1/p' <<< "$SERVE_ARGS")
  name=$("$PYTHON" -c 'import sys; from pathlib import Path; from tpimpi.models import default_model_path
print(Path(sys.argv[1] or default_model_path()).name.removesuffix(".gguf") + (sys.argv[2] and "-" + sys.argv[2])
      + (sys.argv[3] and "-threads" + sys.argv[3]))' "$MODEL" "$DTYPE" "$threads")
  # shellcheck disable=SC2086  # SERVE_ARGS is split into options on purpose
  mpirun -np "$n" "$PYTHON" -m tpimpi.serve ${MODEL:+--model "$MODEL"} --port "$PORT" --pid-file "$work/pid" \
    --max-batch "$MAX_BATCH" --max-queue 64 --served-model-name "$name" --step-log "$LOGS/$log.steps.jsonl" \
    $SERVE_ARGS "$@" 2> "$work/server.log" &
  server=$!
  for _ in $(seq 600); do
    if grep -q "tpimpi: serving" "$work/server.log"; then return 0; fi
    kill -0 "$server" 2>/dev/null || { cat "$work/server.log" >&2; exit 1; }
    sleep 0.5
  done
  echo "the server did not start in 300 s" >&2; cat "$work/server.log" >&2; exit 1
}

load() {  # ranks, concurrency, label, raw file name, target
  "$PYTHON" -m tpimpi.serve.bench --url "http://127.0.0.1:$PORT" --ranks "$1" --concurrency "$2" --label "$3" \
    ${5:+--max-token-latency-ms "$5"} --requests "$REQUESTS" --max-tokens "$MAX_TOKENS" --out "$OUT" \
    --raw "$LOGS/$4.raw.jsonl"
}

mkdir -p "$LOGS"
for n in $RANKS; do
  start_server "$n" "np$n-batch"
  for c in $CONCURRENCY; do
    load "$n" "$c" batch "np$n-batch"
  done
  stop_server
  # the single-client per-token latency this run measured sets the target
  single=$(N="$n" F="$TARGET_FACTOR" "$PYTHON" -c '
import json, os, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
one = [r for r in rows if r.get("system") == "serve" and r["ranks"] == int(os.environ["N"])
       and r["concurrency"] == 1 and r["label"] == "batch"]
print(round(one[-1]["token_p50_s"] * 1e3 * float(os.environ["F"]), 1) if one else "")' "$OUT")
  if [ -n "$single" ]; then
    start_server "$n" "np$n-target" --max-token-latency-ms "$single"
    for c in $TARGET_CONCURRENCY; do
      load "$n" "$c" "target-${TARGET_FACTOR}x" "np$n-target" "$single"
    done
    stop_server
    for c in $TARGET_CONCURRENCY; do
      echo "== $n ranks, $c clients, target $single ms: where the slow gaps came from"
      "$PYTHON" -m tpimpi.serve.tail --steps "$LOGS/np$n-target.steps.jsonl" --raw "$LOGS/np$n-target.raw.jsonl" \
        --concurrency "$c" --over-ms "$single"
    done
  fi
done
echo "results: $OUT (python -m tpimpi.report $OUT); step logs and arrival times: $LOGS"
