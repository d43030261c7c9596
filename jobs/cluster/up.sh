#!/usr/bin/env bash
# A cluster of HOSTS hosts in network namespaces on this machine (see tpimpi/cluster/netns.py), links
# shaped as PRESET (none, paper: 1 ms and 300 Mbps, wifi: 5 ms and 80 Mbps). Idempotent.
#   HOSTS=4 PRESET=paper bash jobs/cluster/up.sh
#   bash jobs/cluster/run.sh -np 4 python -m tpimpi.generate --model /tmp/tpimpi-cl/disk/store --prompt Hi
#   bash jobs/cluster/down.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
NAME=${NAME:-tpimpi-cl}
HOSTS=${HOSTS:-4}
PRESET=${PRESET:-paper}
SUBNET=${SUBNET:-10.77.0.0/24}
source jobs/mpi-env.sh
python3 -m tpimpi.cluster --name "$NAME" up --hosts "$HOSTS" --subnet "$SUBNET" --preset "$PRESET"
