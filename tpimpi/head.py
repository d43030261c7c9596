"""Rank 0's private part: token embedding, final norm and output head. No other rank ever holds these."""

from __future__ import annotations

import torch

from .layers import rms_norm
from .scheduler import TORCH_DTYPES
from .store import RankStore


class Head:
    """Embedding lookup and logits on rank 0."""

    def __init__(self, store: RankStore):
        cfg, td = store.cfg, TORCH_DTYPES[store.dtype]
        self.cfg = cfg

        def load(name, shape):
            return torch.from_numpy(store.read_tensor(name)).view(td).view(shape).float()

        self.embed = load("embed", (cfg.vocab, cfg.hidden))  # [V, h]
        self.norm = load("final_norm", (cfg.hidden,))  # [h]
        self.out = self.embed if cfg.tied_embeddings else load("head", (cfg.vocab, cfg.hidden))  # [V, h]

    def embed_into(self, ids: list[int], out: torch.Tensor) -> None:
        """out [T, h] <- embedding rows of ids."""
        torch.index_select(self.embed, 0, torch.tensor(ids, dtype=torch.long), out=out)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [h] last hidden state -> logits [V]."""
        return torch.mv(self.out, rms_norm(x.unsqueeze(0), self.norm, self.cfg.norm_eps)[0])
