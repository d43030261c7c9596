#!/usr/bin/env bash
#SBATCH --job-name=tpimpi-paper-scale
#SBATCH --ntasks=1
#SBATCH --output=data/results/plan_paper_scale-%j.out
# Llama-2-70B on 8 devices, on paper: the cost model's predictions from profiles of public device figures
# (data/profiles/*.json, each with its sources), in float32, bfloat16 and 4-bit (q4_0), equal shares and
# the star allreduce as in TPI-LLM; then the planner on a mixed cluster. Writes a Markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILES=${PROFILES:-"tpillm-testbed pi5x8-ethernet pi4x8-ethernet laptopx8-wifi"}
DTYPES=${DTYPES:-"float32 bfloat16 q4_0"}
OUT=${OUT:-data/results/paper_scale.md}
PROMPT_TOKENS=${PROMPT_TOKENS:-16}
WORK=$(mktemp -d /tmp/tpimpi-paper-XXXXXX)
trap 'rm -rf "$WORK"' EXIT
common=(--model llama2-70b --prompt-tokens "$PROMPT_TOKENS" --new-tokens 4 --max-seq-len 1024 --json)
for p in $PROFILES; do
  for d in $DTYPES; do
    python -m tpimpi.plan --profile "data/profiles/$p.json" "${common[@]}" --dtype "$d" --allreduce star \
      --ratios 1,1,1,1,1,1,1,1 > "$WORK/$p.$d.json"
  done
done
python -m tpimpi.plan --profile data/profiles/mixed-laptop-pi5-pi4.json "${common[@]}" --dtype q4_0 \
  > "$WORK/mixed.q4_0.json"
python - "$WORK" "$OUT" <<'PY'
import json, sys
from pathlib import Path
work, out = Path(sys.argv[1]), Path(sys.argv[2])
rows = ["| devices | format | s/token | TTFT s | peak per device (largest) | per token: compute / I/O wait / allreduce (rank 0) | plan |",
        "|---|---|---|---|---|---|---|"]
for f in sorted(work.glob("*.json")):
    p = json.loads(f.read_text())
    prof = json.loads(Path(p["profile"]).read_text())
    r0, peak = p["ranks"][0], max(r["predicted_peak_bytes"] for r in p["ranks"])
    modes = sorted({r["mode"]["kind"] for r in p["ranks"]})
    who = f"{len(p['ranks'])} of {len(prof['devices'])}, ratios {','.join(str(r['ratio']) for r in p['ranks'])}, {'/'.join(modes)}, {p['allreduce']}"
    rows.append(f"| {prof['note']} | {p['dtype']} | {p['predicted']['s_per_token']:.2f} | {p['predicted']['ttft_s']:.1f} | "
                f"{peak / 2**30:.2f} GiB | {r0['compute_s']:.2f} / {r0['io_wait_s']:.2f} / {r0['allreduce_s']:.2f} s | {who} |")
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text("\n".join(rows) + "\n")
print("\n".join(rows))
PY
