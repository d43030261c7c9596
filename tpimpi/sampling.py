"""Choosing the next token from logits (greedy, or temperature with top-k and top-p filtering, after an
optional repetition penalty), and finding where generated text meets a stop string."""

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
    repetition_penalty: float = 1.0  # 1 = none; as transformers' RepetitionPenaltyLogitsProcessor

    def __post_init__(self):
        if not (0.0 <= self.temperature <= 100.0):
            raise UsageError(f"--temperature {self.temperature} is out of range 0..100 (0 = greedy)")
        if self.top_k < 0:
            raise UsageError(f"--top-k {self.top_k} is negative (0 = no limit)")
        if not (0.0 < self.top_p <= 1.0):
            raise UsageError(f"--top-p {self.top_p} is out of range (0, 1]")
        if not self.repetition_penalty > 0.0:
            raise UsageError(f"--repetition-penalty {self.repetition_penalty} must be above 0 (1 = no penalty)")


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


def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits [V] with every id in `seen` made less likely: a positive logit divided by the penalty, a
    negative one multiplied (transformers' RepetitionPenaltyLogitsProcessor, over prompt and output ids)."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    score = logits[seen]
    logits = logits.clone()
    logits[seen] = torch.where(score < 0, score * penalty, score / penalty)
    return logits


def sample(logits: torch.Tensor, cfg: SamplingConfig, gen: torch.Generator, seen: torch.Tensor | None = None) -> int:
    """The next token id from logits [V]; `seen` holds the ids so far, for the repetition penalty."""
    if seen is not None:
        logits = penalize_repeats(logits, seen, cfg.repetition_penalty)
    if cfg.temperature == 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p), -1)
    return int(torch.multinomial(probs, 1, generator=gen))


class StopText:
    """Generated text checked against stop strings as it streams.

    Generation stops at the first token whose text completes a stop string, as transformers'
    StopStringCriteria does (a match must overlap the newest token; the text before the answer counts,
    so a stop string may begin in the prompt's last tokens). The answer is the text before the stop
    string. While streaming, text that could be the start of a stop string is held back, so a stop
    string never reaches the terminal.
    """

    def __init__(self, stops: tuple[str, ...] = (), context: str = ""):
        if any(not s for s in stops):
            raise UsageError("--stop needs a non-empty string")
        self.stops = tuple(stops)
        self._text = context if stops else ""  # context, then the generated text
        self._start = self._shown = len(self._text)
        self.stopped = False

    def add(self, piece: str) -> str:
        """Append newly decoded text; return what may be shown now (nothing once stopped)."""
        if self.stopped:
            return ""
        before = len(self._text)
        self._text += piece
        hits = [i for s in self.stops if (i := self._text.find(s, max(0, before - len(s) + 1))) >= 0]
        if hits:
            self.stopped = True
            end = max(min(hits), self._start)
        else:
            end = len(self._text) - self._held_back()
        out = self._text[self._shown:end] if end > self._shown else ""
        self._shown = max(self._shown, end)
        return out

    def _held_back(self) -> int:
        """Length of the longest end of the generated text that begins some stop string."""
        longest = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self._text) - self._start), longest, -1):
                if self._text.endswith(s[:n]):
                    longest = n
                    break
        return longest

    def finish(self) -> str:
        """The text still held back (no stop string came)."""
        if self.stopped:
            return ""
        out, self._shown = self._text[self._shown:], len(self._text)
        return out

    @property
    def text(self) -> str:
        """The answer: generated text, cut before the stop string if one came."""
        return self._text[self._start:max(self._shown, self._start)] if self.stopped else self._text[self._start:]
