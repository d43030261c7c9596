"""The verdict of jobs/arm64_check.sh: aarch64's tokens, logits and stores against x86_64's.

    python3 jobs/arm64/compare.py X86_DIR ARM_DIR --stores STORES [--tol 1e-4]

Each DIR holds what jobs/arm64/probe.py wrote at each rank count (n1/, n2/, ...): results.json, NAME.npy
and kernels.json. A configuration passes when its greedy tokens are the same on both machines and its
last-position logits agree within the tolerance the x86 tests use against transformers (largest absolute
difference over the largest magnitude; bfloat16 products have their own, BF16_TOL, explained below). ARM_DIR may also hold cli-NAME.json (`tpimpi.generate --json` on
store NAME: its tokens must be the probe's on x86_64) and converted-NAME.manifest.json (a conversion made
on aarch64: every file's sha256 must be that of the x86_64 store STORES/NAME). Prints the kernels each
side ran and one line per check; exits 1 if any check fails or is missing on one side.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TOL = 1e-4  # tests/test_model.py's tolerance against transformers
# With --compute bfloat16 every product's input and output is rounded to bfloat16 (8 significant bits), and
# the two machines' bf16 kernels differ (x86_64: oneDNN on AMX; aarch64: torch's own, a Neoverse N1 having
# no bf16 instructions for oneDNN), so they round differently. On x86_64 alone these logits move by 0.7% from float32 products and by 1% between 1 and
# 2 ranks; aarch64's were 1.2% from x86_64's. The tokens must still be the same.
BF16_TOL = 5e-2


def tolerance(name: str, tol: float = TOL) -> float:
    """The logits tolerance of a configuration: bfloat16 products' own where it has them."""
    return max(tol, BF16_TOL) if name.endswith("-compute-bf16") else tol


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def rel_diff(a: np.ndarray, ref: np.ndarray) -> float:
    """Largest absolute difference relative to the reference's largest magnitude (as tests/harness.rel_err)."""
    if a.shape != ref.shape:
        return float("inf")
    return float(np.abs(a.astype(np.float64) - ref).max() / np.abs(ref).max())


def compare_runs(x86: dict, arm: dict, x86_logits: dict, arm_logits: dict, tol: float = TOL) -> list[Check]:
    """One check per configuration either side ran: results map NAME -> {"token_ids": [...]}, logits NAME -> array."""
    checks = []
    for name in sorted(set(x86) | set(arm)):
        missing = [side for side, res, lg in (("x86_64", x86, x86_logits), ("aarch64", arm, arm_logits))
                   if name not in res or name not in lg]
        if missing:
            checks.append(Check(name, False, f"missing on {' and '.join(missing)}"))
            continue
        a, b = x86[name]["token_ids"], arm[name]["token_ids"]
        d, t = rel_diff(arm_logits[name], x86_logits[name]), tolerance(name, tol)
        detail = f"tokens {'same' if a == b else 'DIFFER'}; logits differ by {d:.2e} (tolerance {t:.0e})"
        if a != b:
            detail += f"; x86_64 {a}, aarch64 {b}"
        checks.append(Check(name, a == b and d <= t, detail))
    return checks


def compare_cli(name: str, tokens: list[int], x86: dict) -> Check:
    """The command line's tokens on aarch64 against the probe's on x86_64 for the same store."""
    if name not in x86:
        return Check(f"cli {name}", False, "missing on x86_64")
    same = tokens == x86[name]["token_ids"]
    return Check(f"cli {name}", same, "tokens same" if same else f"x86_64 {x86[name]['token_ids']}, aarch64 {tokens}")


def compare_stores(name: str, converted: dict, reference: dict) -> Check:
    """A store converted on aarch64 against the same conversion on x86_64: byte for byte, by sha256."""
    ours = {f["name"]: f["sha256"] for f in converted["files"]}
    theirs = {f["name"]: f["sha256"] for f in reference["files"]}
    differ = sorted(n for n in ours.keys() | theirs.keys() if ours.get(n) != theirs.get(n))
    return Check(f"convert {name}", not differ,
                 f"files differ: {', '.join(differ)}" if differ else f"{len(ours)} weight files identical")


def read_json(path: Path):
    """The file's JSON, or None when a failed step left it empty or cut short."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def load_side(folder: Path) -> tuple[dict, dict, dict]:
    """(results, logits, kernels by rank count) from every nN/ subfolder of one side."""
    results, logits, kernels = {}, {}, {}
    for sub in sorted(folder.glob("n*")):
        if (sub / "results.json").is_file():
            results.update(json.loads((sub / "results.json").read_text()))
        if (sub / "kernels.json").is_file():
            kernels[sub.name] = json.loads((sub / "kernels.json").read_text())
        for f in sub.glob("*.npy"):
            logits[f.stem] = np.load(f, allow_pickle=False)
    return results, logits, kernels


def describe_kernels(k: dict) -> str:
    blas = ", ".join(f"{b['internal_api']} {b['version']} ({b['architecture']} kernels, {b['threading_layer']})"
                     for b in k.get("numpy_blas", []))
    return (f"{k['machine']}: numpy {k['numpy']} with {blas or 'no BLAS found'}; torch {k['torch']} (CPU "
            f"capability {k['torch_cpu_capability']}, CUDA {k['torch_cuda_built'] or 'not built'}); "
            f"mpi4py {k['mpi4py']}, {k['mpi']}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("x86", type=Path)
    p.add_argument("arm", type=Path)
    p.add_argument("--stores", type=Path, required=True, help="the stores both sides ran")
    p.add_argument("--tol", type=float, default=TOL)
    args = p.parse_args()

    x86, x86_logits, x86_k = load_side(args.x86)
    arm, arm_logits, arm_k = load_side(args.arm)
    for side, kernels in (("x86_64 ", x86_k), ("aarch64", arm_k)):
        for n, k in kernels.items():
            print(f"kernels {side} {n}: {describe_kernels(k)}")
    checks = compare_runs(x86, arm, x86_logits, arm_logits, args.tol)
    for f in sorted(args.arm.glob("cli-*.json")):
        name, got = f.stem[len("cli-") :], read_json(f)
        checks.append(compare_cli(name, got["token_ids"], x86) if got else Check(f"cli {name}", False, "no output"))
    for f in sorted(args.arm.glob("converted-*.manifest.json")):
        name, got = f.name[len("converted-") : -len(".manifest.json")], read_json(f)
        ref = read_json(args.stores / name / "manifest.json")
        checks.append(compare_stores(name, got, ref) if got and ref else Check(f"convert {name}", False, "no manifest"))
    machines = sorted({k["machine"] for k in arm_k.values()})
    checks.append(Check("emulated machine", machines == ["aarch64"], f"reported {', '.join(machines) or 'nothing'}"))
    for c in checks:
        print(f"{'PASS' if c.ok else 'FAIL'} {c.name:28s} {c.detail}")
    failed = [c.name for c in checks if not c.ok]
    if failed:
        print(f"failed: {', '.join(failed)}")
    print(f"arm64: {len(checks) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
