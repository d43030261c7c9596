"""The weight store: a manifest plus one safetensors file per rank holding only that rank's slices.

Layout of a rank file (a valid safetensors file; offsets below are from the start of the file):
  [8-byte header length][JSON header, space-padded so the data starts on a 4096-byte boundary]
  layers.0.attn, layers.0.mlp, layers.1.attn, ...   one flat tensor per block, each a multiple of 4096
                                                    bytes, so a block lands in a buffer with one read
  embed, final_norm[, head]                         rank 0 only
Inside a block the sub-tensors (norm weight, fused projections) sit at 64-byte aligned offsets given by
`attn_layout`/`mlp_layout`, which converter and runtime both compute from the config and split plan.

Every block has one format (tpimpi/quant/formats.py): float32, bfloat16, float16, or GGUF's q8_0, q4_0
or q4_1 blocks, kept byte for byte (or, converted with --int4pack, repacked for torch's int4 kernel: the
"-int4pack" formats; the manifest's "int4pack" records the CPU's tile order). In a quantized block the matrices are quantized and the norm and bias
are float32; in a float block everything is in its dtype. The embedding (and an untied head) has a format
of its own. The manifest's "dtype" is the store's format spec (`Formats.spec`): one format name when
everything shares it, else e.g. "blocks=q8_0*2,q4_1*58;embed=q8_0".
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import json
import os
import struct
import typing
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import ModelConfig, RopeScaling
from .errors import ModelError, StoreError, UsageError
from .quant import formats as qf
from .shard import MAX_RANKS, MAX_RATIO, RankSlice, plan

FORMAT = "tpimpi-store"
VERSION = 1
ALIGN = 4096  # block offsets and sizes: page size, and what O_DIRECT needs
SUB_ALIGN = 64  # sub-tensor offsets inside a block: a cache line
MAX_HEADER = 64 << 20
MANIFEST = "manifest.json"
MAX_MANIFEST = 1 << 20  # a manifest is a few KB; refuse to read a larger file whole
MAX_LAYERS = 1 << 12  # bounds of a manifest's config (real models: a few hundred layers, widths below 1M)
MAX_DIM = 1 << 24

# float storage dtype -> (safetensors name, bytes per element); quantized blocks are "U8" bytes
DTYPES = {"float32": ("F32", 4), "bfloat16": ("BF16", 2), "float16": ("F16", 2)}


def _round_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class Formats:
    """The format of every block (attention and MLP of each layer, in order) and of the embedding and head."""

    blocks: tuple[str, ...]
    embed: str
    head: str

    @staticmethod
    def norm_format(fmt: str) -> str:
        """Norms and biases go with a float block's dtype, and are float32 beside quantized matrices."""
        return fmt if fmt in DTYPES else "float32"

    @property
    def final_norm(self) -> str:
        return self.norm_format(self.embed)

    @property
    def granule(self) -> int:
        """FFN columns are split in whole quantization groups when any block is quantized."""
        return qf.GROUP if any(qf.is_quant(f) or qf.is_packed(f) for f in self.blocks) else 1

    def spec(self) -> str:
        if len({*self.blocks, self.embed, self.head}) == 1:
            return self.embed
        runs: list[list] = []
        for f in self.blocks:
            if runs and runs[-1][0] == f:
                runs[-1][1] += 1
            else:
                runs.append([f, 1])
        out = "blocks=" + ",".join(f"{f}*{n}" for f, n in runs) + f";embed={self.embed}"
        return out if self.head == self.embed else out + f";head={self.head}"

    @classmethod
    def uniform(cls, fmt: str, cfg: ModelConfig) -> "Formats":
        return cls((fmt,) * (2 * cfg.n_layers), fmt, fmt)

    @classmethod
    def parse(cls, spec: str, cfg: ModelConfig) -> "Formats":
        """The formats a spec names, for a model of cfg's depth (StoreError if it does not fit)."""
        def fmt(f: str) -> str:
            f = qf.canonical(f)
            if f not in qf.STORED:
                raise StoreError(f"format {f[:40]!r} in dtype {spec[:80]!r} is not one of {', '.join(qf.STORED)}")
            return f

        if not isinstance(spec, str):
            raise StoreError(f"dtype {repr(spec)[:40]} is not a format spec")
        if "=" not in spec:
            return cls.uniform(fmt(spec), cfg)
        try:
            kv = dict(item.split("=", 1) for item in spec.split(";"))
            blocks = []
            for run in kv["blocks"].split(","):
                f, _, n = run.partition("*")
                if not n.isdigit() or int(n) > 2 * MAX_LAYERS:
                    raise ValueError(run)
                blocks += [fmt(f)] * int(n)
                if len(blocks) > 2 * MAX_LAYERS:
                    raise ValueError(run)
            embed = fmt(kv["embed"])
            out = cls(tuple(blocks), embed, fmt(kv.get("head", embed)))
        except (ValueError, KeyError):
            raise StoreError(f"dtype {spec[:80]!r} is not a format spec (e.g. q4_1, or "
                             f"blocks=q8_0*2,q4_1*58;embed=q8_0)") from None
        if len(out.blocks) != 2 * cfg.n_layers:
            raise StoreError(f"dtype {spec[:80]!r} gives {len(out.blocks)} block formats for {cfg.n_layers} layers")
        if qf.is_packed(out.embed) or qf.is_packed(out.head):
            raise StoreError(f"dtype {spec[:80]!r}: the embedding and head are never in the int4 kernel layout")
        if cfg.tied_embeddings and out.head != out.embed:
            raise StoreError(f"dtype {spec[:80]!r}: a tied head is the embedding, in the same format")
        return out


def split_plan(cfg: ModelConfig, ratios, fmts: Formats) -> list[RankSlice]:
    """The split of a store's layers over its ranks: quantized stores cut FFN columns in whole groups."""
    return plan(cfg.n_heads, cfg.n_kv_heads, cfg.ffn, ratios, granule=fmts.granule)


def store_formats(cfg: ModelConfig, dtype: str) -> Formats:
    """The formats of a store from its dtype spec; a conversion request that is not a spec ("auto", needing
    the source's tensor types) is a UsageError."""
    if dtype == "auto":
        raise UsageError("--plan with --dtype auto needs the store, whose formats come from the source's tensor "
                         "types: convert first (python -m tpimpi.convert MODEL --dtype auto --ranks N --out DIR) "
                         "and plan with --model DIR, or name a format (q4, q8, bfloat16, ...)")
    return Formats.parse(dtype, cfg)


@dataclass(frozen=True)
class Part:
    """One sub-tensor of a block: its shape, format and byte offset inside the block."""

    name: str
    shape: tuple[int, ...]
    offset: int
    fmt: str = "float32"

    @property
    def nbytes(self) -> int:
        return qf.nbytes(self.fmt, self.shape)


@dataclass(frozen=True)
class BlockLayout:
    """Where each sub-tensor of a block lies; nbytes is padded to ALIGN."""

    parts: tuple[Part, ...]
    nbytes: int

    def part(self, name: str) -> Part:
        return next(p for p in self.parts if p.name == name)


def _layout(shapes: list[tuple[str, tuple[int, ...], str]]) -> BlockLayout:
    parts, off = [], 0
    for name, shape, fmt in shapes:
        parts.append(Part(name, shape, off, fmt))
        off = _round_up(off + qf.nbytes(fmt, shape), SUB_ALIGN)
    return BlockLayout(tuple(parts), max(ALIGN, _round_up(off, ALIGN)))


def attn_layout(cfg: ModelConfig, s: RankSlice, fmt: str) -> BlockLayout:
    """A rank's attention block: norm [h], fused qkv [(q+2kv)*hd, h], bias [(q+2kv)*hd], o [h, q*hd]."""
    qkv, nf = (s.n_q + 2 * s.n_kv) * cfg.head_dim, Formats.norm_format(fmt)
    shapes = [("norm", (cfg.hidden,), nf), ("wqkv", (qkv, cfg.hidden), fmt)]
    if cfg.attn_bias:
        shapes.append(("bqkv", (qkv,), nf))
    shapes.append(("wo", (cfg.hidden, s.n_q * cfg.head_dim), fmt))
    return _layout(shapes)


def mlp_layout(cfg: ModelConfig, s: RankSlice, fmt: str) -> BlockLayout:
    """A rank's MLP block: norm [h], fused gate+up [2f, h], down [h, f]."""
    nf = Formats.norm_format(fmt)
    return _layout([("norm", (cfg.hidden,), nf), ("wgu", (2 * s.n_ffn, cfg.hidden), fmt),
                    ("wdown", (cfg.hidden, s.n_ffn), fmt)])


def block_layout(cfg: ModelConfig, s: RankSlice, fmts: Formats, b: int) -> BlockLayout:
    return (mlp_layout if b % 2 else attn_layout)(cfg, s, fmts.blocks[b])


@dataclass(frozen=True)
class BlockSpec:
    """A unit the scheduler loads with one read: a layer slice, or a chunk of rank 0's output head."""

    name: str
    offset: int
    layout: BlockLayout


def head_chunks(cfg: ModelConfig, fmt: str, target_bytes: int) -> list[tuple[int, int]]:
    """[row0, row1) chunks of the [vocab, hidden] output head, each about target_bytes, starting on
    page boundaries (the row count is a multiple of the rows that make a whole number of pages)."""
    row = qf.row_bytes(fmt, cfg.hidden)
    step = ALIGN // math.gcd(ALIGN, row)  # rows per page-aligned step
    rows = max(step, target_bytes // row // step * step)
    return [(r, min(r + rows, cfg.vocab)) for r in range(0, cfg.vocab, rows)]


def rank_specs(cfg: ModelConfig, s: RankSlice, rank: int, dtype: str, head_chunk_bytes: int = 0,
               data_start: int = 0) -> list[BlockSpec]:
    """The blocks of a rank in compute order: attention and MLP of each layer, then on rank 0 (if
    head_chunk_bytes) the output head in chunks. Offsets are from data_start. dtype: the format spec."""
    fmts = store_formats(cfg, dtype)
    offsets, off = {}, data_start
    for name, _, _, nbytes in file_entries(cfg, s, rank, dtype):
        offsets[name] = off
        off += nbytes
    out = [BlockSpec(block_name(b), offsets[block_name(b)], block_layout(cfg, s, fmts, b))
           for b in range(2 * cfg.n_layers)]
    if head_chunk_bytes and rank == 0:
        base = offsets["embed" if cfg.tied_embeddings else "head"]
        row = qf.row_bytes(fmts.head, cfg.hidden)
        for r0, r1 in head_chunks(cfg, fmts.head, head_chunk_bytes):
            part = Part("w", (r1 - r0, cfg.hidden), 0, fmts.head)
            out.append(BlockSpec(f"head.{r0}", base + r0 * row, BlockLayout((part,), part.nbytes)))
    return out


def block_name(b: int) -> str:
    """Block b of a rank: even = attention of layer b//2, odd = MLP of layer b//2."""
    return f"layers.{b // 2}.{'mlp' if b % 2 else 'attn'}"


def _st_entry(name: str, fmt: str, shape: tuple[int, ...]) -> tuple[str, str, tuple[int, ...], int]:
    """(name, safetensors dtype, shape, nbytes): float tensors as themselves, quantized ones as bytes."""
    n = qf.nbytes(fmt, shape)
    return (name, DTYPES[fmt][0], shape, n) if fmt in DTYPES else (name, "U8", (n,), n)


def file_entries(cfg: ModelConfig, s: RankSlice, rank: int, dtype: str) -> list[tuple[str, str, tuple[int, ...], int]]:
    """(name, safetensors dtype, shape, nbytes) of every tensor of a rank file, in file order."""
    fmts = store_formats(cfg, dtype)
    out = []
    for b in range(2 * cfg.n_layers):
        lay, f = block_layout(cfg, s, fmts, b), fmts.blocks[b]
        st, size = DTYPES[f] if f in DTYPES else ("U8", 1)
        out.append((block_name(b), st, (lay.nbytes // size,), lay.nbytes))
    if rank == 0:
        out.append(_st_entry("embed", fmts.embed, (cfg.vocab, cfg.hidden)))
        out.append(_st_entry("final_norm", fmts.final_norm, (cfg.hidden,)))
        if not cfg.tied_embeddings:
            out.append(_st_entry("head", fmts.head, (cfg.vocab, cfg.hidden)))
    return out


def file_metadata(cfg: ModelConfig, s: RankSlice, rank: int, world: int) -> dict[str, str]:
    """What a rank file records about itself, checked against the manifest when it is opened."""
    return {"format": FORMAT, "rank": str(rank), "world": str(world),
            "config": json.dumps(cfg.to_dict(), sort_keys=True),
            "slice": json.dumps([s.q_heads, s.kv_heads, s.ffn])}


def rank_file_name(rank: int) -> str:
    return f"rank{rank:03d}.safetensors"


def encode_header(entries, metadata: dict[str, str]) -> bytes:
    """The 8-byte length and JSON header of a rank file, padded so that data starts at ALIGN."""
    header, off = {"__metadata__": metadata}, 0
    for name, st, shape, nbytes in entries:
        header[name] = {"dtype": st, "shape": list(shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    total = _round_up(8 + len(raw), ALIGN)
    raw += b" " * (total - 8 - len(raw))
    return struct.pack("<Q", len(raw)) + raw


def decode_header(f, file_size: int, path: str) -> tuple[int, dict]:
    """Parse a rank file's header defensively; returns (data start, header dict)."""
    head = f.read(8)
    if len(head) < 8:
        raise StoreError(f"{path}: file is {file_size} bytes, too short for a header")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER or 8 + n > file_size:
        raise StoreError(f"{path}: header length {n} is impossible for a file of {file_size} bytes")
    header = _parse_json(f.read(n), f"{path}: header is not valid JSON")
    if not isinstance(header, dict):
        raise StoreError(f"{path}: header is not a JSON object")
    return 8 + n, header


def to_storage(a, fmt: str) -> bytes:
    """A float32 array or QTensor -> the raw little-endian bytes of fmt."""
    return qf.to_bytes(a, fmt)


def pack_block(layout: BlockLayout, tensors: dict) -> bytearray:
    """Lay out sub-tensors (float32 arrays or QTensors) into one zero-padded block as `layout` says."""
    buf = bytearray(layout.nbytes)
    for p in layout.parts:
        a = tensors[p.name]
        if tuple(a.shape) != p.shape:
            raise AssertionError(f"{p.name}: shape {a.shape} != layout {p.shape}")
        raw = to_storage(a, p.fmt)
        buf[p.offset : p.offset + len(raw)] = raw
    return buf


def slice_layer(cfg: ModelConfig, s: RankSlice, t: dict, fmts: tuple[str, str] = ("float32", "float32")
                ) -> tuple[dict, dict]:
    """One rank's attention and MLP sub-tensors from a layer's full tensors (HF layout; float32 arrays or
    QTensors), each matrix in its block's format (fmts: attention's, MLP's). A quantized matrix's columns
    are cut at group boundaries: shard.py splits quantized stores that way."""
    hd = cfg.head_dim
    q = slice(s.q_heads[0] * hd, s.q_heads[1] * hd)
    kv = slice(s.kv_heads[0] * hd, s.kv_heads[1] * hd)
    f = slice(*s.ffn)
    fa, fm = fmts

    def rows(*parts, fmt):
        return qf.concat_rows([qf.take_rows(qf.as_format(a, fmt), sl) for a, sl in parts])

    attn = {"norm": t["attn_norm"], "wqkv": rows((t["q"], q), (t["k"], kv), (t["v"], kv), fmt=fa),
            "wo": qf.take_cols(qf.as_format(t["o"], fa), q.start, q.stop)}
    if cfg.attn_bias:
        attn["bqkv"] = np.concatenate([t["bq"][q], t["bk"][kv], t["bv"][kv]])
    mlp = {"norm": t["ffn_norm"], "wgu": rows((t["gate"], f), (t["up"], f), fmt=fm),
           "wdown": qf.take_cols(qf.as_format(t["down"], fm), f.start, f.stop)}
    return attn, mlp


# ---------------------------------------------------------------------------------------------------
# Manifest


def _parse_json(raw: bytes, what: str):
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: absurdly deep nesting
        raise StoreError(f"{what} ({type(e).__name__}: {str(e)[:200]})") from None


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf


def _check_fields(cls, d, where: str) -> None:
    """Every field of the dataclass cls that d gives has the declared type and a sane value: ints in
    1..MAX_DIM (n_layers up to MAX_LAYERS), floats positive and finite, or 0 where that is the default.
    cls checks the relations."""
    if not isinstance(d, dict):
        raise StoreError(f"{where}: {cls.__name__} is {type(d).__name__}, not an object")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        v, t = d.get(f.name), hints[f.name]
        if f.name not in d or t not in (int, float, bool, str):
            continue  # a missing field is reported by the constructor, a nested one by the caller
        if f.default == 0 and v == 0 and type(v) is t:  # 0 where 0 means "none" (sliding_window, ...)
            continue
        if t is int:
            ok = type(v) is int and 1 <= v <= (MAX_LAYERS if f.name == "n_layers" else MAX_DIM)
        else:
            ok = _positive(v) if t is float else type(v) is t
        if not ok:
            raise StoreError(f"{where}: {f.name} = {repr(v)[:40]} is not a valid {t.__name__} for this field")


def _check_manifest(m, path: Path) -> dict:
    """m with its config as a ModelConfig, if every field the runtime uses has the right type and range."""
    if not isinstance(m, dict):
        raise StoreError(f"{path}: the manifest is {type(m).__name__}, not an object")
    missing = [k for k in ("format", "version", "dtype", "world", "ratios", "files", "config") if k not in m]
    if missing:
        raise StoreError(f"{path}: malformed manifest (no {', '.join(missing)})")
    if m["format"] != FORMAT or m["version"] != VERSION or type(m["version"]) is not int:
        raise StoreError(f"{path}: format {repr(m['format'])[:40]} v{repr(m['version'])[:20]} "
                         f"is not {FORMAT} v{VERSION}")
    if not isinstance(m["dtype"], str) or len(m["dtype"]) > 4096:
        raise StoreError(f"{path}: unknown dtype {repr(m['dtype'])[:40]}")
    world, ratios, files = m["world"], m["ratios"], m["files"]
    if type(world) is not int or not 1 <= world <= MAX_RANKS:
        raise StoreError(f"{path}: world {repr(world)[:40]} is not a rank count in 1..{MAX_RANKS}")
    if not isinstance(ratios, list) or not isinstance(files, list):
        raise StoreError(f"{path}: ratios and files must be lists")
    if len(ratios) != world or len(files) != world:
        raise StoreError(f"{path}: world {world} but {len(ratios)} ratios and {len(files)} files")
    if not all(_positive(r) and r <= MAX_RATIO for r in ratios):
        raise StoreError(f"{path}: ratios {repr(ratios)[:80]} are not all positive numbers up to {MAX_RATIO:g}")
    for f in files:
        name = f.get("name") if isinstance(f, dict) else None
        if not (isinstance(name, str) and name not in ("", ".", "..") and not set(name) & set("/\\\0")):
            raise StoreError(f"{path}: file entry {repr(f)[:80]} does not name a file in the store directory")
        if type(f.get("bytes")) is not int or not 0 <= f["bytes"] < 1 << 63 or not isinstance(f.get("sha256"), str):
            raise StoreError(f"{path}: file entry {repr(f)[:80]} has no valid bytes and sha256")
    if not isinstance(m.get("source", {}), dict):
        raise StoreError(f"{path}: source {repr(m['source'])[:40]} is not an object")
    _check_fields(ModelConfig, m["config"], f"{path}: config")
    if m["config"].get("rope_scaling") is not None:
        _check_fields(RopeScaling, m["config"]["rope_scaling"], f"{path}: config.rope_scaling")
    try:
        m["config"] = ModelConfig.from_dict(m["config"])
    except ModelError as e:
        raise StoreError(f"{path}: {e}") from None
    try:
        m["formats"] = Formats.parse(m["dtype"], m["config"])
    except StoreError as e:
        raise StoreError(f"{path}: {e}") from None
    packed = any(qf.is_packed(f) for f in m["formats"].blocks)
    rec = m.get("int4pack")
    if packed and not (isinstance(rec, dict) and all(isinstance(rec.get(k), str) for k in ("layout", "cpu_capability", "torch"))):
        raise StoreError(f"{path}: blocks in the int4 kernel layout but no valid int4pack record "
                         f"({repr(rec)[:80]}) of the CPU's tile order")
    return m


def load_manifest(directory: str | os.PathLike) -> dict:
    """Read a store's manifest and check every field the runtime uses (types, ranges, file names), so
    that a damaged or hand-edited manifest fails here with a StoreError and nowhere else."""
    path = Path(directory) / MANIFEST
    if not Path(directory).exists():
        raise StoreError(f"store {str(directory)!r} does not exist")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_MANIFEST + 1)
    except FileNotFoundError:
        raise StoreError(f"{str(directory)!r} is not a tpimpi store (no {MANIFEST}); "
                         f"an interrupted conversion leaves none — run the conversion again") from None
    except OSError as e:
        raise StoreError(f"{path}: unreadable manifest ({e.strerror})") from None
    if len(raw) > MAX_MANIFEST:
        raise StoreError(f"{path}: unreadable manifest (larger than {MAX_MANIFEST} bytes)")
    return _check_manifest(_parse_json(raw, f"{path}: unreadable manifest"), path)


def sha256_file(path: str | os.PathLike, chunk: int = 8 << 20, progress=None) -> str:
    """The file's sha256; progress(bytes hashed) is called after every chunk when given."""
    h, done = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
            done += len(b)
            if progress is not None:
                progress(done)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------
# Verification stamps: a rank file is hashed once per file state, not once per run.
#
# A stamp records (size, mtime_ns, inode) of a file whose sha256 matched the manifest. While the file
# keeps all three, it is taken as verified; a copy (new inode), an edit (new mtime) or a truncation (new
# size) makes the next run hash it again. The stamp lies beside the file (.NAME.verified) when the store
# directory is writable, else under $TPIMPI_CACHE/verified: every rank stamps only its own file, so on a
# shared file system ranks never write the same stamp, and on a read-only store each host keeps its own.

VERIFY_MODES = ("auto", "always", "never")


def file_state(path: Path) -> dict:
    """What a stamp records of a file: size, modification time and inode."""
    st = path.stat()
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def stamp_paths(path: Path) -> tuple[Path, Path]:
    """(beside the file, in the cache): where the verification stamp of a rank file may lie."""
    from .models import cache_root  # models imports this module

    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    return path.parent / f".{path.name}.verified", cache_root() / "verified" / f"{key}-{path.name}.json"


def stamp_valid(path: Path, sha256: str) -> bool:
    """Whether a stamp says that this file, in its present state, matched `sha256`."""
    try:
        state = file_state(path)
    except OSError:
        return False
    for p in stamp_paths(path):
        try:
            with open(p, "rb") as f:
                st = json.loads(f.read(4096).decode())
        except (OSError, UnicodeDecodeError, ValueError):
            continue
        if isinstance(st, dict) and st == {**state, "sha256": sha256}:
            return True
    return False


def write_stamp(path: Path, sha256: str, state: dict) -> Path | None:
    """Record that the file in `state` matched `sha256`: beside it if possible, else in the cache.
    Returns where, or None when neither place is writable (the next run hashes again)."""
    data = json.dumps({**state, "sha256": sha256}).encode()
    for p in stamp_paths(path):
        tmp = p.with_name(f"{p.name}.tmp-{os.getpid()}")
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, p)
            return p
        except OSError:
            try:
                tmp.unlink()
            except OSError:
                pass
    return None


class _HashProgress:
    """One line on stderr while a rank file is hashed: the percentage on a terminal, else a start note."""

    def __init__(self, rank: int, path: Path, size: int):
        import sys

        self.err, self.tty = sys.stderr, sys.stderr.isatty()
        self.head = (f"tpimpi: rank {rank}: checking {path.name} ({size / 2**20:.1f} MiB) against the manifest's "
                     f"sha256 (once per change of the file; --no-verify skips)")
        self.size, self.shown = max(1, size), -1
        print(self.head + ("" if self.tty else " ..."), end="" if self.tty else "\n", file=self.err, flush=True)

    def __call__(self, done: int) -> None:
        pct = 100 * done // self.size
        if self.tty and pct != self.shown:
            self.shown = pct
            print(f"\r{self.head}: {pct}%", end="", file=self.err, flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=self.err, flush=True)


class RankStore:
    """One rank's view of a store: validated on open, blocks read into caller-owned buffers."""

    def __init__(self, directory: str | os.PathLike, rank: int, world: int, verify: str | bool = "never"):
        """verify: "auto" hashes the file unless a stamp says this state of it was verified, "always"
        hashes it, "never" only checks sizes and headers (True and False mean always and never)."""
        self.directory = Path(directory)
        m = load_manifest(self.directory)
        if m["world"] != world:
            src, out = m.get("source", {}), f"{str(self.directory).rstrip('/')}-n{world}"
            dtype = m.get("requested", m["dtype"]) + (" --int4pack" if "int4pack" in m else "")
            if "synthetic" in src:
                cmd = (f"python -m tpimpi.synth --shape {src['synthetic']} --layers {src.get('layers')} "
                       f"--dtype {dtype} --ranks {world} --out {out}")
            else:
                cmd = f"python -m tpimpi.convert {src.get('path', 'MODEL')} --dtype {dtype} --ranks {world} --out {out}"
            raise StoreError(f"store {str(self.directory)!r} was split for {m['world']} ranks, launched with {world}; "
                             f"split it for {world} with: {cmd}")
        self.manifest = m
        self.cfg: ModelConfig = m["config"]
        self.dtype: str = m["dtype"]  # the format spec
        self.formats: Formats = m["formats"]
        self.rank = rank
        self.slice = split_plan(self.cfg, m["ratios"], self.formats)[rank]
        info = m["files"][rank]
        self.path = self.directory / info["name"]
        self._check_file(info, verify)
        self.fd = os.open(self.path, os.O_RDONLY)

    def _check_file(self, info: dict, verify: bool) -> None:
        p = str(self.path)
        try:
            size = self.path.stat().st_size
        except OSError as e:
            raise StoreError(f"{p}: cannot open weight file ({e.strerror})") from None
        if size != info["bytes"]:
            raise StoreError(f"{p}: {size} bytes, manifest says {info['bytes']} (truncated or replaced?)")
        try:
            with open(self.path, "rb") as f:
                start, header = decode_header(f, size, p)
        except OSError as e:
            raise StoreError(f"{p}: cannot read weight file ({e.strerror})") from None
        meta = file_metadata(self.cfg, self.slice, self.rank, len(self.manifest["ratios"]))
        expect = json.loads(encode_header(file_entries(self.cfg, self.slice, self.rank, self.dtype), meta)[8:].decode())
        if header != expect:
            what = "model config or split plan" if header.get("__metadata__") != meta else "tensor table"
            raise StoreError(f"{p}: the file's {what} does not match the manifest (edited, or from another store?)")
        if start % ALIGN:
            raise StoreError(f"{p}: data starts at {start}, not a multiple of {ALIGN}")
        self.data_start = start
        self.offsets = {k: start + v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}
        verify = {True: "always", False: "never"}.get(verify, verify)
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, not {verify!r}")
        if verify == "always" or (verify == "auto" and not stamp_valid(self.path, info["sha256"])):
            self._verify(info["sha256"])

    def _verify(self, sha256: str) -> None:
        """Hash the file; refuse it if it differs from the manifest, else stamp this state of it."""
        p = str(self.path)
        try:
            state = file_state(self.path)  # before hashing: a change while hashing fails the next check
            progress = _HashProgress(self.rank, self.path, state["bytes"])
            try:
                digest = sha256_file(self.path, progress=progress)
            finally:
                progress.close()
        except OSError as e:
            raise StoreError(f"{p}: cannot read weight file ({e.strerror})") from None
        if digest != sha256:
            raise StoreError(f"{p}: checksum does not match the manifest: the file is damaged (convert the "
                             f"model again, or copy this file again from an intact store)")
        write_stamp(self.path, digest, state)

    @property
    def n_blocks(self) -> int:
        return 2 * self.cfg.n_layers

    def specs(self, head_chunk_bytes: int = 0) -> list[BlockSpec]:
        """This rank's block cycle (see `rank_specs`) at its offsets in the file."""
        return rank_specs(self.cfg, self.slice, self.rank, self.dtype, head_chunk_bytes, self.data_start)

    def embed_rows_into(self, ids, out: np.ndarray) -> None:
        """out [T, row bytes] (the embedding's format, as bytes) <- embedding rows of ids, one read each."""
        row = qf.row_bytes(self.formats.embed, self.cfg.hidden)
        base = self.offsets["embed"]
        flat = out.reshape(len(ids), row)  # [T, row bytes]
        for t, i in enumerate(ids):
            self.read_into(base + int(i) * row, memoryview(flat[t]))

    def layout(self, b: int) -> BlockLayout:
        return block_layout(self.cfg, self.slice, self.formats, b)

    def block_offset(self, b: int) -> int:
        return self.offsets[block_name(b)]

    def read_into(self, offset: int, buf: memoryview) -> None:
        """Fill buf from the file at offset with positional reads (the GIL is released while reading)."""
        done, n = 0, len(buf)
        while done < n:
            got = os.preadv(self.fd, [buf[done:]], offset + done)
            if got <= 0:
                raise StoreError(f"{self.path}: short read at byte {offset + done} (file truncated?)")
            done += got

    def read_tensor(self, name: str) -> np.ndarray:
        """A rank-0 tensor (embed, final_norm, head) as raw storage bytes shaped by the caller."""
        entries = {e[0]: e for e in file_entries(self.cfg, self.slice, self.rank, self.dtype)}
        nbytes = entries[name][3]
        buf = np.empty(nbytes, dtype=np.uint8)
        self.read_into(self.offsets[name], memoryview(buf))
        return buf

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
