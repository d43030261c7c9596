#!/usr/bin/env bash
#SBATCH --job-name=tpimpi-cluster
#SBATCH --ntasks=1
#SBATCH --output=data/results/slurm-%x-%j.out
# The cluster study (README, "Multi-host clusters"), on hosts in network namespaces on this machine
# with real TCP between them and each packet delayed DELAY_MS per hop (NFQUEUE) at RATE_MBPS (tc tbf):
#  1. allreduce of the hidden state (SIZES floats) at RANKS ranks over HOSTS hosts, every algorithm
#     (the true star, the Ibcast star, MPI Allreduce, Reduce+Bcast, ring, tree, auto), REPS calls each
#     in ROUNDS interleaved rounds, the whole AR_RUNS times (each a fresh launch, so a fresh `auto`);
#  2. decode s/token of the default model on GEN_HOSTS hosts with --wire float32, bfloat16 and q8, beside
#     the in-process emulation's prediction of the same (one host, latency and bandwidth slept per message);
#  3. what the wire formats do to the logits (KL, top-1 agreement over an English text);
#  4. staging the default model's STAGE_RANKS-rank store to as many hosts, bytes and time vs the wire.
# PARTS picks which of the four to run (default all). Records go to OUT (one JSON object per line); a
# summary of the targets is printed at the end.
# Needs root, iproute2, iptables and the NetfilterQueue package (jobs/install.sh). Small setting:
#   HOSTS=4 RANKS="2 4" REPS=5 TOKENS=8 QUALITY_TOKENS=16 STAGE_RANKS=4 bash jobs/bench_cluster.sh
# auto against the best, repeated (the allreduce part only, 8 ranks):
#   PARTS=allreduce RANKS=8 REPS=60 ROUNDS=10 AR_RUNS=5 bash jobs/bench_cluster.sh
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
NAME=${NAME:-tpimpi-bench}
SUBNET=${SUBNET:-10.77.203.0/24}
HOSTS=${HOSTS:-8}
RANKS=${RANKS:-"2 4 8"}
SIZES=${SIZES:-576,8192}
REPS=${REPS:-30}
ROUNDS=${ROUNDS:-5}
AR_RUNS=${AR_RUNS:-1}
PARTS=${PARTS:-"allreduce decode quality stage"}
DELAY_MS=${DELAY_MS:-1}
RATE_MBPS=${RATE_MBPS:-300}
GEN_HOSTS=${GEN_HOSTS:-4}
TOKENS=${TOKENS:-32}
WIRES=${WIRES:-"float32 bfloat16 q8"}
QUALITY_TOKENS=${QUALITY_TOKENS:-256}
STAGE_RANKS=${STAGE_RANKS:-$HOSTS}
OUT=${OUT:-data/results/cluster.jsonl}

source jobs/mpi-env.sh
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
cl() { python3 -m tpimpi.cluster --name "$NAME" "$@"; }
part() { [[ " $PARTS " == *" $1 "* ]]; }
trap 'cl down' EXIT
cl up --hosts "$HOSTS" --subnet "$SUBNET" --delay-ms "$DELAY_MS" --rate-mbps "$RATE_MBPS"
disk=/tmp/$NAME/disk
mkdir -p "$(dirname "$OUT")"
out=$(realpath "$OUT")
RUN=$(date -u +%Y%m%dT%H%M%S)
notes=(--note transport=netns-tcp --note "delay_ms=$DELAY_MS" --note "rate_mbps=$RATE_MBPS" --note "run=$RUN")

# 1. allreduce on real packets
part allreduce && for i in $(seq "$AR_RUNS"); do
  for n in $RANKS; do
    cl mpirun -np "$n" python3 -m tpimpi.netbench --sizes "$SIZES" --reps "$REPS" --rounds "$ROUNDS" \
      --algos star,star_bcast,mpi,reduce_bcast,ring,tree,auto "${notes[@]}" --note "repeat=$i" --out "$out"
  done
done

# 2. decode across GEN_HOSTS hosts, and the emulation's prediction on one host
if part decode; then
cl mpirun -np "$GEN_HOSTS" python3 -m tpimpi.stage --to "$disk/n$GEN_HOSTS"
for wire in $WIRES; do
  for where in cluster emulated; do
    args=(python3 -m tpimpi.generate --prompt "What is the capital of France?" --max-new-tokens "$TOKENS"
          --threads 1 --resident --wire "$wire" --json)
    if [ "$where" = cluster ]; then
      res=$(cl mpirun -np "$GEN_HOSTS" "${args[@]}" --model "$disk/n$GEN_HOSTS")
    else
      res=$(mpirun -np "$GEN_HOSTS" "${args[@]}" --link-latency-ms "$DELAY_MS" --link-bandwidth-mbps "$RATE_MBPS")
    fi
    echo "$res" | tail -1 | python3 -c "
import json, sys
r = json.load(sys.stdin)
keep = ('decode_s_per_token', 'ttft_s', 'ranks', 'wire', 'wire_bytes_per_token', 'per_token', 'token_ids', 'threads')
print(json.dumps(dict({k: r[k] for k in keep}, system='cluster_decode', where='$where', hosts=$GEN_HOSTS if '$where' == 'cluster' else 1,
                      delay_ms=$DELAY_MS, rate_mbps=$RATE_MBPS, run='$RUN')))" >> "$out"
  done
done
fi

# 3. the wire formats' effect on the logits (numbers only: one host)
part quality && mpirun -np "$GEN_HOSTS" python3 jobs/cluster/wire_quality.py --tokens "$QUALITY_TOKENS" --out "$out" --run "$RUN"

# 4. staging the STAGE_RANKS-rank store to as many hosts (rank 0 converts it first, in its own cache)
if part stage; then
res=$(cl mpirun -np "$STAGE_RANKS" python3 -m tpimpi.stage --to "$disk/staged-n$STAGE_RANKS" --json)
echo "$res" | tail -1 | python3 -c "
import json, sys
r = json.load(sys.stdin)
r.update(system='cluster_stage', run='$RUN', rate_mbps=$RATE_MBPS, delay_ms=$DELAY_MS, wire_seconds=r['bytes_sent'] * 8 / ($RATE_MBPS * 1e6))
print(json.dumps(r))" >> "$out"
fi

# the targets, from this run's records
python3 - "$out" "$RUN" <<'PY'
import json, sys
rows = [r for r in map(json.loads, open(sys.argv[1])) if r.get("run") == sys.argv[2]]
ar = [r for r in rows if r.get("system") == "allreduce"]
for (i, n, e) in sorted({(int(r.get("repeat", 1)), r["ranks"], r["elems"]) for r in ar}):
    mine = [r for r in ar if (int(r.get("repeat", 1)), r["ranks"], r["elems"]) == (i, n, e)]
    t = {r["algo"]: r["median_s"] for r in mine}
    lat, bw = float(ar[0]["delay_ms"]) / 1e3, float(ar[0]["rate_mbps"]) * 1e6 / 8
    # the star: two hops of latency plus the bytes through the hub's one link, N-1 partials in, then N-1 sums out
    model = 2 * lat + 2 * (n - 1) * 4 * e / bw
    best = min(v for a, v in t.items() if a != "auto")
    # auto's row times its pick a second time (interleaved with the rest); pick/best is the pick's own row
    pick = next(r["auto_pick"] for r in mine if r["algo"] == "auto")
    run = f"run {i}, " if len({r.get("repeat") for r in ar}) > 1 else ""
    print(f"{run}{n} ranks, {e} floats: " + ", ".join(f"{a} {v * 1e3:.2f}" for a, v in t.items()) + " ms; "
          f"star/ring {t['star'] / t['ring']:.2f}, star/model {t['star'] / model:.2f}, auto/best {t['auto'] / best:.2f} "
          f"(picks {pick}: {t[pick] / best:.2f})")
for r in rows:
    if r.get("system") == "cluster_decode":
        print(f"decode {r['where']:>8} wire {r['wire']:>8}: {r['decode_s_per_token'] * 1e3:.1f} ms/token, "
              f"rank 0 sends {r['wire_bytes_per_token']['sent'][0]} B/token")
    if r.get("system") == "cluster_stage":
        print(f"staging: {r['bytes_sent'] / 2**20:.0f} MiB in {r['seconds']:.1f} s ({r['mbps']:.0f} Mbit/s; "
              f"the wire alone: {r['wire_seconds']:.1f} s)")
PY
