"""Write a store of random weights with the tensor shapes of a real model, to measure memory and speed
at scales that cannot be downloaded here.

    python -m tpimpi.synth --shape llama2-70b --layers 4 --ranks 8 --dtype bfloat16 --out /data/l70-n8
    python -m tpimpi.synth --shape llama2-70b --ranks 8 --dtype q4 --out /data/l70-q4-n8
    python -m tpimpi.synth --shape llama2-70b --ranks 8 --dtype q4_0 --int4pack --out /data/l70-q4p-n8
    python -m tpimpi.synth --shape smollm2-1.7b --dtype q4_0 --gguf /data/smollm2-1.7b-q4_0.gguf

The store is written by the converter (same layout, checksums and atomic rename) from a source that
makes each layer's tensors on demand. Values are drawn from a fixed random pool, so a 70B-shaped layer
costs memcpy time, not random-number time. With a quantized --dtype the pool holds quantized blocks
(random integers, scales that give the float pool's spread), written as they are: no float model first.
A byte-level tokenizer goes with a store: prompts are text, the output is noise.

--gguf writes a llama GGUF file instead (Q4_0, Q4_1, Q8_0 or F32 tensors, norms F32), with the default
model's tokenizer, so llama.cpp and tpimpi can run the same weights; shapes with its 49152-token
vocabulary only (smollm2-135m, smollm2-1.7b).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from .config import ModelConfig, RopeScaling
from .convert import convert
from .errors import TpimpiError, UsageError
from .quant import formats as qf

_LLAMA3_ROPE = RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
# name: (hidden, layers, heads, kv heads, ffn, vocab, context, rope theta, tied, rope scaling)
SHAPES = {
    "smollm2-135m": (576, 30, 9, 3, 1536, 49152, 8192, 100000.0, True, None),
    "smollm2-1.7b": (2048, 24, 32, 32, 8192, 49152, 8192, 130000.0, True, None),
    "llama3.2-1b": (2048, 16, 32, 8, 8192, 128256, 131072, 500000.0, True, RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)),
    "llama3.2-3b": (3072, 28, 24, 8, 8192, 128256, 131072, 500000.0, True, RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)),
    "llama2-7b": (4096, 32, 32, 32, 11008, 32000, 4096, 10000.0, False, None),
    "llama2-13b": (5120, 40, 40, 40, 13824, 32000, 4096, 10000.0, False, None),
    "llama2-70b": (8192, 80, 64, 8, 28672, 32000, 4096, 10000.0, False, None),
    "llama3-8b": (4096, 32, 32, 8, 14336, 128256, 8192, 500000.0, False, None),
    "llama3.1-8b": (4096, 32, 32, 8, 14336, 128256, 131072, 500000.0, False, _LLAMA3_ROPE),
    "llama3.1-70b": (8192, 80, 64, 8, 28672, 128256, 131072, 500000.0, False, _LLAMA3_ROPE),
    "yi-34b": (7168, 60, 56, 8, 20480, 64000, 4096, 5000000.0, False, None),
}
POOL = 1 << 24  # random values drawn once (64 MiB of float32) and tiled into every tensor


def shape_config(name: str, layers: int | None = None) -> ModelConfig:
    """The ModelConfig of a named shape, optionally cut to its first `layers` layers."""
    if name not in SHAPES:
        raise UsageError(f"--shape {name!r} is not one of: {', '.join(SHAPES)}")
    h, n, heads, kv, ffn, vocab, ctx, theta, tied, rope = SHAPES[name]
    if layers is not None and not 1 <= layers <= n:
        raise UsageError(f"--layers {layers} is out of range 1..{n} for {name}")
    return ModelConfig("llama", layers or n, h, heads, kv, h // heads, ffn, vocab, theta, 1e-5, ctx, tied,
                       rope_scaling=rope)


class SyntheticSource:
    """A model source (as in sources.py) whose tensors are random, with a given config. With a quantized
    fmt its matrices are QTensors of random blocks in that format."""

    def __init__(self, cfg: ModelConfig, name: str, seed: int = 0, fmt: str = "float32"):
        self.config, self.name, self.fmt = cfg, name, fmt
        rng = np.random.default_rng(seed)
        # std 1/sqrt(hidden) keeps activations of a random network in a sane range
        self._pool = (rng.standard_normal(POOL, dtype=np.float32) / np.sqrt(cfg.hidden)).astype(np.float32)
        self._rng = rng
        if qf.is_quant(fmt):
            self._blocks = random_blocks(fmt, POOL // qf.GROUP, 1 / np.sqrt(cfg.hidden), rng)

    def _tensor(self, *shape: int) -> np.ndarray:
        n = int(np.prod(shape))
        start = int(self._rng.integers(0, POOL))
        reps = -(-(start + n) // POOL)
        flat = np.tile(self._pool, reps)[start : start + n] if reps > 1 else self._pool[start : start + n]
        return flat.reshape(shape)

    def _matrix(self, rows: int, cols: int, scale: float = 1.0):
        """A [rows, cols] weight: float32, or random blocks of self.fmt (scale multiplies d and m)."""
        if not qf.is_quant(self.fmt):
            return self._tensor(rows, cols) * scale if scale != 1.0 else self._tensor(rows, cols)
        qf.check_divisible(self.fmt, "the shape's input dimension", cols)
        n, pool = rows * cols // qf.GROUP, self._blocks
        start = int(self._rng.integers(0, len(pool)))
        idx = (start + np.arange(n)) % len(pool)
        data = pool[idx]
        if scale != 1.0:
            for a, b in qf.SCALE_FIELDS[self.fmt]:
                data[:, a:b] = (data[:, a:b].view(np.float16) * np.float16(scale)).view(np.uint8)
        return qf.QTensor(self.fmt, data.reshape(rows, -1), (rows, cols))

    def _norm(self) -> np.ndarray:
        return 1.0 + 0.1 * self._tensor(self.config.hidden) * np.sqrt(self.config.hidden)

    def layer(self, i: int) -> dict:
        c, m = self.config, self._matrix
        q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        return {"attn_norm": self._norm(), "q": m(q, c.hidden), "k": m(kv, c.hidden), "v": m(kv, c.hidden),
                "o": m(c.hidden, q), "ffn_norm": self._norm(), "gate": m(c.ffn, c.hidden),
                "up": m(c.ffn, c.hidden), "down": m(c.hidden, c.ffn)}

    def embed(self):
        return self._matrix(self.config.vocab, self.config.hidden, float(np.sqrt(self.config.hidden)))

    def final_norm(self) -> np.ndarray:
        return self._norm()

    def head(self):
        return None if self.config.tied_embeddings else self._matrix(self.config.vocab, self.config.hidden)

    def unused(self) -> list[str]:
        return []

    def tokenizer_files(self) -> dict[str, str]:
        from .tokenizer import byte_tokenizer_files

        return byte_tokenizer_files()

    def identity(self) -> dict:
        return {"synthetic": self.name, "layers": self.config.n_layers}


def random_blocks(fmt: str, n: int, std: float, rng) -> np.ndarray:
    """n random blocks of fmt, uint8 [n, block bytes], whose weights have mean about 0 and about this std."""
    bb = qf.QUANTS[fmt]
    blocks = rng.integers(0, 256, size=(n, bb), dtype=np.uint8)
    spread = {"q8_0": 73.9, "q4_0": 4.61, "q4_1": 4.61}[fmt]  # std of q uniform on its range
    d = (std / spread * rng.uniform(0.5, 1.5, n)).astype(np.float16)
    blocks[:, 0:2] = d.view(np.uint8).reshape(n, 2)
    if fmt == "q4_1":
        blocks[:, 2:4] = (-7.5 * d).astype(np.float16).view(np.uint8).reshape(n, 2)
    return blocks


def write_gguf(cfg: ModelConfig, path, fmt: str, seed: int = 0, quiet: bool = False) -> Path:
    """A llama GGUF of cfg's shape with random weights in fmt (q4_0, q4_1, q8_0 or float32), and the
    default model's tokenizer. Written to PATH.tmp-PID and renamed when complete."""
    import os

    import gguf

    from .models import default_model_path

    if fmt not in ("q4_0", "q4_1", "q8_0", "float32"):
        raise UsageError(f"--gguf writes q4_0, q4_1, q8_0 or float32 tensors, not {fmt}")
    default = gguf.GGUFReader(str(default_model_path()))
    n_tok = len(default.fields["tokenizer.ggml.tokens"].data)
    if cfg.vocab != n_tok:
        raise UsageError(f"--gguf needs a shape with the default model's {n_tok}-token vocabulary "
                         f"(smollm2-135m, smollm2-1.7b); this one has {cfg.vocab}")
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    src = SyntheticSource(cfg, "gguf", seed, fmt)
    qtype = {"q4_0": gguf.GGMLQuantizationType.Q4_0, "q4_1": gguf.GGMLQuantizationType.Q4_1,
             "q8_0": gguf.GGMLQuantizationType.Q8_0, "float32": gguf.GGMLQuantizationType.F32}[fmt]
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(f"tpimpi synthetic {cfg.n_layers}-layer {fmt}")
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.max_context)
    w.add_embedding_length(cfg.hidden)
    w.add_feed_forward_length(cfg.ffn)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab)
    for key, field in default.fields.items():
        if key.startswith("tokenizer."):
            _copy_field(w, key, field)

    def add(name: str, a) -> None:
        if isinstance(a, qf.QTensor):
            w.add_tensor(name, a.data, raw_shape=a.data.shape, raw_dtype=qtype)
        else:
            w.add_tensor(name, np.ascontiguousarray(a, dtype=np.float32))

    add("token_embd.weight", src.embed())
    names = {"attn_norm": "attn_norm", "q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output",
             "ffn_norm": "ffn_norm", "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down"}
    for i in range(cfg.n_layers):  # random weights: llama.cpp's Q/K row order is as random as Hugging Face's
        for k, a in src.layer(i).items():
            add(f"blk.{i}.{names[k]}.weight", a)
    add("output_norm.weight", src.final_norm())
    if not cfg.tied_embeddings:
        add("output.weight", src.head())
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=not quiet)
        w.close()
        tmp.rename(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _copy_field(w, key: str, field) -> None:
    """Copy one GGUF metadata field (a scalar, string or array) from a reader to a writer."""
    import gguf

    vtype = field.types[0]
    if vtype == gguf.GGUFValueType.ARRAY:
        w.add_key_value(key, field.contents(), vtype, sub_type=field.types[-1])
    else:
        w.add_key_value(key, field.contents(), vtype)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tpimpi.synth", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", required=True, help=f"one of: {', '.join(SHAPES)}")
    p.add_argument("--layers", type=int, help="write only the first K layers (default: all)")
    p.add_argument("--ranks", type=int, help="ranks the store is for (not with --gguf)")
    p.add_argument("--ratios", help="comma-separated relative share of each rank")
    p.add_argument("--dtype", default="bfloat16", choices=[r for r in qf.REQUESTS if r != "auto"],
                   help="storage format: float32, bfloat16 (default), float16, q8 (q8_0), q4 (q4_1), q4_0")
    p.add_argument("--int4pack", action="store_true",
                   help="quantized blocks in torch's int4 kernel layout (tpimpi.convert --int4pack; not with --gguf)")
    p.add_argument("--seed", type=int, default=0)
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--out", help="store directory to write")
    out.add_argument("--gguf", help="write a GGUF file here instead of a store")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    fmt = qf.canonical(args.dtype)
    try:
        cfg = shape_config(args.shape, args.layers)
        if args.gguf:
            if args.int4pack:
                raise UsageError("--int4pack is a store layout: convert the GGUF with tpimpi.convert --int4pack")
            write_gguf(cfg, args.gguf, fmt, args.seed, args.quiet)
        else:
            if args.ranks is None:
                raise UsageError("--ranks is required when writing a store (--out)")
            convert(SyntheticSource(cfg, args.shape, args.seed, fmt), args.out, args.ranks, args.ratios,
                    args.dtype, quiet=args.quiet, int4pack=args.int4pack)
    except TpimpiError as e:
        print(f"tpimpi.synth: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
