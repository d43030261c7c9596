#!/usr/bin/env bash
#SBATCH --job-name=tpimpi-quant-eval
#SBATCH --ntasks=2
#SBATCH --output=data/results/slurm-%x-%j.out
# Quality of quantized stores (issue 10, deliverables 4-6; README "Perplexity" and "Per-layer bit-widths"),
# side by side in one run on the default model, every figure on the same token ids of tpimpi.eval's
# builtin text:
#  1. perplexity against transformers on the same weights (the slow test of tests/test_eval.py);
#  2. perplexity, KL divergence and top-1 agreement against the float32 store of: the GGUF kept as it is
#     (auto: Q4_1 layers), q8_0, q4_1 and q4_0 rounded to nearest from the float32 weights
#     (target: q8_0 within 1% of float32's perplexity);
#  3. tpimpi.quantize: per-block widths among bfloat16, q8_0, q4_0 at the bytes of the uniform q4_0 store
#     times BUDGET_SLACK (1.1; target: lower perplexity than uniform q4_0); its plan table (widths beside each
#     block's sensitivity) goes to $WORK/plan.txt for BENCHMARKS.md. The default GGUF is itself Q4_1, so
#     its "float" weights are Q4_1's: re-rounding them to q4_1 loses nothing, which is why q4_0 is the
#     4-bit width compared here;
#  4. llama.cpp's perplexity of the same GGUF on the same ids beside tpimpi's (target: close: the same
#     weights), and its decode tokens/s beside tpimpi's (same GGUF, prompt ids, threads, new tokens).
# llama-cpp-python is installed here if missing; the build turns Intel AMX off (a build with AMX
# crashed with a general protection fault in ldtilecfg on a Xeon whose kernel does not grant AMX state).
# Run it on a quiet machine. A small setting (about 15 minutes under load): MAX_TOKENS=64 CTX=64 CAL_TOKENS=8
# NEW_TOKENS=4 REPEAT=1.
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
MAX_TOKENS=${MAX_TOKENS:-4096}    # tokens scored by every evaluation
CTX=${CTX:-512}                   # tokens per window
CAL_TOKENS=${CAL_TOKENS:-256}     # calibration tokens for the sensitivities
BUDGET_SLACK=${BUDGET_SLACK:-1.1} # per-layer budget = uniform q4_0 bytes x this (the target: at most 1.1)
NEW_TOKENS=${NEW_TOKENS:-32}
REPEAT=${REPEAT:-3}
THREADS=${THREADS:-2}
WORK=${WORK:-data/quant-eval}
OUT=${OUT:-data/results/quant_eval.jsonl}
PROMPT=${PROMPT:-"Write a short story about a lighthouse keeper."}

source jobs/mpi-env.sh
mkdir -p "$WORK" "$(dirname "$OUT")"
GGUF=$(python3 -c 'from tpimpi.models import default_model_path as d; print(d())')
if ! python3 -c 'import llama_cpp' 2>/dev/null; then
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" pip install llama-cpp-python==0.3.36
fi

echo "== 1. perplexity against transformers"
python3 -m pytest -q -m slow tests/test_eval.py -k transformers

echo "== 2. uniform formats against float32"
for dt in float32 auto q8_0 q4_1 q4_0; do
  python3 -m tpimpi.convert "$GGUF" --ranks 1 --dtype "$dt" --out "$WORK/smol-$dt" --quiet
done
evaluate() {  # label, store, extra options: one JSON line with the label
  python3 -m tpimpi.eval --model "$2" --reference "$WORK/smol-float32" --max-tokens "$MAX_TOKENS" --ctx "$CTX" \
    --threads "$THREADS" --resident --json "${@:3}" | python3 -c '
import json, sys; r = json.loads(sys.stdin.read()); r["label"] = sys.argv[1]; print(json.dumps(r))
open(sys.argv[2], "a").write(json.dumps(r) + "\n")' "$1" "$OUT"
}
for dt in float32 auto q8_0 q4_1 q4_0; do evaluate "eval-$dt" "$WORK/smol-$dt"; done

echo "== 3. per-block widths at the bytes of uniform q4_0"
BUDGET=$(python3 -c "
import pathlib, sys
n = sum(f.stat().st_size for f in pathlib.Path('$WORK/smol-q4_0').glob('rank*.safetensors'))
print(int(n * $BUDGET_SLACK))")
python3 -m tpimpi.quantize "$GGUF" --budget "$BUDGET" --widths bfloat16,q8_0,q4_0 --calibration-tokens "$CAL_TOKENS" \
  --threads "$THREADS" --out "$WORK/smol-mixed" --quiet | tee "$WORK/plan.txt"
evaluate eval-mixed "$WORK/smol-mixed"

echo "== 4. llama.cpp on the same GGUF (a crash of llama.cpp leaves the figures above)"
evaluate eval-llamacpp "$GGUF" --dtype auto --baseline llama.cpp || echo "llama.cpp's perplexity failed (exit $?)"
python3 -m tpimpi.bench --model "$WORK/smol-auto" --resident --new-tokens "$NEW_TOKENS" --repeat "$REPEAT" \
  --threads "$THREADS" --prompt "$PROMPT" --label quant-eval-tpimpi-auto --out "$OUT"
python3 -m tpimpi.bench --model "$GGUF" --baseline llama.cpp --new-tokens "$NEW_TOKENS" --repeat "$REPEAT" \
  --threads "$THREADS" --prompt "$PROMPT" --label quant-eval-llamacpp --out "$OUT" \
  || echo "llama.cpp's decode failed (exit $?)"
