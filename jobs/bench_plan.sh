#!/usr/bin/env bash
#SBATCH --job-name=tpimpi-plan
#SBATCH --ntasks=4
#SBATCH --output=data/results/bench_plan-%j.out
# The planner checked against runs (issue 13), on one machine standing in for unequal devices: each rank
# in a CPU cgroup with its own quota (tpimpi.cpulimit), optionally a memory limit (tpimpi.lowmem) and an
# emulated link (--link-latency-ms). For every cluster: profile it under that emulation, plan (searched,
# with equal shares, or with given modes), run tpimpi.bench with the plan file under the same emulation
# (the plan's prediction is recorded beside the measurement), then tabulate predicted against measured.
# Needs root (cgroups). SMALL=1: two clusters, few tokens (a check that the job runs, not figures).
# ONLY="third veryslow equal2 slow2": those clusters only (eight configurations). Names: third veryslow
# equal2 slow2 link2 window3 lowmem4 (all seven, 14 configurations, by default).
set -euo pipefail
cd "$(dirname "$0")/.."
source jobs/mpi-env.sh

MODEL=${MODEL:-}                      # default: the default model
NEW_TOKENS=${NEW_TOKENS:-16}
REPEAT=${REPEAT:-3}
PROMPT_TOKENS=${PROMPT_TOKENS:-41}    # what bench's default prompt encodes to with the default model's template
OUT=${OUT:-data/results/plan.jsonl}
REPORT=${REPORT:-data/results/report-plan}  # where tpimpi.report's table and plots of OUT go
SMALL=${SMALL:-0}
WORK=$(mktemp -d /tmp/tpimpi-bench-plan-XXXXXX)
trap 'rm -rf "$WORK"' EXIT
model_arg=(); [ -n "$MODEL" ] && model_arg=(--model "$MODEL")
[ "$SMALL" = 1 ] && { NEW_TOKENS=4; REPEAT=1; }

# name | cores per rank | memory limit per rank (or -) | link latency ms
CLUSTERS=(
  "third|0.6,0.6,0.2|-|0"
  "veryslow|0.6,0.6,0.03|-|0"
  "equal2|0.9,0.9|-|0"
  "slow2|0.9,0.3|-|0"
  "link2|0.9,0.9|-|2"
  "window3|0.6,0.6,0.6|-|0"
  "lowmem4|0.45,0.45,0.45,0.45|450M|0"
)
[ "$SMALL" = 1 ] && CLUSTERS=("${CLUSTERS[@]:0:2}")
if [ -n "${ONLY:-}" ]; then  # ONLY="third veryslow": just those clusters, by name
  keep=(); for c in "${CLUSTERS[@]}"; do [[ " $ONLY " == *" ${c%%|*} "* ]] && keep+=("$c"); done; CLUSTERS=("${keep[@]}")
fi

launch() {  # launch CORES MEM LINK NP -- COMMAND...: NP ranks under the cluster's emulation
  local cores=$1 mem=$2 np=$4; shift 5
  local wrap=(python -m tpimpi.cpulimit --cpu "$cores" --)
  [ "$mem" != - ] && wrap+=(python -m tpimpi.lowmem --limit "$mem" --)
  mpirun -np "$np" "${wrap[@]}" "$@"
}

pick() {  # the cores of the devices a plan file runs on, in rank order
  python -c 'import json,sys; p=json.load(open(sys.argv[1])); c=sys.argv[2].split(","); print(",".join(c[r["device"]] for r in p["ranks"]))' "$1" "$2"
}

convert_first() {  # convert_first PLAN: the store the plan runs on, converted outside any memory limit (a
  # conversion holds a whole tensor: under tpimpi.lowmem's limit the OOM killer would end it); the same
  # ratios and dtype as bench derives from the plan file, so bench then finds it in the cache
  python - "$1" "$MODEL" <<'PY'
import json, sys
from tpimpi.models import prepare
from tpimpi.shard import parse_ratios
plan, model = json.load(open(sys.argv[1])), sys.argv[2] or None
ratios = [r["ratio"] for r in plan["ranks"]]
n = len(ratios)
given = None if len(set(ratios)) == 1 else parse_ratios(",".join(repr(float(r)) for r in ratios), n)
prepare(model, n, given, plan["dtype"], quiet=True)
PY
}

run_plan() {  # run_plan CLUSTER-SPEC LABEL PLAN-ARGS...
  IFS='|' read -r name cores mem link <<< "$1"; local label=$2; shift 2
  local plan=$WORK/$label.json
  python -m tpimpi.plan --profile "$WORK/$name.profile.json" "${model_arg[@]}" --prompt-tokens "$PROMPT_TOKENS" \
    --new-tokens "$NEW_TOKENS" --out "$plan" "$@"
  local used np
  used=$(pick "$plan" "$cores"); np=$(python -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["ranks"]))' "$plan")
  [ "$mem" != - ] && convert_first "$plan"
  launch "$used" "$mem" "$link" "$np" -- python -m tpimpi.bench "${model_arg[@]}" --plan-file "$plan" \
    --link-latency-ms "$link" --new-tokens "$NEW_TOKENS" --repeat "$REPEAT" --label "plan-$label" --out "$OUT"
}

for spec in "${CLUSTERS[@]}"; do
  IFS='|' read -r name cores mem link <<< "$spec"
  n=$(awk -F, '{print NF}' <<< "$cores")
  t0=$(date +%s.%N)
  launch "$cores" "$mem" "$link" "$n" -- python -m tpimpi.profile "${model_arg[@]}" --link-latency-ms "$link" \
    --out "$WORK/$name.profile.json"
  echo "== $name: profiled in $(python -c "import sys,time; print(round(time.time()-float(sys.argv[1]),1))" "$t0") s"
  equal=$(python -c "print(','.join(['1'] * $n))")
  case $name in
    third)    run_plan "$spec" third-planned; run_plan "$spec" third-equal --ratios "$equal" ;;
    veryslow) run_plan "$spec" veryslow-planned; run_plan "$spec" veryslow-included --devices "$(seq -s, 0 $((n - 1)))" ;;
    window3)  run_plan "$spec" window3-equal --ratios "$equal" --modes resident,window:2,window:2
              run_plan "$spec" window3-w1 --ratios "$equal" --modes window:1,window:1,window:1 ;;
    *)        run_plan "$spec" "$name-planned"; run_plan "$spec" "$name-equal" --ratios "$equal" ;;
  esac
done
python -m tpimpi.report "$OUT" --out "$REPORT"
