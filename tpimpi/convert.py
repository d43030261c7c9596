"""Convert a GGUF file or Hugging Face directory into a store split for N ranks.

    python -m tpimpi.convert MODEL --ranks N [--ratios 2,1,1] [--dtype float32] [--out DIR]

Tensors are read one layer at a time and each rank's slices are appended to that rank's file, so the
model is never held twice. Everything is written under a temporary directory and renamed into place
only after the manifest (sizes and sha256 of every file) is complete: an interrupted conversion never
leaves something that looks like a store, and what a killed one leaves beside the output (.OUT.tmp-PID)
is removed by the next conversion of the same output. Each rank file is then stamped as verified (see
store.py), so a run does not hash what the converter has just hashed.
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
from .shard import parse_ratios, plan
from .sources import open_source


class _RankFileWriter:
    """Writes one rank file sequentially, hashing as it goes."""

    def __init__(self, path: Path, entries, dtype: str, metadata: dict[str, str]):
        self.path, self.entries, self.next = path, entries, 0
        self.f = open(path, "wb")
        self.h = hashlib.sha256()
        self._put(store.encode_header(entries, dtype, metadata))

    def _put(self, data) -> None:
        self.f.write(data)
        self.h.update(data)

    def write(self, name: str, data) -> None:
        want, _, nbytes = self.entries[self.next]
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


def convert(source, out: str | os.PathLike, world: int, ratios=None,
            dtype: str = "float32", quiet: bool = False) -> Path:
    """Write a store for `world` ranks at `out` (replacing one already there) and return its path.

    `source` is a path (GGUF file or Hugging Face directory) or a source object with the same methods."""
    if dtype not in store.DTYPES:
        raise UsageError(f"--dtype {dtype!r} is not one of {', '.join(store.DTYPES)}")
    ratios = parse_ratios(ratios, world) if ratios is None or isinstance(ratios, str) else tuple(ratios)
    src = source if hasattr(source, "layer") else open_source(source)
    cfg = src.config
    slices = plan(cfg.n_heads, cfg.n_kv_heads, cfg.ffn, ratios)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        t0 = time.perf_counter()
        writers = [
            _RankFileWriter(tmp / store.rank_file_name(r), store.file_entries(cfg, s, r, dtype), dtype,
                            store.file_metadata(cfg, s, r, world))
            for r, s in enumerate(slices)
        ]
        layouts = [(store.attn_layout(cfg, s, dtype), store.mlp_layout(cfg, s, dtype)) for s in slices]
        for i in range(cfg.n_layers):
            t = src.layer(i)
            for w, s, (la, lm) in zip(writers, slices, layouts):
                attn, mlp = store.slice_layer(cfg, s, t)
                w.write(f"layers.{i}.attn", store.pack_block(la, attn, dtype))
                w.write(f"layers.{i}.mlp", store.pack_block(lm, mlp, dtype))
            if sys.stderr.isatty() or (i + 1) % max(1, cfg.n_layers // 5) == 0:
                _progress(f"converting: layer {i + 1}/{cfg.n_layers}", quiet)
        writers[0].write("embed", store.to_storage(src.embed(), dtype))
        writers[0].write("final_norm", store.to_storage(src.final_norm(), dtype))
        head = src.head()
        if head is not None:
            writers[0].write("head", store.to_storage(head, dtype))
        files = [w.close() for w in writers]
        unused = src.unused()
        if unused:
            raise TpimpiError(f"{source}: tensors not understood, refusing to drop them: {unused[:8]}")
        tok = src.tokenizer_files()
        for name, text in tok.items():
            (tmp / name).write_text(text)
        manifest = {
            "format": store.FORMAT, "version": store.VERSION, "config": cfg.to_dict(), "world": world,
            "ratios": list(ratios), "dtype": dtype, "files": files, "tokenizer": sorted(tok),
            "source": src.identity(),
            "plan": [{"q_heads": s.q_heads, "kv_heads": s.kv_heads, "ffn": s.ffn} for s in slices],
        }
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
        _progress(f"converted {cfg.arch} ({cfg.n_layers} layers) for {world} ranks in "
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
    p.add_argument("--dtype", default="float32", choices=list(store.DTYPES), help="storage dtype")
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
        convert(args.model, out, args.ranks, args.ratios, args.dtype, args.quiet)
    except TpimpiError as e:
        print(f"tpimpi.convert: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
