"""Microbenchmark of the candidate kernels for products with quantized weights, on real model shapes.

    python -m tpimpi.quant.bench [--shapes smollm2-135m,smollm2-1.7b] [--tokens 1,8] [--repeat 30] [--json FILE]

For each matrix of a layer (fused qkv, o, fused gate+up, down; and the output head) and each count of
tokens, the median time of x [T, in] @ W.T by:
  float32-blas        numpy's BLAS on float32 weights, x @ W.T
  float32-blas-wx     numpy's BLAS as W @ x.T (a different OpenBLAS kernel when T > 1)
  float32-torch       torch.mm on float32 weights
  float32-tpimpi      layers.matmul_f32: the one of the three chosen for T (what float32 stores run)
  bfloat16-torch      torch's F.linear, bfloat16 weights and activations (--compute bfloat16, bf16 store)
  q8_0/q4_0/q4_1      tpimpi.quant.kernels' exact kernel: the stored GGUF blocks dequantized a slice at a
                      time into a float32 scratch, then BLAS; weights bit-identical to the gguf package's
  q4_0/q4_1-planar    a candidate exact kernel: a q4 row unpacked as its low nibbles then its high ones,
                      4 bytes at a time into contiguous memory, x permuted to that order once per call
  q4_1-int4pack-bf16  what --compute bfloat16 runs for a resident q4_1 matrix (kernels.int4pack): torch's
                      _weight_int4pack_mm_for_cpu, groups of 32, bfloat16 activations, scales and output
  q8_0-planes-bf16    the same for a q8_0 matrix: two exact 4-bit planes, one call each, added
  q8_0-planes1-bf16   the two planes stacked as one [2 out, in] matrix: one call, the halves added
  q4_0/q8_0-repack    not a product: kernels.int4pack of the stored matrix, what a streamed block would cost
                      to repack for the int4 kernel on every pass (the reason for convert --int4pack)
  int4pack-f32        torch's int4 op with float32 activations, scales and zero points (a reference loop)
  int8pack-bf16       torch's _weight_int8pack_mm: int8 weights with one scale per row (not per group)
Threads: one (as each rank runs with cores / local ranks). The candidates of one matrix and T are timed
in turn, round after round. Prints a Markdown table.

    python -m tpimpi.quant.bench --sweep [--shapes smollm2-135m] [--tokens 1,2,4,8,16] [--threads 1]

instead times float32 products over every layer of the shape (the weights far larger than the caches,
as in decode) for each T: layers.matmul_f32 on [out, in] weights (streamed blocks), the same on weights
held as [in, out] (resident blocks without the compiled kernel, scheduler.transpose_in_place), torch.mm
on [in, out], and the compiled kernel on column panels (resident blocks, tpimpi.native).
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


def _medians_ms(fns: dict, repeat: int, slow: dict) -> dict:
    """name -> median ms of fns[name](), the candidates timed in turn within each round (so a change of
    load or clock speed during the run touches them all alike); slow[name] rounds instead of repeat."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up: first-touch allocation, packing caches
    for i in range(repeat):
        for name, fn in fns.items():
            if i < slow.get(name, repeat):
                t = time.perf_counter()
                own = fn()  # a float: the candidate timed itself (it had setting up to leave out)
                times[name].append(own if isinstance(own, float) else time.perf_counter() - t)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def candidates(n: int, k: int, T: int, rng) -> dict:
    """name -> (function, bytes of weights it reads)."""
    from ..layers import matmul_f32

    w = (rng.standard_normal((n, k), dtype=np.float32) * 0.05).astype(np.float32)
    x = torch.from_numpy(rng.standard_normal((T, k), dtype=np.float32))
    xn, wt, out = x.numpy(), torch.from_numpy(w), {}
    out["float32-blas"] = (lambda: np.matmul(xn, w.T), w.nbytes)
    out["float32-blas-wx"] = (lambda: np.matmul(w, xn.T), w.nbytes)
    out["float32-torch"] = (lambda: torch.mm(x, wt.T), w.nbytes)
    out["float32-tpimpi"] = (lambda: matmul_f32(x, wt), w.nbytes)
    wb, xb = wt.bfloat16(), x.bfloat16()
    out["bfloat16-torch"] = (lambda: torch.nn.functional.linear(xb, wb), wb.numel() * 2)
    packed = {}
    for fmt in qf.QUANTS:
        rec = torch.from_numpy(np.frombuffer(qf.to_bytes(qf.quantize(w, fmt), fmt), np.uint8).reshape(n, -1).copy())
        packed[fmt] = p = kernels.Packed(fmt, rec, (n, k))
        out[fmt] = (lambda p=p: kernels.matmul(x, p), rec.numel())
        if fmt != "q8_0":
            out[f"{fmt}-planar"] = (lambda p=p: kernels.matmul(x, p, planar=True), rec.numel())
    for fmt in ("q4_0", "q8_0"):
        out[f"{fmt}-repack"] = (lambda p=packed[fmt]: kernels.int4pack(p), packed[fmt].data.numel())
    for fmt, name in (("q4_1", "q4_1-int4pack-bf16"), ("q8_0", "q8_0-planes-bf16")):
        p4 = kernels.int4pack(packed[fmt])
        out[name] = (lambda p4=p4: kernels.matmul(x, p4), kernels.int4pack_nbytes(fmt, (n, k)))
    p8, mm = kernels.int4pack(packed["q8_0"]), torch.ops.aten._weight_int4pack_mm_for_cpu
    both = p8.packed.view(2 * n, k // 2), torch.cat(list(p8.scales_zeros), 1).contiguous()  # [2 out, ...]
    out["q8_0-planes1-bf16"] = (lambda: (lambda y: y[:, :n].float().add_(y[:, n:]))(mm(xb, both[0], 32, both[1])),
                                kernels.int4pack_nbytes("q8_0", (n, k)))
    q = torch.randint(0, 16, (n, k), dtype=torch.int32)
    packed4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    sz = torch.rand(k // 32, n, 2)
    out["int4pack-f32"] = (lambda: mm(x, packed4, 32, sz), packed4.numel() + sz.numel() * 4)
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
                    cands = candidates(n, k, T, rng)
                    medians = _medians_ms({name: fn for name, (fn, _) in cands.items()}, repeat,
                                          dict.fromkeys(("int4pack-f32", "q4_0-repack", "q8_0-repack"), slow_repeat))
                    for name, (_, nbytes) in cands.items():
                        ms = medians[name]
                        rows.append({"shape": shape, "matrix": mat, "out": n, "in": k, "tokens": T, "kernel": name,
                                     "ms": round(ms, 4), "weight_GBps": round(nbytes / ms / 1e6, 2)})
                        print(f"{shape:14s} {mat:8s} [{n}x{k}] T={T:<3d} {name:15s} {ms:9.3f} ms", file=sys.stderr)
    return rows


def sweep(shape: str, tokens: list[int], repeat: int, threads: int) -> list[dict]:
    """Float32 products over all layers of shape (qkv, o, gate+up, down; random weights), per T: the
    median ms of one sweep by each layout's kernel, the kernels in turn within each round. Each runs with
    the threads tpimpi gives it: BLAS `threads` for the BLAS layouts; for the compiled kernel (if it builds
    here) `threads` of its own and BLAS one, after a pause that lets BLAS's idle threads stop spinning."""
    from threadpoolctl import threadpool_limits

    from .. import native
    from ..layers import linear, matmul_f32
    from ..scheduler import transpose_in_place
    from ..synth import shape_config

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    mats = [(n, k) for name, n, k in _shapes(shape) if name != "head"]
    ws = [torch.randn(n, k, generator=g) * 0.05 for _ in range(shape_config(shape).n_layers) for n, k in mats]
    wts = [transpose_in_place(w.clone()) for w in ws]  # [out, in] views of [in, out] memory
    panels = [native.pack_in_place(w.clone()) for w in ws] if native.available() else None
    blas = threadpool_limits(threads, user_api="blas")

    def on_panels(xs):
        blas.restore_original_limits()
        threadpool_limits(1, user_api="blas")
        time.sleep(0.3)  # OpenBLAS's threads spin for a while after a call; here they would share the cores
        native.threads = threads
        t = time.perf_counter()
        for x, w in zip(xs, panels):
            linear(x, w)
        dt = time.perf_counter() - t
        threadpool_limits(threads, user_api="blas")
        return dt

    rows = []
    for T in tokens:
        xs = [torch.randn(T, w.shape[1], generator=g) for w in ws[: len(mats)]]
        xs = xs * (len(ws) // len(mats))
        fns = {"float32-[out,in]": lambda: [matmul_f32(x, w) for x, w in zip(xs, ws)],
               "float32-[in,out]": lambda: [matmul_f32(x, w) for x, w in zip(xs, wts)],
               "torch-[in,out]": lambda: [torch.mm(x, w.T) for x, w in zip(xs, wts)]}
        if panels is not None:
            fns["float32-panels"] = lambda: on_panels(xs)
        for name, ms in _medians_ms(fns, repeat, {}).items():
            rows.append({"shape": shape, "matrix": "layers x weights", "out": len(ws) // len(mats),
                         "in": sum(n * k for n, k in mats), "tokens": T, "kernel": name, "ms": round(ms, 2),
                         "threads": threads, "weight_GBps": round(sum(w.numel() * 4 for w in ws) / ms / 1e6, 2)})
            print(f"{shape:14s} T={T:<3d} {name:18s} {ms:9.2f} ms", file=sys.stderr)
    blas.restore_original_limits()
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
    p.add_argument("--sweep", action="store_true", help="float32 products over all layers, per layout")
    p.add_argument("--threads", type=int, default=1, help="threads for --sweep")
    args = p.parse_args(argv)
    tokens = [int(t) for t in args.tokens.split(",")]
    if args.sweep:
        rows = [r for shape in args.shapes.split(",") for r in sweep(shape, tokens, args.repeat, args.threads)]
    else:
        rows = run(args.shapes.split(","), tokens, args.repeat, args.slow_repeat)
    threads = args.threads if args.sweep else 1
    result = {"cpu": _cpu(), "torch": torch.__version__, "numpy": np.__version__, "threads": threads, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(f"CPU: {result['cpu']}; torch {torch.__version__}; {threads} thread(s); median ms per "
          f"{'sweep over all layers' if args.sweep else 'product'}\n")
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
