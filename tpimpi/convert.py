"""Convert a GGUF file or Hugging Face directory into a store split for N ranks.

    python -m tpimpi.convert MODEL --ranks N [--ratios 2,1,1] [--dtype auto|q4|q8|float32|...] [--out DIR]

Tensors are read one layer at a time and each rank's slices are appended to that rank's file, so the
model is never held twice. Everything is written under a temporary directory and renamed into place
only after the manifest (sizes and sha256 of every file) is complete: an interrupted conversion never
leaves something that looks like a store, and what a killed one leaves beside the output (.OUT.tmp-PID)
is removed by the next conversion of the same output. Each rank file is then stamped as verified (see
store.py), so a run does not hash what the converter has just hashed.

--dtype names the storage format of every block (tpimpi/quant/formats.py): float32, bfloat16, float16,
q8_0 (q8), q4_1 (q4) or q4_0; quantized formats round to nearest. "auto" keeps each tensor's own type:
a GGUF's Q8_0, Q4_0 and Q4_1 blocks byte for byte, its float tensors as they are, and other GGUF types
re-quantized to the nearest stored format; the converter says which, per tensor type.

--int4pack stores the q4_0, q4_1 and q8_0 blocks repacked for torch's int4 kernel (what --compute bfloat16
multiplies them with), so that a block streamed from disk is multiplied as read instead of by the exact
kernel, which is slower than a disk delivers (README, "Storage formats"). The weights are then the
GGUF's integers with bfloat16 scales, the store runs only with --compute bfloat16, and only on a CPU
whose torch lays int4 tiles out the same way (the manifest records it; a run elsewhere is refused).
The embedding and a separate head stay in their GGUF format.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

from . import store
from .errors import TpimpiError, UsageError
from .quant import formats as qf
from .shard import parse_ratios
from .sources import open_source


class _RankFileWriter:
    """Writes one rank file sequentially, hashing as it goes."""

    def __init__(self, path: Path, entries, metadata: dict[str, str]):
        self.path, self.entries, self.next = path, entries, 0
        self.f = open(path, "wb")
        self.h = hashlib.sha256()
        self._put(store.encode_header(entries, metadata))

    def _put(self, data) -> None:
        self.f.write(data)
        self.h.update(data)

    def write(self, name: str, data) -> None:
        want, _, _, nbytes = self.entries[self.next]
        if name != want or len(data) != nbytes:
            raise AssertionError(f"wrote {name} ({len(data)} B), expected {want} ({nbytes} B)")
        self._put(data)
        self.next += 1

    def close(self) -> dict:
        assert self.next == len(self.entries), "rank file incomplete"
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        return {"name": self.path.name, "bytes": self.path.stat().st_size, "sha256": self.h.hexdigest()}


def _progress(msg: str, quiet: bool) -> None:
    if not quiet:
        end = "\r" if sys.stderr.isatty() else "\n"
        print(msg, end=end, file=sys.stderr, flush=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # another user's process, or not a pid at all: leave its files alone
        pass
    return True


def remove_leftovers(out: Path) -> list[Path]:
    """Delete the temporary directories that killed conversions of `out` left beside it
    (.OUT.tmp-PID and .OUT.old-PID whose PID is no longer running); return what was deleted."""
    gone = []
    for p in out.parent.glob(f".{glob.escape(out.name)}.*-*"):
        kind, _, pid = p.name[len(out.name) + 2 :].rpartition("-")
        if kind in ("tmp", "old") and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p)
    return gone


ATTN_KEYS, MLP_KEYS = ("q", "k", "v", "o"), ("gate", "up", "down")


def resolve_formats(src, request: str) -> tuple[store.Formats, list[str]]:
    """The format of every block, the embedding and the head for a --dtype request, and what happens to
    each stored tensor type ("Q4_1 -> q4_1 kept as is: 210 tensors", ...)."""
    cfg = src.config
    if "=" in request:  # a per-block spec, as tpimpi.quantize chooses: blocks=q8_0*2,q4_1*58;embed=q8_0
        try:
            fmts = store.Formats.parse(request, cfg)
        except TpimpiError as e:
            raise UsageError(str(e)) from None
        _check_shapes(cfg, fmts)
        return fmts, [f"per-block formats: {fmts.spec()}"]
    fmt = qf.canonical(request)
    if fmt != "auto" and fmt not in qf.FORMATS:
        raise UsageError(f"--dtype {request!r} is not one of {', '.join(qf.REQUESTS)}")
    counts: dict[tuple[str, str, bool], int] = {}

    def pick(key, layer=None) -> str:
        if not hasattr(src, "tensor_type"):  # a source of float32 tensors (synthetic)
            return fmt if fmt != "auto" else "float32"
        name, kind = src.tensor_type(key, layer)
        got, kept = qf.auto_format(kind, name, str(getattr(src, "path", "")))
        if fmt != "auto":
            got, kept = fmt, qf.KEPT.get(kind) == fmt
        counts[(kind, got, kept)] = counts.get((kind, got, kept), 0) + 1
        return got

    blocks = []
    for i in range(cfg.n_layers):
        blocks.append(qf.widest([pick(k, i) for k in ATTN_KEYS]))
        blocks.append(qf.widest([pick(k, i) for k in MLP_KEYS]))
    embed = pick("embed")
    head = embed if cfg.tied_embeddings else pick("head")
    fmts = store.Formats(tuple(blocks), embed, head)
    _check_shapes(cfg, fmts)
    report = [f"{kind} -> {got} {'kept as is' if kept else 're-quantized' if qf.is_quant(got) else 'converted'}: "
              f"{n} tensors" for (kind, got, kept), n in sorted(counts.items())]
    mixed = [f for f in set(blocks) if blocks.count(f) < len(blocks)]
    if mixed:  # a block's q/k/v/o (or gate/up/down) differ: it is stored in the widest of them
        report.append("blocks: " + fmts.spec().split(";")[0].removeprefix("blocks="))
    return fmts, report


def _check_shapes(cfg, fmts: store.Formats) -> None:
    """Quantized matrices need whole groups of 32 along every input dimension a rank holds."""
    def check(fmts_used, what: str, n: int) -> None:
        q = [f for f in fmts_used if qf.is_quant(f)]
        if q:
            qf.check_divisible(q[0], what, n)

    check((*fmts.blocks, fmts.embed, fmts.head), "the hidden size (every projection's input)", cfg.hidden)
    check(fmts.blocks[1::2], "the FFN size (down_proj's input)", cfg.ffn)
    check(fmts.blocks[0::2], "head_dim (o_proj's input, split by heads)", cfg.head_dim)


def with_int4pack(cfg, fmts: store.Formats) -> store.Formats:
    """fmts with every q4_0/q4_1/q8_0 block in torch's int4 kernel layout (--int4pack). The kernel
    multiplies matrices whose rows come in multiples of 16: every rank's are, when hidden size and
    head_dim are (FFN columns are split in groups of 32)."""
    if not any(qf.is_quant(f) for f in fmts.blocks):
        raise UsageError(f"--int4pack repacks q4_0, q4_1 and q8_0 blocks, and this store has none ({fmts.spec()}): "
                         f"give --dtype q4_0, q4 or q8, or auto for a quantized GGUF")
    for what, n in (("the hidden size", cfg.hidden), ("head_dim", cfg.head_dim)):
        if n % 16:
            raise UsageError(f"--int4pack: {what} is {n}, not a multiple of 16, the rows torch's int4 kernel "
                             f"takes at a time; convert without --int4pack")
    blocks = tuple(qf.packed(f) if qf.is_quant(f) else f for f in fmts.blocks)
    return store.Formats(blocks, fmts.embed, fmts.head)


def _in_formats(t: dict, fa: str, fm: str) -> dict:
    """A layer's matrices in their block's format, converted once for all ranks."""
    out = dict(t)
    for keys, f in ((ATTN_KEYS, fa), (MLP_KEYS, fm)):
        for k in keys:
            out[k] = qf.as_format(t[k], f)
    return out


def convert(source, out: str | os.PathLike, world: int, ratios=None,
            dtype: str = "float32", quiet: bool = False, int4pack: bool = False) -> Path:
    """Write a store for `world` ranks at `out` (replacing one already there) and return its path.

    `source` is a path (GGUF file or Hugging Face directory) or a source object with the same methods.
    dtype: a --dtype request (see the module's doc); int4pack: its quantized blocks in the int4 kernel's layout."""
    if qf.canonical(dtype) != "auto" and qf.canonical(dtype) not in qf.FORMATS and "=" not in dtype:
        raise UsageError(f"--dtype {dtype!r} is not one of {', '.join(qf.REQUESTS)}")
    ratios = parse_ratios(ratios, world) if ratios is None or isinstance(ratios, str) else tuple(ratios)
    src = source if hasattr(source, "layer") else open_source(source)
    cfg = src.config
    fmts, report = resolve_formats(src, dtype)
    if int4pack:
        from .quant.kernels import int4pack_layout

        fmts = with_int4pack(cfg, fmts)
        report.append(f"blocks in torch's int4 kernel layout ({int4pack_layout()['cpu_capability']}): "
                      + fmts.spec().split(";")[0].removeprefix("blocks="))
    spec = fmts.spec()
    slices = store.split_plan(cfg, ratios, fmts)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        t0 = time.perf_counter()
        for line in report:
            _progress(f"formats: {line}", quiet)
        writers = [
            _RankFileWriter(tmp / store.rank_file_name(r), store.file_entries(cfg, s, r, spec),
                            store.file_metadata(cfg, s, r, world))
            for r, s in enumerate(slices)
        ]
        for i in range(cfg.n_layers):
            fa, fm = fmts.blocks[2 * i], fmts.blocks[2 * i + 1]
            t = _in_formats(src.layer(i), fa, fm)
            for w, s in zip(writers, slices):
                attn, mlp = store.slice_layer(cfg, s, t, (fa, fm))
                w.write(f"layers.{i}.attn", store.pack_block(store.attn_layout(cfg, s, fa), attn))
                w.write(f"layers.{i}.mlp", store.pack_block(store.mlp_layout(cfg, s, fm), mlp))
            if sys.stderr.isatty() or (i + 1) % max(1, cfg.n_layers // 5) == 0:
                _progress(f"converting: layer {i + 1}/{cfg.n_layers}", quiet)
        writers[0].write("embed", store.to_storage(src.embed(), fmts.embed))
        writers[0].write("final_norm", store.to_storage(src.final_norm(), fmts.final_norm))
        head = src.head()
        if head is not None:
            writers[0].write("head", store.to_storage(head, fmts.head))
        files = [w.close() for w in writers]
        unused = src.unused()
        if unused:
            raise TpimpiError(f"{source}: tensors not understood, refusing to drop them: {unused[:8]}")
        tok = src.tokenizer_files()
        for name, text in tok.items():
            (tmp / name).write_text(text)
        manifest = {
            "format": store.FORMAT, "version": store.VERSION, "config": cfg.to_dict(), "world": world,
            "ratios": list(ratios), "dtype": spec, "requested": dtype, "conversion": report,
            "files": files, "tokenizer": sorted(tok), "source": src.identity(),
            "plan": [{"q_heads": s.q_heads, "kv_heads": s.kv_heads, "ffn": s.ffn} for s in slices],
        }
        if int4pack:
            manifest["int4pack"] = int4pack_layout()
        with open(tmp / store.MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
        for f in files:  # the hashes were taken while writing: the first run need not hash the files again
            store.write_stamp(out / f["name"], f["sha256"], store.file_state(out / f["name"]))
        _progress(f"converted {cfg.arch} ({cfg.n_layers} layers, {spec}) for {world} ranks in "
                  f"{time.perf_counter() - t0:.1f} s -> {out}", quiet)
        if not quiet and sys.stderr.isatty():
            print(file=sys.stderr)
        return out
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tpimpi.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a .gguf file or a Hugging Face model directory")
    p.add_argument("--ranks", type=int, help="number of MPI ranks the store is for")
    p.add_argument("--plan-file", help="split as this plan says (tpimpi.plan): its ranks, ratios and dtype")
    p.add_argument("--ratios", help="comma-separated relative speed/memory of each rank (default equal)")
    p.add_argument("--dtype", default="float32", choices=list(qf.REQUESTS),
                   help="storage format: float32 (default), bfloat16, float16, q8 (= q8_0), q4 (= q4_1), q4_0, "
                   "or auto: keep each tensor's own type (a GGUF's Q8_0/Q4_0/Q4_1 blocks as they are)")
    p.add_argument("--int4pack", action="store_true",
                   help="store q4_0/q4_1/q8_0 blocks in torch's int4 kernel layout, for fast streaming under "
                   "--compute bfloat16 (runs only with it, and on a CPU whose torch packs alike)")
    p.add_argument("--out", help="output directory (default: MODEL's name + .n<RANKS> beside it)")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.plan_file:
            from .planner.planfile import load_plan

            if args.ranks is not None or args.ratios is not None:
                raise UsageError("--plan-file sets the ranks and ratios; drop --ranks and --ratios")
            plan = load_plan(args.plan_file)
            plan.check(plan.world, open_source(args.model).config)
            args.ranks, args.ratios, args.dtype = plan.world, ",".join(repr(r) for r in plan.ratios), plan.dtype
        elif args.ranks is None:
            raise UsageError("give --ranks N (or --plan-file PLAN)")
        out = args.out or str(Path(args.model).with_suffix("")) + f".n{args.ranks}"
        convert(args.model, out, args.ranks, args.ratios, args.dtype, args.quiet, args.int4pack)
    except TpimpiError as e:
        print(f"tpimpi.convert: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
