"""One forward step of this rank's share of every layer, with the two allreduces per layer in plain sight."""

from __future__ import annotations

import time

import numpy as np
import torch

from . import layers
from .config import ModelConfig
from .shard import RankSlice


class RankModel:
    """This rank's slice of the transformer stack, its KV cache and its preallocated step buffers."""

    def __init__(self, cfg: ModelConfig, s: RankSlice, blocks, comm, max_seq: int, allreduce: str = "star",
                 chunk: int = 256):
        self.cfg, self.blocks, self.comm, self.max_seq = cfg, blocks, comm, max_seq
        self.chunk = min(chunk, max_seq)  # most positions one forward call takes (prefill goes in chunks)
        h = cfg.hidden
        self.x_np = np.zeros((self.chunk, h), dtype=np.float32)  # [T, h] hidden states, same on every rank
        self.part_np = np.zeros((self.chunk, h), dtype=np.float32)  # [T, h] this rank's partial sums
        self.x, self.part = torch.from_numpy(self.x_np), torch.from_numpy(self.part_np)
        self.cache_k = torch.zeros(cfg.n_layers, s.n_kv, max_seq, cfg.head_dim)  # [L, kv, S, hd]
        self.cache_v = torch.zeros_like(self.cache_k)  # [L, kv, S, hd]
        kv_of_q = s.kv_of_q(cfg.group)
        self.kv_of_q = torch.tensor(kv_of_q, dtype=torch.long)  # [q]
        whole_groups = kv_of_q == [j // cfg.group for j in range(s.n_kv * cfg.group)]
        self.group = cfg.group if whole_groups else 0  # lets decode attention skip gathering the cache
        self.cos, self.sin = layers.rope_tables(cfg, max_seq)  # [S, hd] each
        comm.setup(self.chunk * h, allreduce, hidden=h)
        self.t_comm = self.t_forward = 0.0

    def forward(self, T: int, pos: int) -> torch.Tensor:
        """Run positions pos..pos+T whose input hidden states are in x[:T]; returns x[:T], updated in place."""
        cfg, comm, blocks = self.cfg, self.comm, self.blocks
        assert T <= self.chunk and pos + T <= self.max_seq
        t0 = time.perf_counter()
        x, part, part_np = self.x[:T], self.part[:T], self.part_np[:T]
        for i in range(cfg.n_layers):
            layers.attention(x, blocks.get(2 * i), self.cache_k[i], self.cache_v[i], pos, self.cos, self.sin,
                             self.kv_of_q, cfg, part, self.group)
            blocks.release(2 * i)
            t = time.perf_counter()
            comm.allreduce_(part_np)
            self.t_comm += time.perf_counter() - t
            x += part
            layers.mlp(x, blocks.get(2 * i + 1), cfg, part)
            blocks.release(2 * i + 1)
            t = time.perf_counter()
            comm.allreduce_(part_np)
            self.t_comm += time.perf_counter() - t
            x += part
        self.t_forward += time.perf_counter() - t0
        return x
