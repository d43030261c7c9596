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
# The rest on two pytest workers (pytest-xdist), a test file to a worker (its module fixtures, the model
# conversions of its session cache, made once). One pytest process kept two cores busy for 1.14 of them
# on average (most tests wait on a child process: mpirun, a conversion, a server); on two workers these
# tests took 10.3 minutes instead of 15 on an AMD EPYC with AVX2, the whole script 12.7 instead of about
# 17. TEST_WORKERS=0 runs them in this process, one by one. (-p no:benchmark: a pytest-benchmark that
# some Pythons come with warns on every worker that xdist disables it; no test here uses it.)
echo "== tests on ${TEST_WORKERS:-2} workers"
python3 -m pytest -q -p no:cacheprovider -p no:benchmark -n "${TEST_WORKERS:-2}" --dist loadfile -m "not alone" --durations=20 \
  tests/ "$@" || status=1
# Tests that compare two stretches of time (marked alone), with no other test beside them. Exit 5: the
# arguments given selected none of them.
echo "== tests that run alone"
python3 -m pytest -q -p no:cacheprovider -m alone tests/ "$@" || { rc=$?; [ $rc = 5 ] || status=1; }
exit $status
