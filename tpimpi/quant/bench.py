"""Microbenchmark of the candidate kernels for products with quantized weights, on real model shapes.

    python -m tpimpi.quant.bench [--shapes smollm2-135m,smollm2-1.7b] [--tokens 1,8] [--repeat 30] [--json FILE]

For each matrix of a layer (fused qkv, o, fused gate+up, down; and the output head) and each count of
tokens, the median time of x [T, in] @ W.T by:
  float32-blas        numpy's BLAS on float32 weights (what float32 stores run)
  bfloat16-torch      torch's F.linear, bfloat16 weights and activations (--compute bfloat16)
  q8_0/q4_0/q4_1      tpimpi.quant.kernels: the stored GGUF blocks dequantized a slice at a time into a
                      float32 scratch, then BLAS; results equal the gguf package's dequantized weights
  int4pack-bf16       torch's _weight_int4pack_mm_for_cpu, groups of 32 (what torchao's CPU int4 layout
                      calls): bfloat16 activations, scales, zero points and output
  int4pack-f32        the same op with float32 activations, scales and zero points
  int8pack-bf16       torch's _weight_int8pack_mm: int8 weights with one scale per row (not per group)
Threads: one (as each rank runs with cores / local ranks). Prints a Markdown table; rank 0 alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch

from . import formats as qf
from . import kernels


def _shapes(name: str) -> list[tuple[str, int, int]]:
    from ..synth import shape_config

    c = shape_config(name)
    qkv = (c.n_heads + 2 * c.n_kv_heads) * c.head_dim
    return [("qkv", qkv, c.hidden), ("o", c.hidden, c.n_heads * c.head_dim), ("gate+up", 2 * c.ffn, c.hidden),
            ("down", c.hidden, c.ffn), ("head", c.vocab, c.hidden)]


def _median_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def candidates(n: int, k: int, T: int, rng) -> dict:
    """name -> (function, bytes of weights it reads)."""
    w = (rng.standard_normal((n, k), dtype=np.float32) * 0.05).astype(np.float32)
    x = torch.from_numpy(rng.standard_normal((T, k), dtype=np.float32))
    xn, out = x.numpy(), {}
    out["float32-blas"] = (lambda: np.matmul(xn, w.T), w.nbytes)
    wb, xb = torch.from_numpy(w).bfloat16(), x.bfloat16()
    out["bfloat16-torch"] = (lambda: torch.nn.functional.linear(xb, wb), wb.numel() * 2)
    for fmt in qf.QUANTS:
        rec = torch.from_numpy(np.frombuffer(qf.to_bytes(qf.quantize(w, fmt), fmt), np.uint8).reshape(n, -1).copy())
        p = kernels.Packed(fmt, rec, (n, k))
        out[fmt] = (lambda p=p: kernels.matmul(x, p), rec.numel())
    q = torch.randint(0, 16, (n, k), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    sz = torch.rand(k // 32, n, 2)
    sz_b = sz.bfloat16()
    out["int4pack-bf16"] = (lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, 32, sz_b),
                            packed.numel() + sz_b.numel() * 2)
    out["int4pack-f32"] = (lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz),
                           packed.numel() + sz.numel() * 4)
    w8, s8 = torch.randint(-128, 127, (n, k), dtype=torch.int8), torch.rand(n).bfloat16()
    out["int8pack-bf16"] = (lambda: torch.ops.aten._weight_int8pack_mm(xb, w8, s8), w8.numel() + n * 2)
    return out


def run(shapes: list[str], tokens: list[int], repeat: int, slow_repeat: int) -> list[dict]:
    torch.set_num_threads(1)
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    rows = []
    with threadpool_limits(1, user_api="blas"):
        for shape in shapes:
            for mat, n, k in _shapes(shape):
                for T in tokens:
                    for name, (fn, nbytes) in candidates(n, k, T, rng).items():
                        r = slow_repeat if name == "int4pack-f32" else repeat
                        ms = _median_ms(fn, r)
                        rows.append({"shape": shape, "matrix": mat, "out": n, "in": k, "tokens": T, "kernel": name,
                                     "ms": round(ms, 4), "weight_GBps": round(nbytes / ms / 1e6, 2)})
                        print(f"{shape:14s} {mat:8s} [{n}x{k}] T={T:<3d} {name:15s} {ms:9.3f} ms", file=sys.stderr)
    return rows


def table(rows: list[dict]) -> str:
    kernels_ = list(dict.fromkeys(r["kernel"] for r in rows))
    keys = list(dict.fromkeys((r["shape"], r["matrix"], r["out"], r["in"], r["tokens"]) for r in rows))
    ms = {(r["shape"], r["matrix"], r["out"], r["in"], r["tokens"], r["kernel"]): r["ms"] for r in rows}
    lines = ["| shape | matrix | T | " + " | ".join(kernels_) + " |", "|---" * (3 + len(kernels_)) + "|"]
    for key in keys:
        lines.append(f"| {key[0]} | {key[1]} [{key[2]}x{key[3]}] | {key[4]} | "
                     + " | ".join(f"{ms[(*key, k)]:.3f}" for k in kernels_) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tpimpi.quant.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="smollm2-135m,smollm2-1.7b")
    p.add_argument("--tokens", default="1,8")
    p.add_argument("--repeat", type=int, default=30)
    p.add_argument("--slow-repeat", type=int, default=3, help="repeats of the slow int4pack-f32 reference path")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    rows = run(args.shapes.split(","), [int(t) for t in args.tokens.split(",")], args.repeat, args.slow_repeat)
    result = {"cpu": _cpu(), "torch": torch.__version__, "numpy": np.__version__, "threads": 1, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(f"CPU: {result['cpu']}; torch {torch.__version__}; one thread; median ms per product\n")
    print(table(rows))
    return 0


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith(("model name", "Model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.machine()


if __name__ == "__main__":
    sys.exit(main())
