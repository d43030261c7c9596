"""Per-block bit-widths under a size budget (Edge-LLM's layer-wise unified compression), then a store.

    python -m tpimpi.quantize MODEL --budget 80M [--ranks N] [--out DIR] [--widths bf16,q8,q4] [--plan]

1. Sensitivity: on calibration text (the second half of tpimpi.eval's builtin text, so evaluation never
   scores it), an in-process single-rank model runs the float model (the source's weights as float32)
   and, for every block (each layer's attention and MLP, and the embedding with the head) and every
   candidate width, the model with only that block stored in that width. The block's sensitivity is the
   mean KL divergence KL(float || swapped) of the next-token distributions. The hidden state entering a
   block is the float model's, kept from one pass, so a swapped run starts at that block. Results are
   cached per block and width under the cache directory, so an interrupted measurement resumes.
2. Choice: the widths minimizing the summed sensitivity subject to the summed block bytes <= budget,
   an exact dynamic program over blocks (a multiple-choice knapsack) with sizes counted in whole units
   (--unit, 1 KiB by default; a size is rounded up, so the choice always fits the budget).
3. The store: `tpimpi.convert` with the chosen per-block formats (recorded in the manifest's dtype).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from . import layers, store
from .comm import SerialComm
from .errors import TpimpiError, UsageError
from .memory import parse_size
from .model import RankModel
from .quant import formats as qf
from .scheduler import block_views

DEFAULT_WIDTHS = "bfloat16,q8_0,q4_1"
EMBED = "embed"
MAX_CELLS = 1 << 20  # the knapsack's capacity in units at most: coarser units for budgets above 1 GiB  # the embedding (and the head, tied or not) is one more item of the choice


def knapsack(sizes: list[list[int]], costs: list[list[float]], budget: int) -> list[int] | None:
    """The choice j_i for every item i minimizing sum costs[i][j_i] subject to sum sizes[i][j_i] <= budget
    (non-negative integer sizes): exact, by dynamic programming over the used capacity. None if nothing fits."""
    INF = math.inf
    best = np.full(budget + 1, INF)  # best[c]: least cost of the items so far using exactly c units
    best[0] = 0.0
    picks = []
    for sz, co in zip(sizes, costs):
        new, pick = np.full(budget + 1, INF), np.full(budget + 1, -1, dtype=np.int16)
        for j, (s, c) in enumerate(zip(sz, co)):
            if s > budget:
                continue
            cand = np.full(budget + 1, INF)
            cand[s:] = best[: budget + 1 - s] + c
            better = cand < new
            new[better], pick[better] = cand[better], j
        best = new
        picks.append(pick)
    if not np.isfinite(best).any():
        return None
    c = int(np.argmin(best))
    out = []
    for sz, pick in zip(reversed(sizes), reversed(picks)):
        j = int(pick[c])
        out.append(j)
        c -= sz[j]
    return out[::-1]


def item_bytes(cfg, fmt: str, item) -> int:
    """Bytes of one item in fmt in a single-rank store: a block (its padded layout) or the embedding + head."""
    s = store.split_plan(cfg, (1.0,), store.Formats.uniform(fmt, cfg))[0]
    if item == EMBED:
        n = qf.nbytes(fmt, (cfg.vocab, cfg.hidden))
        return n if cfg.tied_embeddings else 2 * n
    return store.block_layout(cfg, s, store.Formats.uniform(fmt, cfg), item).nbytes


def _as_float(a):
    return qf.dequantize(a) if isinstance(a, qf.QTensor) else np.asarray(a, dtype=np.float32)


class _Blocks:
    """The in-process model's blocks: float32 views, with any block replaceable (no reader, no window)."""

    def __init__(self, views: list[dict]):
        self.views = views

    def get(self, b: int) -> dict:
        return self.views[b]

    def release(self, b: int) -> None:
        pass


class Calibrator:
    """A single-rank model of the source in memory, run on calibration ids with one item swapped."""

    def __init__(self, src, ids: list[int]):
        self.src, self.cfg, self.ids = src, src.config, ids
        cfg = self.cfg
        self.slice = store.split_plan(cfg, (1.0,), store.Formats.uniform("q8_0", cfg))[0]  # whole model
        self.raw = [src.layer(i) for i in range(cfg.n_layers)]  # as stored: float32 arrays or QTensors
        self.embed_raw, self.head_raw = src.embed(), src.head()
        self.norm = torch.from_numpy(_as_float(src.final_norm()).copy())  # [h]
        T = len(ids)
        self.model = RankModel(cfg, self.slice, _Blocks([self.block(b, "float32") for b in range(2 * cfg.n_layers)]),
                               SerialComm(), T, chunk=T)
        self.inputs = []  # hidden state entering each block in the float model, [T, h] each
        x = self._embed(self.embed_raw, "float32")
        self.ref = torch.log_softmax(self._run(0, x, self.model.blocks.views, keep=True), -1)  # [T, V]

    def block(self, b: int, fmt: str) -> dict:
        """Block b's float32 (or Packed) views with its matrices in fmt."""
        cfg, i = self.cfg, b // 2
        attn, mlp = store.slice_layer(cfg, self.slice, self.raw[i], (fmt, fmt))
        lay = (store.mlp_layout if b % 2 else store.attn_layout)(cfg, self.slice, fmt)
        buf = np.frombuffer(store.pack_block(lay, mlp if b % 2 else attn), dtype=np.uint8)
        return block_views(buf, lay, "float32")

    def _embed(self, table, fmt: str) -> torch.Tensor:
        rows = qf.as_format(table, fmt)
        rows = qf.dequantize(rows) if isinstance(rows, qf.QTensor) else _round(rows, fmt)
        return torch.from_numpy(np.ascontiguousarray(rows[self.ids]))  # [T, h]

    def _head(self, fmt: str) -> np.ndarray:
        table = self.head_raw if self.head_raw is not None else self.embed_raw
        w = qf.as_format(table, fmt)
        return qf.dequantize(w) if isinstance(w, qf.QTensor) else _round(w, fmt)

    def _run(self, b0: int, x: torch.Tensor, views: list[dict], keep: bool = False, head_fmt="float32"):
        """Blocks b0.. on hidden states x [T, h] (modified), then the final norm and head: logits [T, V]."""
        m, cfg = self.model, self.cfg
        part = m.part  # [T, h]
        for b in range(b0, 2 * cfg.n_layers):
            if keep:
                self.inputs.append(x.clone())
            i = b // 2
            if b % 2 == 0:
                layers.attention(x, views[b], m.cache_k[i, 0], m.cache_v[i, 0], 0, m.cos, m.sin, m.kv_of_q, cfg, part,
                                 m.group, m.windows[i])
            else:
                layers.mlp(x, views[b], cfg, part)
            x += part
        if keep or head_fmt == "float32":
            if not hasattr(self, "head_f32"):
                self.head_f32 = self._head("float32")
            head = self.head_f32
        else:
            head = self._head(head_fmt)
        xn = layers.rms_norm(x, self.norm, cfg.norm_eps)  # [T, h]
        return torch.from_numpy(np.matmul(xn.numpy(), head.T))  # [T, V]

    def sensitivity(self, item, fmt: str) -> float:
        """Mean KL(float || model with only `item` in fmt) over the calibration positions."""
        views = self.model.blocks.views
        if item == EMBED:
            logits = self._run(0, self._embed(self.embed_raw, fmt), views, head_fmt=fmt)
        else:
            swapped = list(views)
            swapped[item] = self.block(item, fmt)
            logits = self._run(item, self.inputs[item].clone(), swapped)
        lp = torch.log_softmax(logits, -1).double()
        ref = self.ref.double()
        return max(0.0, float((ref.exp() * (ref - lp)).sum(-1).mean()))


def _round(a: np.ndarray, fmt: str) -> np.ndarray:
    """A float32 array rounded to a float storage format and back."""
    if fmt == "float32":
        return np.asarray(a, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(getattr(torch, fmt)).float().numpy()


def calibration_ids(src, n: int) -> list[int]:
    from .eval import builtin_text, text_ids
    from .tokenizer import Tokenizer

    with tempfile.TemporaryDirectory(prefix="tpimpi-quantize-") as d:
        for name, text in src.tokenizer_files().items():
            (Path(d) / name).write_text(text)
        tok = Tokenizer.load(d)
    return text_ids(tok, builtin_text("calibration"), n)


def measure(src, widths: list[str], n_tokens: int, cache: Path | None, quiet: bool = False) -> dict:
    """{item: {fmt: sensitivity}} for every block and the embedding, each width; cached in `cache` (JSON)."""
    got = json.loads(cache.read_text()) if cache is not None and cache.is_file() else {}
    items = [*range(2 * src.config.n_layers), EMBED]
    todo = [(it, f) for it in items for f in widths if f"{it}:{f}" not in got]
    if todo:
        t0 = time.perf_counter()
        cal = Calibrator(src, calibration_ids(src, n_tokens))
        for k, (it, f) in enumerate(todo):
            got[f"{it}:{f}"] = cal.sensitivity(it, f)
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_suffix(".tmp")
                tmp.write_text(json.dumps(got))
                tmp.replace(cache)
            if not quiet:
                print(f"sensitivity {k + 1}/{len(todo)}: {_item_name(it)} {f}: {got[f'{it}:{f}']:.3g} "
                      f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    return {it: {f: got[f"{it}:{f}"] for f in widths} for it in items}


def _item_name(item) -> str:
    return "embedding+head" if item == EMBED else store.block_name(item)


def choose(cfg, sens: dict, widths: list[str], budget: int, unit: int = 1024) -> tuple[store.Formats, int]:
    """The per-block formats of least summed sensitivity whose bytes fit budget, and their bytes."""
    items = list(sens)
    unit = max(unit, -(-budget // MAX_CELLS))  # a capacity of at most MAX_CELLS units
    sizes = [[item_bytes(cfg, f, it) for f in widths] for it in items]
    units = [[-(-s // unit) for s in sz] for sz in sizes]
    least = sum(min(sz) for sz in sizes)
    pick = knapsack(units, [[sens[it][f] for f in widths] for it in items], budget // unit)
    if pick is None:
        raise UsageError(f"--budget {budget} B is smaller than the smallest store these widths make: {least} B "
                         f"({least / 2**20:.1f} MiB, every block in {min(widths, key=lambda f: item_bytes(cfg, f, 0))}); "
                         f"give at least that")
    chosen = {it: widths[j] for it, j in zip(items, pick)}
    fmts = store.Formats(tuple(chosen[b] for b in range(2 * cfg.n_layers)), chosen[EMBED], chosen[EMBED])
    return fmts, sum(sz[j] for sz, j in zip(sizes, pick))


def plan_table(cfg, sens: dict, fmts: store.Formats, widths: list[str]) -> str:
    """Per layer: each block's sensitivity to every width and the width chosen."""
    head = f"{'block':<16}" + "".join(f"{'KL ' + w:>14}" for w in widths) + f"{'chosen':>10}"
    lines = [head]
    for it, by in sens.items():
        f = fmts.embed if it == EMBED else fmts.blocks[it]
        lines.append(f"{_item_name(it):<16}" + "".join(f"{by[w]:>14.3g}" for w in widths) + f"{f:>10}")
    return "\n".join(lines)


def cache_file(src, widths: list[str], n_tokens: int) -> Path:
    from .models import cache_root

    key = hashlib.sha256(json.dumps([src.identity(), n_tokens, sys.version_info[:2]]).encode()).hexdigest()[:12]
    return cache_root() / "sensitivity" / f"{key}.json"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tpimpi.quantize", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a .gguf file or a Hugging Face model directory")
    p.add_argument("--budget", required=True, help="most bytes of weights (e.g. 80M, 1.5G): blocks, embedding, head")
    p.add_argument("--ranks", type=int, default=1, help="number of MPI ranks the store is for")
    p.add_argument("--ratios", help="comma-separated relative share of each rank (default equal)")
    p.add_argument("--widths", default=DEFAULT_WIDTHS, help=f"candidate formats per block (default {DEFAULT_WIDTHS})")
    p.add_argument("--calibration-tokens", type=int, default=256, help="tokens of calibration text (default 256)")
    p.add_argument("--unit", type=int, default=1024, help="bytes per unit of the knapsack's capacity (default 1024)")
    p.add_argument("--out", help="output store (default: MODEL's name + .mixed.n<RANKS> beside it)")
    p.add_argument("--plan", action="store_true", help="print the chosen widths beside each block's sensitivity; "
                   "write nothing")
    p.add_argument("--threads", type=int, help="threads for the matrix products (default: every core)")
    p.add_argument("--quiet", action="store_true")
    return p


def run(args) -> dict:
    from .convert import convert
    from .sources import open_source

    budget = parse_size(args.budget, "--budget")
    widths = [qf.canonical(w) for w in args.widths.split(",")]
    bad = [w for w in widths if w not in qf.FORMATS]
    if bad or len(set(widths)) != len(widths):
        raise UsageError(f"--widths {args.widths!r}: give distinct formats among {', '.join(qf.FORMATS)}")
    if args.calibration_tokens < 2 or args.unit < 1 or args.ranks < 1:
        raise UsageError("--calibration-tokens must be at least 2, --unit and --ranks at least 1")
    src = open_source(args.model)
    cfg = src.config
    for w in widths:
        if qf.is_quant(w):
            for what, n in (("the hidden size", cfg.hidden), ("the FFN size", cfg.ffn), ("head_dim", cfg.head_dim)):
                qf.check_divisible(w, what, n)
    least = sum(min(item_bytes(cfg, f, it) for f in widths) for it in [*range(2 * cfg.n_layers), EMBED])
    if budget < least:  # said before the measurement, not after it
        choose(cfg, {it: {f: 0.0 for f in widths} for it in [*range(2 * cfg.n_layers), EMBED]}, widths, budget,
               args.unit)
    sens = measure(src, widths, args.calibration_tokens, cache_file(src, widths, args.calibration_tokens), args.quiet)
    fmts, nbytes = choose(cfg, sens, widths, budget, args.unit)
    res = {"dtype": fmts.spec(), "bytes": nbytes, "budget": budget, "widths": widths,
           "sensitivity": {_item_name(it): by for it, by in sens.items()}, "table": plan_table(cfg, sens, fmts, widths)}
    if not args.plan:
        out = args.out or str(Path(args.model).with_suffix("")) + f".mixed.n{args.ranks}"
        res["store"] = str(convert(src, out, args.ranks, args.ratios, fmts.spec(), args.quiet))
    return res


def main(argv=None) -> int:
    from .resources import set_threads

    args = _parser().parse_args(argv)
    try:
        set_threads(args.threads)
        res = run(args)
    except TpimpiError as e:
        print(f"tpimpi: error: {e}", file=sys.stderr)
        return 2
    print(res["table"])
    print(f"chosen: {res['dtype']}: {res['bytes']} B ({res['bytes'] / 2**20:.1f} MiB) of a budget of "
          f"{res['budget']} B" + (f" -> {res['store']}" if "store" in res else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
