#!/usr/bin/env bash
# One command on a fresh machine: install, then answer a prompt with the default model split over
# NP ranks (the store for that rank count is prepared on the first run and reused after). The prompt goes
# to standard input, which mpirun forwards to rank 0 alone: it is in no rank's command line.
set -euo pipefail
cd "$(dirname "$0")/.."
NP=${NP:-8}
PROMPT=${PROMPT:-"What is the capital of France? Answer in one sentence."}
export -n PROMPT   # kept out of the ranks' environment

bash jobs/install.sh
source jobs/mpi-env.sh
printf '%s\n' "$PROMPT" | mpirun -np "$NP" python3 -m tpimpi.generate --max-new-tokens 64
