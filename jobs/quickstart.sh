#!/usr/bin/env bash
# One command on a fresh machine: install, then answer a prompt with the default model split over
# NP ranks (the store for that rank count is prepared on the first run and reused after).
set -euo pipefail
cd "$(dirname "$0")/.."
NP=${NP:-8}
PROMPT=${PROMPT:-"What is the capital of France? Answer in one sentence."}

bash jobs/install.sh
source jobs/mpi-env.sh
mpirun -np "$NP" python3 -m tpimpi.generate --prompt "$PROMPT" --max-new-tokens 64
