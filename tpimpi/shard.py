"""All split arithmetic: which heads, KV heads and FFN columns each rank owns. Pure functions only.

Query heads and FFN columns are dealt out in contiguous ranges in proportion to per-rank ratios
(largest-remainder rounding, ties to the lower rank); in a quantized store FFN columns go out in whole
quantization groups of 32, and o_proj's columns split at head boundaries, which are whole groups when
head_dim is a multiple of 32 (the converter checks). A rank owns the KV heads its query heads use;
when two ranks' query heads share a KV head, both hold a copy of it, so any rank count works,
including more ranks than KV heads (or than heads: a rank may own no heads and only FFN columns).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .errors import UsageError

MAX_RANKS = 1024
MAX_RATIO = 1e15  # ratios are relative shares; a bound keeps the split arithmetic finite


def split_counts(n: int, ratios: Sequence[float]) -> list[int]:
    """Split n items into len(ratios) counts proportional to ratios, summing exactly to n."""
    total = float(sum(ratios))
    ideal = [n * (r / total) for r in ratios]
    counts = [int(x) for x in ideal]
    order = sorted(range(len(ratios)), key=lambda i: (-(ideal[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def _ranges(counts: Sequence[int]) -> list[tuple[int, int]]:
    out, start = [], 0
    for c in counts:
        out.append((start, start + c))
        start += c
    return out


@dataclass(frozen=True)
class RankSlice:
    """What one rank owns: [start, stop) of query heads, KV heads and FFN columns."""

    q_heads: tuple[int, int]
    kv_heads: tuple[int, int]
    ffn: tuple[int, int]

    @property
    def n_q(self) -> int:
        return self.q_heads[1] - self.q_heads[0]

    @property
    def n_kv(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]

    @property
    def n_ffn(self) -> int:
        return self.ffn[1] - self.ffn[0]

    def kv_of_q(self, group: int) -> list[int]:
        """For each local query head, the index of its KV head within this rank's KV heads."""
        return [h // group - self.kv_heads[0] for h in range(*self.q_heads)]


def plan(n_heads: int, n_kv_heads: int, ffn: int, ratios: Sequence[float], granule: int = 1) -> list[RankSlice]:
    """The split of one layer over len(ratios) ranks. FFN columns go out in units of `granule` (a
    quantized store's group size, so that down_proj's column slices hold whole groups; ffn must divide)."""
    group = n_heads // n_kv_heads
    assert ffn % granule == 0, (ffn, granule)
    ffn_ranges = [(a * granule, b * granule) for a, b in _ranges(split_counts(ffn // granule, ratios))]
    slices = []
    for (q0, q1), f in zip(_ranges(split_counts(n_heads, ratios)), ffn_ranges):
        kv = (q0 // group, (q1 - 1) // group + 1) if q1 > q0 else (0, 0)
        slices.append(RankSlice((q0, q1), kv, f))
    return slices


def parse_ratios(text: str | None, world: int) -> tuple[float, ...]:
    """Parse '--ratios 2,1,1' for `world` ranks; None means equal shares."""
    if world < 1 or world > MAX_RANKS:
        raise UsageError(f"rank count {world} is out of range 1..{MAX_RANKS}")
    if text is None or text == "":
        return (1.0,) * world
    try:
        ratios = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise UsageError(f"--ratios {text!r} is not a comma-separated list of numbers") from None
    if len(ratios) != world:
        raise UsageError(f"--ratios has {len(ratios)} values for {world} ranks; give one per rank")
    if not all(0 < r <= MAX_RATIO for r in ratios):
        raise UsageError(f"--ratios {text!r}: every ratio must be a positive number up to {MAX_RATIO:g}")
    return ratios
