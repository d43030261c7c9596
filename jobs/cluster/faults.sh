#!/usr/bin/env bash
# Faults across hosts, timed: during generation on 3 hosts, (1) host 2's link goes down, (2) rank 2 is
# killed. Each must end the job within LIMIT_S with a message naming rank 2 or its host; prints the time.
set -euo pipefail
cd "$(dirname "$0")/../.."
NAME=${NAME:-tpimpi-clfault}
SUBNET=${SUBNET:-10.77.202.0/24}
LIMIT_S=${LIMIT_S:-10}
source jobs/mpi-env.sh
export PYTHONPATH=$PWD
trap 'python3 -m tpimpi.cluster --name $NAME down' EXIT
python3 -m tpimpi.cluster --name "$NAME" up --hosts 3 --subnet "$SUBNET" >/dev/null
disk=/tmp/$NAME/disk
python3 -m tpimpi.synth --shape smollm2-135m --layers 2 --ranks 3 --dtype bfloat16 --out "/tmp/$NAME/hosts/$NAME-h0/syn" --quiet
python3 -m tpimpi.cluster --name "$NAME" mpirun -np 3 python3 -m tpimpi.stage "$disk/syn" --to "$disk/syn" 2>/dev/null
status=0
for fault in link kill; do
  log=$(mktemp)
  python3 -m tpimpi.cluster --name "$NAME" mpirun -np 3 python3 -m tpimpi.generate --model "$disk/syn" --raw \
    --prompt "Hi" --max-new-tokens 100000 --max-seq-len 8192 --threads 1 --json > "$log" 2>&1 &
  job=$!
  sleep "${WARMUP_S:-12}"
  t0=$(date +%s.%N)
  if [ "$fault" = link ]; then
    python3 -m tpimpi.cluster --name "$NAME" link 2 down
  else
    for p in $(ip netns pids "$NAME-h2"); do
      grep -qa tpimpi.generate "/proc/$p/cmdline" 2>/dev/null && kill -9 "$p" && break
    done
  fi
  timeout $((LIMIT_S * 3)) tail --pid=$job -f /dev/null || true
  t1=$(date +%s.%N)
  kill "$job" 2>/dev/null || true
  took=$(python3 -c "print(f'{$t1 - $t0:.1f}')")
  said=$(grep -a -E "tpimpi: error|rank 2 .*on node|lost communication|on node $NAME-h2" "$log" | head -2 | tr '\n' ' ' | cut -c1-300 || true)
  echo "$fault: job ended ${took} s after the fault; said: $said"
  if python3 -c "import sys; sys.exit(0 if $t1 - $t0 <= $LIMIT_S else 1)" && grep -qa -E "rank 2|$NAME-h2" "$log"; then :; else
    status=1
    tail -20 "$log"
  fi
  python3 -m tpimpi.cluster --name "$NAME" link 2 up
  [ -n "${KEEP_LOGS:-}" ] && cp "$log" "/tmp/$NAME-$fault.log"; rm -f "$log"
done
exit $status
