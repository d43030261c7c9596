#!/usr/bin/env bash
# The test command: plain pytest for everything serial, then the MPI tests under mpirun at several
# rank counts (each rank runs pytest; rank 0's report is shown, the others' only if they fail).
set -euo pipefail
cd "$(dirname "$0")/.."
source jobs/mpi-env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
# what test_mpi.py makes once for every rank count (the tiny model and transformers' reference on it)
export TPIMPI_TEST_SHARED="$logs/shared"
mkdir "$TPIMPI_TEST_SHARED"

# Only the files that hold MPI tests are collected under mpirun: every rank collects what it is given, and
# importing the whole suite on each of 8 ranks sharing two cores took most of a minute by itself.
mpi_files=$(grep -l 'mark\.mpi' tests/test_*.py)
status=0
for n in ${MPI_SIZES:-2 3 4 8}; do
  echo "== MPI tests at $n ranks"
  if ! mpirun -np "$n" bash -c 'if [ "$OMPI_COMM_WORLD_RANK" = 0 ]; then exec "$@"; else exec "$@" > "'"$logs"'/rank$OMPI_COMM_WORLD_RANK.log" 2>&1; fi' _ \
       python3 -m pytest -q -p no:cacheprovider --with-mpi -m mpi $mpi_files; then
    status=1
    for f in "$logs"/rank*.log; do [ -f "$f" ] && { echo "--- $f"; tail -30 "$f"; }; done
  fi
done
echo "== serial tests"
# the slowest tests are listed at the end: where the suite's time goes differs by CPU (27 min serial on an AMD
# EPYC with AVX2, 10 on an Intel Xeon with AVX-512)
python3 -m pytest -q -p no:cacheprovider --durations=20 tests/ "$@" || status=1
exit $status
