"""Write a store of random weights with the tensor shapes of a real model, to measure memory and speed
at scales that cannot be downloaded here.

    python -m tpimpi.synth --shape llama2-70b --layers 4 --ranks 8 --dtype bfloat16 --out /data/l70-n8

The store is written by the converter (same layout, checksums and atomic rename) from a source that
makes each layer's tensors on demand. Values are drawn from a fixed random pool, so a 70B-shaped layer
costs memcpy time, not random-number time. A byte-level tokenizer goes with it: prompts are text,
the output is noise.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from .config import ModelConfig, RopeScaling
from .convert import convert
from .errors import TpimpiError, UsageError
from .store import DTYPES

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
    """A model source (as in sources.py) whose tensors are random, with a given config."""

    def __init__(self, cfg: ModelConfig, name: str, seed: int = 0):
        self.config, self.name = cfg, name
        rng = np.random.default_rng(seed)
        # std 1/sqrt(hidden) keeps activations of a random network in a sane range
        self._pool = (rng.standard_normal(POOL, dtype=np.float32) / np.sqrt(cfg.hidden)).astype(np.float32)
        self._rng = rng

    def _tensor(self, *shape: int) -> np.ndarray:
        n = int(np.prod(shape))
        start = int(self._rng.integers(0, POOL))
        reps = -(-(start + n) // POOL)
        flat = np.tile(self._pool, reps)[start : start + n] if reps > 1 else self._pool[start : start + n]
        return flat.reshape(shape)

    def _norm(self) -> np.ndarray:
        return 1.0 + 0.1 * self._tensor(self.config.hidden) * np.sqrt(self.config.hidden)

    def layer(self, i: int) -> dict[str, np.ndarray]:
        c = self.config
        q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        return {"attn_norm": self._norm(), "q": self._tensor(q, c.hidden), "k": self._tensor(kv, c.hidden),
                "v": self._tensor(kv, c.hidden), "o": self._tensor(c.hidden, q), "ffn_norm": self._norm(),
                "gate": self._tensor(c.ffn, c.hidden), "up": self._tensor(c.ffn, c.hidden),
                "down": self._tensor(c.hidden, c.ffn)}

    def embed(self) -> np.ndarray:
        return self._tensor(self.config.vocab, self.config.hidden) * np.sqrt(self.config.hidden)

    def final_norm(self) -> np.ndarray:
        return self._norm()

    def head(self) -> np.ndarray | None:
        return None if self.config.tied_embeddings else self._tensor(self.config.vocab, self.config.hidden)

    def unused(self) -> list[str]:
        return []

    def tokenizer_files(self) -> dict[str, str]:
        from .tokenizer import byte_tokenizer_files

        return byte_tokenizer_files()

    def identity(self) -> dict:
        return {"synthetic": self.name, "layers": self.config.n_layers}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tpimpi.synth", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", required=True, help=f"one of: {', '.join(SHAPES)}")
    p.add_argument("--layers", type=int, help="write only the first K layers (default: all)")
    p.add_argument("--ranks", type=int, required=True)
    p.add_argument("--ratios", help="comma-separated relative share of each rank")
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="store directory to write")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = shape_config(args.shape, args.layers)
        convert(SyntheticSource(cfg, args.shape, args.seed), args.out, args.ranks, args.ratios, args.dtype,
                quiet=args.quiet)
    except TpimpiError as e:
        print(f"tpimpi.synth: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
