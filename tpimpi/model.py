"""One forward step of this rank's share of every layer, with the two allreduces per layer in plain sight."""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from . import layers
from .comm import RankFailure
from .config import ModelConfig
from .memory import step_rows
from .shard import RankSlice
from .store import block_name
from .trace import ALLREDUCE

NO_BLOCK = 1 << 40  # "no block": larger than any block index


class RankModel:
    """This rank's slice of the transformer stack, its KV cache and its preallocated step buffers."""

    def __init__(self, cfg: ModelConfig, s: RankSlice, blocks, comm, max_seq: int, allreduce: str = "star",
                 chunk: int = 256, slots: int = 1):
        self.cfg, self.blocks, self.comm, self.max_seq = cfg, blocks, comm, max_seq
        self.chunk = min(chunk, max_seq)  # most positions one forward call takes (prefill goes in chunks)
        self.slots = slots  # sequences with a KV cache of their own (forward uses slot 0)
        self.rows = step_rows(self.chunk, slots)  # most rows one forward_batch call takes
        h = cfg.hidden
        self.x_np = np.zeros((self.rows, h), dtype=np.float32)  # [T, h] hidden states, same on every rank
        self.part_np = np.zeros((self.rows, h), dtype=np.float32)  # [T, h] this rank's partial sums
        self.x, self.part = torch.from_numpy(self.x_np), torch.from_numpy(self.part_np)
        self.cache_k = torch.zeros(cfg.n_layers, slots, s.n_kv, max_seq, cfg.head_dim)  # [L, B, kv, S, hd]
        self.cache_v = torch.zeros_like(self.cache_k)  # [L, B, kv, S, hd]
        kv_of_q = s.kv_of_q(cfg.group)
        self.kv_of_q = torch.tensor(kv_of_q, dtype=torch.long)  # [q]
        whole_groups = kv_of_q == [j // cfg.group for j in range(s.n_kv * cfg.group)]
        self.group = cfg.group if whole_groups else 0  # lets decode attention skip gathering the cache
        self.cos, self.sin = layers.rope_tables(cfg, max_seq)  # [S, hd] each
        self.windows = [cfg.window(i) for i in range(cfg.n_layers)]  # per layer: 0, or a sliding window
        comm.setup(self.rows * h, allreduce, hidden=h)
        self.t_comm = self.t_forward = 0.0
        self.trace = None  # a trace.Tracer when --trace is on

    def forward(self, T: int, pos: int) -> torch.Tensor:
        """Run positions pos..pos+T whose input hidden states are in x[:T]; returns x[:T], updated in place."""
        assert T <= self.chunk and pos + T <= self.max_seq
        t0 = time.perf_counter()
        return self._layers(T, t0, lambda i, x, part: layers.attention(
            x, self.blocks.get(2 * i), self.cache_k[i, 0], self.cache_v[i, 0], pos, self.cos, self.sin,
            self.kv_of_q, self.cfg, part, self.group, self.windows[i]))

    def _comm_done(self, t: float, nbytes: int) -> None:
        """An allreduce that started at t has ended: its time (and its trace event when tracing)."""
        t1 = time.perf_counter()
        self.t_comm += t1 - t
        if self.trace is not None:
            self.trace.add(ALLREDUCE, t, t1, nbytes)

    def forward_batch(self, segments: list[tuple[int, int, int]]) -> torch.Tensor:
        """Run the rows in x[:T] for several sequences at once: segments [(slot, pos, n), ...] in row order,
        n rows at positions pos..pos+n of the sequence in KV-cache slot `slot`. Returns x[:T], updated."""
        T = sum(n for _, _, n in segments)
        assert T <= self.rows and all(0 <= sl < self.slots and p + n <= self.max_seq for sl, p, n in segments)
        t0 = time.perf_counter()
        step = layers.StepRows(segments, self.cos, self.sin)  # what every layer needs of these rows
        return self._layers(T, t0, lambda i, x, part: layers.attention_batch(
            x, self.blocks.get(2 * i), self.cache_k[i], self.cache_v[i], step, self.kv_of_q, self.cfg, part,
            self.group, self.windows[i]))

    def _layers(self, T: int, t0: float, attention) -> torch.Tensor:
        """Every layer on the rows x[:T]: attention(i, x, part) writes layer i's attention partial sum into
        part; each partial sum is allreduced and added to x, in place. Returns x[:T]."""
        cfg, comm, blocks = self.cfg, self.comm, self.blocks
        x, part, part_np = self.x[:T], self.part[:T], self.part_np[:T]
        first_bad = NO_BLOCK  # the first block whose partial sum on this rank was not finite
        for i in range(cfg.n_layers):
            attention(i, x, part)
            blocks.release(2 * i)
            if first_bad == NO_BLOCK and not math.isfinite(part_np.sum()):  # a sum: no allocation
                first_bad = 2 * i
            t = time.perf_counter()
            comm.allreduce_(part_np)
            self._comm_done(t, part_np.nbytes)
            x += part
            layers.mlp(x, blocks.get(2 * i + 1), cfg, part)
            blocks.release(2 * i + 1)
            if first_bad == NO_BLOCK and not math.isfinite(part_np.sum()):
                first_bad = 2 * i + 1
            t = time.perf_counter()
            comm.allreduce_(part_np)
            self._comm_done(t, part_np.nbytes)
            x += part
        t1 = time.perf_counter()
        self.t_forward += t1 - t0
        if self.trace is not None:
            self.trace.end_step(t0, t1, T)
        if not math.isfinite(self.x_np[:T].sum()):  # the same on every rank, so every rank gets here
            self._non_finite(first_bad)
        return x

    def _non_finite(self, first_bad: int) -> None:
        """Collective, on hidden states that are not finite: every rank raises the same RankFailure naming
        the rank(s) whose partial sum went non-finite first."""
        bad = [b for (b,) in self.comm.gather_ints([first_bad])]  # [ranks]
        first = min(bad)
        if first == NO_BLOCK:
            where = "no rank's partial sum was (the sum of finite partials overflowed)"
        else:
            ranks = [r for r, b in enumerate(bad) if b == first]
            where = (f"the first non-finite partial sum came from rank{'s' if len(ranks) > 1 else ''} "
                     f"{', '.join(map(str, ranks))} in {block_name(first)}")
        raise RankFailure(f"the hidden states are not finite (NaN or infinity): {where}. A damaged weight file "
                          f"gives this; run again with --verify to check every file against the manifest")
