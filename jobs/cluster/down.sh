#!/usr/bin/env bash
# Remove the cluster NAME and everything it made (namespaces, processes in them, /tmp/NAME). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/../.."
source jobs/mpi-env.sh
python3 -m tpimpi.cluster --name "${NAME:-tpimpi-cl}" down
