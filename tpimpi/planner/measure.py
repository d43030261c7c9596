"""Measurements one rank makes of its own device for the profile: products, block overheads, disk.

Each product is timed the way the runtime computes it, at the model's shapes, on weights that together
exceed the CPU's caches (decode streams every weight once per token, so none is in cache). A storage
format is one entry of PRODUCTS: a factory of weights in that format and the product the runtime does
with them; the profile measures every entry.
"""

from __future__ import annotations

import math
import os
import statistics
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

CYCLE_BYTES = 64 << 20  # weights one-token products cycle through at least
MAX_CYCLE = 1 << 30  # one-token products cycle through a rank's share of the model, up to this much
GEMM_COPIES = 4  # matrices chunk products cycle through
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


def model_weight_bytes(cfg: ModelConfig, itemsize: float) -> int:
    """Bytes of every weight one decoded token streams: all layers' projections and the output head."""
    h, hd = cfg.hidden, cfg.head_dim
    attn = h * (cfg.n_heads + 2 * cfg.n_kv_heads) * hd + h * cfg.n_heads * hd
    return int(itemsize * (cfg.n_layers * (attn + 3 * h * cfg.ffn) + cfg.vocab * h))


def cpu_share(min_s: float = TIME_S / 2, min_cpu_s: float = 0.02) -> float:
    """The fraction of wall time this thread gets while it has work: about q under a CPU quota of q cores
    (CFS bandwidth control), less where other processes take turns on its core. Timed over min_s and at
    least min_cpu_s of CPU time: many of a small quota's periods (0.03 cores: 20 periods of 33 ms)."""
    w0, c0 = time.perf_counter(), time.thread_time()
    while time.perf_counter() - w0 < min_s or time.thread_time() - c0 < min_cpu_s:
        sum(range(1000))  # this thread's own work (a library's pool would take turns on other threads)
    return min(1.0, max(1e-3, (time.thread_time() - c0) / (time.perf_counter() - w0)))


def _cpu_difference(fn, part, min_s: float = TIME_S, rounds: int = 15) -> float:
    """CPU seconds per call of fn beyond its part `part` (fn does part and more): batches of each,
    alternated so that both see the same load, the median of the batches' differences, in this thread's
    CPU time (a quota's pauses and other processes' turns are not in it); never below zero."""
    clock = time.thread_time
    t0 = clock()
    fn()
    n = max(1, int(min_s / rounds / 2 / max(clock() - t0, 1e-6)))
    diffs = []
    for _ in range(rounds):
        t0 = clock()
        for _ in range(n):
            fn()
        t1 = clock()
        for _ in range(n):
            part()
        diffs.append(2 * t1 - t0 - clock())
    return max(0.0, statistics.median(diffs) / n)


def product_rates(cfg: ModelConfig, world: int, dtype: str, chunk: int = 64,
                  cycle_bytes: int = CYCLE_BYTES) -> tuple[float, float]:
    """(weight bytes per second of one-token products, flops per second of chunk-token products) at the
    shape of one equal share's gate/up matrix for `world` ranks. One-token products cycle through
    cycle_bytes of weights, as decode streams a rank's share once per token: pass the share itself, so
    that what of it a cache holds (a large last-level cache holds a small model's share) is as in a run.
    Chunk products are compute-bound (each weight used `chunk` times): a few matrices suffice, and keep a
    device with a small CPU quota from spending many seconds here."""
    p = PRODUCTS[dtype]
    cols = cfg.hidden
    rows = max(8, min(2 * -(-cfg.ffn // world), int(min(MAX_MATRIX, cycle_bytes / 2) / (cols * p.itemsize))))
    copies = max(2, int(cycle_bytes / (rows * cols * p.itemsize)))
    first, fn = p.make(rows, cols)
    mats = [fn] + [p.make(rows, cols, first)[1] for _ in range(copies - 1)]
    x1, xT = torch.randn(1, cols), torch.randn(chunk, cols)
    n_gemm = min(copies, GEMM_COPIES)

    def sweep(x, n):
        for f in mats[:n]:
            f(x)

    per_matvec = _timed(lambda: sweep(x1, copies)) / copies
    per_gemm = _timed(lambda: sweep(xT, n_gemm), 2 * TIME_S) / n_gemm
    return rows * cols * p.itemsize / per_matvec, 2.0 * rows * cols * chunk / per_gemm


OVERHEAD_BLOCK_BYTES = 4 << 20  # the blocks whose non-product work is timed: small enough to stay in cache


def equal_share(cfg: ModelConfig, world: int) -> RankSlice:
    """Rank 0's slice of an equal split for `world` ranks (the largest one)."""
    from ..shard import plan as split_plan

    return split_plan(cfg.n_heads, cfg.n_kv_heads, cfg.ffn, [1] * world)[0]


def block_overheads(cfg: ModelConfig, world: int = 1, pos: int = 64) -> tuple[float, float]:
    """Seconds of one attention and one MLP block's work besides streaming its weights, one token at
    position pos (CPU time, divided by the share of a core this thread gets: under a quota, the seconds a
    run sees on average): everything the layer loop does for the block (norm, rotary embedding, the KV cache,
    attention over pos positions, the activation, the product calls, the finite check and the residual
    add) minus the time of its products alone. Timed on rank 0's equal share for `world` ranks (its heads
    in whole KV groups, its FFN columns), cut down to OVERHEAD_BLOCK_BYTES of float32 weights when larger
    (whole groups and FFN columns dropped: a large model's products dwarf this work anyway), so that
    both timings run from cache and their difference is the work a larger share streams beside."""
    h, hd, g = cfg.hidden, cfg.head_dim, cfg.group
    share = equal_share(cfg, world)
    per_group = 4 * h * hd * (3 * g + 2)  # wqkv and wo rows of one KV group, float32
    n_kv = max(1, min(share.n_kv or 1, OVERHEAD_BLOCK_BYTES // per_group))
    n_ffn = max(8, min(share.n_ffn, OVERHEAD_BLOCK_BYTES // (12 * h)))
    s = RankSlice((0, n_kv * g), (0, n_kv), (0, n_ffn))
    wqkv = torch.randn((s.n_q + 2 * n_kv) * hd, h) / h**0.5
    w_attn = {"norm": torch.ones(h), "wqkv": wqkv, "wo": torch.randn(h, s.n_q * hd) / hd**0.5}
    if cfg.attn_bias:
        w_attn["bqkv"] = torch.zeros(wqkv.shape[0])
    w_mlp = {"norm": torch.ones(h), "wgu": torch.randn(2 * n_ffn, h) / h**0.5, "wdown": torch.randn(h, n_ffn)}
    max_seq = pos + 2
    cache_k, cache_v = torch.zeros(n_kv, max_seq, hd), torch.zeros(n_kv, max_seq, hd)  # [kv, S, hd]
    cos, sin = layers.rope_tables(cfg, max_seq)
    kv_of_q = torch.tensor(s.kv_of_q(g), dtype=torch.long)
    x, out = torch.randn(1, h), torch.empty(1, h)  # [1, h]
    out_np = out.numpy()

    def loop_tail():  # what model.RankModel._layers does after each block (the allreduce aside)
        math.isfinite(out_np.sum())
        x.add_(out, alpha=0.0)

    def attn():
        layers.attention(x, w_attn, cache_k, cache_v, pos, cos, sin, kv_of_q, cfg, out, g)
        loop_tail()

    def mlp():
        layers.mlp(x, w_mlp, cfg, out)
        loop_tail()

    def attn_products():
        layers.linear(x, w_attn["wqkv"])
        layers.linear(out[:, : s.n_q * hd], w_attn["wo"])

    def mlp_products():
        layers.linear(layers.linear(x, w_mlp["wgu"])[:, :n_ffn], w_mlp["wdown"])

    share = cpu_share()
    return (_cpu_difference(attn, attn_products, TIME_S / 2) / share,
            _cpu_difference(mlp, mlp_products, TIME_S / 2) / share)


def token_overhead(cfg: ModelConfig) -> float:
    """Seconds of rank 0's work per decoded token besides the head's products: the final norm, the finite
    check of the logits and their padding, greedy sampling over the vocabulary."""
    from ..sampling import SamplingConfig, sample

    x, norm = torch.randn(1, cfg.hidden), torch.ones(cfg.hidden)
    logits = torch.randn(cfg.vocab)  # [V]
    samp, gen = SamplingConfig(temperature=0.0), torch.Generator().manual_seed(0)

    def work():
        layers.rms_norm(x, norm, cfg.norm_eps)
        math.isfinite(logits.sum())
        sample(logits, samp, gen, None)

    return _cpu_difference(work, lambda: None, TIME_S / 2) / cpu_share()


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


