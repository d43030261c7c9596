#!/usr/bin/env bash
# mpirun across the cluster NAME: its hostfile, its agent in place of ssh, MPI over TCP on its subnet.
# Everything after the script name goes to mpirun, e.g. -np 4 python -m tpimpi.stage --to /tmp/tpimpi-cl/disk/store
set -euo pipefail
cd "$(dirname "$0")/../.."
source jobs/mpi-env.sh
exec python3 -m tpimpi.cluster --name "${NAME:-tpimpi-cl}" mpirun "$@"
