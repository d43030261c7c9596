"""Choosing the next token from logits: greedy, or temperature with top-k and top-p filtering."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import UsageError


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no limit
    top_p: float = 1.0  # 1 = no limit
    seed: int = 0

    def __post_init__(self):
        if not (0.0 <= self.temperature <= 100.0):
            raise UsageError(f"--temperature {self.temperature} is out of range 0..100 (0 = greedy)")
        if self.top_k < 0:
            raise UsageError(f"--top-k {self.top_k} is negative (0 = no limit)")
        if not (0.0 < self.top_p <= 1.0):
            raise UsageError(f"--top-p {self.top_p} is out of range (0, 1]")


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits [V] with all but the top-k and the smallest set reaching probability top_p set to -inf."""
    if top_k and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, -1) >= top_p  # keep the token that crosses top_p
        logits = logits.clone()
        logits[order[drop]] = float("-inf")
    return logits


def sample(logits: torch.Tensor, cfg: SamplingConfig, gen: torch.Generator) -> int:
    """The next token id from logits [V]."""
    if cfg.temperature == 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p), -1)
    return int(torch.multinomial(probs, 1, generator=gen))
