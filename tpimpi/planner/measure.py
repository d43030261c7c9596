"""Measurements one rank makes of its own device for the profile: products, block overheads, disk.

Each product is timed the way the runtime computes it, at the model's shapes, on weights that together
exceed the CPU's caches (decode streams every weight once per token, so none is in cache). A storage
format is one entry of PRODUCTS: a factory of weights in that format and the product the runtime does
with them; the profile measures every entry.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .. import layers
from ..config import ModelConfig
from ..scheduler import TORCH_DTYPES, aligned_buffer
from ..shard import RankSlice
from ..store import DTYPES

CYCLE_BYTES = 64 << 20  # weights cycled through per measurement: larger than any CPU's last-level cache
MAX_MATRIX = 32 << 20  # one weight matrix at most this large (a 70B share would not fit a small board)
TIME_S = 0.1  # seconds spent timing each figure
DISK_BYTES = 64 << 20  # the temporary file the disk is measured with
DISK_CHUNK = 4 << 20


@dataclass(frozen=True)
class Product:
    """A storage format: bytes per weight, and make(rows, cols, like=None) -> (weights, fn) where
    fn(x [T, cols]) computes x @ weights.T as the runtime does with weights stored this way (like: weights
    an earlier call made, to copy instead of drawing new random values)."""

    itemsize: float
    make: Callable


def _dense(dtype: str) -> Product:
    td = TORCH_DTYPES[dtype]
    scratches: dict = {}  # one upcast buffer per shape, reused by every block as the scheduler's is

    def make(rows: int, cols: int, like: torch.Tensor | None = None):
        # [rows, cols] in storage dtype; copies of `like` (random values drawn once) are as good as new draws
        w = like.clone() if like is not None else (torch.randn(rows, cols) / cols**0.5).to(td)
        if dtype == "float32":
            return w, lambda x: layers.linear(x, w)
        scratch = scratches.setdefault((rows, cols), torch.empty(rows, cols))  # the scheduler's upcast, then BLAS
        return w, lambda x: layers.linear(x, scratch.copy_(w))

    return Product(DTYPES[dtype][1], make)


PRODUCTS: dict[str, Product] = {d: _dense(d) for d in DTYPES}


def _timed(fn, min_s: float = TIME_S) -> float:
    """Seconds per call of fn (after one warm-up call), over at least min_s."""
    fn()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        t = time.perf_counter() - t0
        if t >= min_s:
            return t / n


def product_rates(cfg: ModelConfig, world: int, dtype: str, chunk: int = 64,
                  cycle_bytes: int = CYCLE_BYTES) -> tuple[float, float]:
    """(weight bytes per second of one-token products, flops per second of chunk-token products) at the
    shape of one equal share's gate/up matrix for `world` ranks, cycling through weights beyond caches
    (cycle_bytes of them: less on a device with little memory)."""
    p = PRODUCTS[dtype]
    cols = cfg.hidden
    rows = max(8, min(2 * -(-cfg.ffn // world), int(min(MAX_MATRIX, cycle_bytes / 2) / (cols * p.itemsize))))
    copies = max(2, int(cycle_bytes / (rows * cols * p.itemsize)))
    first, fn = p.make(rows, cols)
    mats = [fn] + [p.make(rows, cols, first)[1] for _ in range(copies - 1)]
    x1, xT = torch.randn(1, cols), torch.randn(chunk, cols)

    def sweep(x):
        for f in mats:
            f(x)

    per_matvec = _timed(lambda: sweep(x1)) / copies
    per_gemm = _timed(lambda: sweep(xT), 2 * TIME_S) / copies
    return rows * cols * p.itemsize / per_matvec, 2.0 * rows * cols * chunk / per_gemm


def block_overheads(cfg: ModelConfig, pos: int = 64) -> tuple[float, float]:
    """Seconds of one attention and one MLP block of the smallest share (one head, a few FFN columns) at
    the model's hidden size, one token at position pos: what a block costs besides streaming its weights."""
    h, hd = cfg.hidden, cfg.head_dim
    s = RankSlice((0, 1), (0, 1), (0, 8))
    w_attn = {"norm": torch.ones(h), "wqkv": torch.randn(3 * hd, h) / h**0.5, "wo": torch.randn(h, hd) / hd**0.5}
    if cfg.attn_bias:
        w_attn["bqkv"] = torch.zeros(3 * hd)
    w_mlp = {"norm": torch.ones(h), "wgu": torch.randn(2 * s.n_ffn, h) / h**0.5, "wdown": torch.randn(h, s.n_ffn)}
    max_seq = pos + 2
    cache_k, cache_v = torch.zeros(1, max_seq, hd), torch.zeros(1, max_seq, hd)  # [kv, S, hd]
    cos, sin = layers.rope_tables(cfg, max_seq)
    kv_of_q = torch.tensor(s.kv_of_q(cfg.group), dtype=torch.long)
    x, out = torch.randn(1, h), torch.empty(1, h)
    t_attn = _timed(lambda: layers.attention(x, w_attn, cache_k, cache_v, pos, cos, sin, kv_of_q, cfg, out))
    t_mlp = _timed(lambda: layers.mlp(x, w_mlp, cfg, out))
    return t_attn, t_mlp


def disk_rates(directory: str, nbytes: int = DISK_BYTES) -> tuple[float, float, bool]:
    """(O_DIRECT bytes/s, page-cache bytes/s, whether O_DIRECT worked) of block-sized sequential reads
    of a temporary file in `directory` (the store's file system), removed afterwards. Where O_DIRECT is
    refused (tmpfs), cold reads are buffered reads after dropping the file's cached pages."""
    os.makedirs(directory, exist_ok=True)
    mm, buf = aligned_buffer(DISK_CHUNK)
    buf[:] = np.random.default_rng(0).integers(0, 255, DISK_CHUNK, dtype=np.uint8)
    fd, path = tempfile.mkstemp(prefix=f"tpimpi-profile-{os.getpid()}-", dir=directory)
    try:
        nbytes = max(DISK_CHUNK, nbytes // DISK_CHUNK * DISK_CHUNK)
        for off in range(0, nbytes, DISK_CHUNK):
            os.pwrite(fd, buf, off)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, nbytes, os.POSIX_FADV_DONTNEED)
        direct = True
        try:
            dfd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        except OSError:
            dfd, direct = os.open(path, os.O_RDONLY), False

        def read_all(f):
            t = time.perf_counter()
            for off in range(0, nbytes, DISK_CHUNK):
                os.preadv(f, [memoryview(mm)], off)
            return time.perf_counter() - t

        cold = read_all(dfd)
        os.close(dfd)
        read_all(fd)  # bring the file into the page cache
        warm = min(read_all(fd) for _ in range(2))
        return nbytes / cold, nbytes / warm, direct
    finally:
        os.close(fd)
        os.unlink(path)
        del buf


