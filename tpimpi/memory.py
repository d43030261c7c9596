"""The memory model: what each rank will hold, predicted from shapes before anything is loaded, and the
choice of which blocks stay resident and how many stream, given a window or a memory budget.

Our analogue of TPI-LLM's Prop. 5. Per rank:
  base runtime (Python, numpy, torch, MPI)          BASE_RSS, measured on this project's machines
  resident blocks + window x largest streamed block weights actually held
  dequantization scratch (quantized blocks, or      a slice of rows in float32 (tpimpi.quant.kernels),
    bf16/f16 blocks computed in float32)            never a whole block
  KV cache for --max-seq-len                        2 * layers * kv_heads * max_seq * head_dim * 4, per slot
                                                    (one slot; a server's --max-batch B slots)
  step buffers + star-allreduce receive buffers     (2 + (N-1) on rank 0) * rows * hidden * 4, rows =
                                                    prefill_chunk (+ B - 1 decode rows when serving)
  activations of one prefill chunk                  attention scores and projections
  rank 0: tokenizer, logits                         TOKENIZER_RSS + vocab * 4
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import ModelConfig
from .quant.formats import is_quant
from .errors import UsageError
from .shard import RankSlice
from .store import BlockSpec

BASE_RSS = 240 << 20  # measured: python + numpy + torch 2.13 (CPU) + mpi4py after MPI_Init, x86_64
TOKENIZER_RSS = 40 << 20  # measured: a 49k-token BPE tokenizer loaded with `tokenizers`
MiB = 1 << 20


def parse_size(text: str, option: str = "--mem-budget") -> int:
    """'1.5G', '800M', '2048K' or a byte count -> bytes."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if mult > 1 else t)
    except ValueError:
        raise UsageError(f"{option} {text!r} is not a size (examples: 800M, 1.5G)") from None
    if value <= 0:
        raise UsageError(f"{option} {text!r} must be positive")
    return int(value * mult)


@dataclass(frozen=True)
class MemoryPlan:
    """Which blocks stay resident, how many stream through how many buffers, and the predicted bytes."""

    resident: frozenset[int]
    window: int
    n_blocks: int
    parts: dict[str, int] = field(hash=False)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def streamed(self) -> int:
        return self.n_blocks - len(self.resident)

    def describe(self) -> str:
        mode = "all resident" if not self.streamed else (
            f"{len(self.resident)} resident, {self.streamed} streamed through a window of {self.window}")
        parts = ", ".join(f"{k} {v / MiB:.0f}" for k, v in self.parts.items() if v)
        return f"{self.n_blocks} blocks {mode}; predicted peak {self.total / MiB:.0f} MiB ({parts} MiB)"


def step_rows(chunk: int, slots: int) -> int:
    """Rows of the step buffers: a prefill chunk, or (serving) one chunk beside a decode row per other slot."""
    return chunk if slots == 1 else chunk + slots - 1


def fixed_parts(cfg: ModelConfig, s: RankSlice, rank: int, world: int, max_seq: int, chunk: int,
                slots: int = 1) -> dict[str, int]:
    """Bytes that do not depend on the memory mode; `slots` sequences each with a KV cache (serving)."""
    f32, T, hd = 4, step_rows(min(chunk, max_seq), slots), cfg.head_dim
    attn_tmp = f32 * (T * (s.n_q + 2 * s.n_kv) * hd + 2 * s.n_q * max_seq * hd + 2 * s.n_q * T * max_seq)
    mlp_tmp = f32 * T * 4 * s.n_ffn
    parts = {
        "base": BASE_RSS,
        "kv_cache": slots * 2 * cfg.n_layers * s.n_kv * max_seq * hd * f32,
        "rope": 2 * max_seq * hd * f32,
        "buffers": (2 + (world - 1 if rank == 0 else 0)) * T * cfg.hidden * f32,
        "activations": max(attn_tmp, mlp_tmp),
    }
    if rank == 0:
        parts["tokenizer+logits"] = TOKENIZER_RSS + (1 + (slots if slots > 1 else 0)) * cfg.vocab * f32
    return parts


def _scratch_bytes(specs: list[BlockSpec], compute: str) -> int:
    """The sliced kernel's scratch, if any matrix is multiplied from a narrower stored format."""
    from .quant.kernels import scratch_bytes

    packed = [p.shape[1] for sp in specs for p in sp.layout.parts
              if len(p.shape) == 2 and (is_quant(p.fmt) or (p.fmt != "float32" and compute == "float32"))]
    return scratch_bytes(max(packed)) if packed else 0


class BudgetTooSmall(UsageError):
    """The budget does not hold even the fixed part and one streamed block."""


def too_small_message(budget: int, smallest: MemoryPlan, budget_name: str = "--mem-budget",
                      context: int | None = None) -> str:
    """What the smallest plan holds, which part costs, and the flag that lowers it."""
    fixed = {k: v for k, v in smallest.parts.items() if k != "weights" and v}
    ctx = f" for a context of {context} positions" if context else ""
    return (f"{budget_name} {budget / MiB:.0f} MiB is too small for this rank: before any weights it holds "
            f"{sum(fixed.values()) / MiB:.0f} MiB ({', '.join(f'{k} {v / MiB:.0f}' for k, v in fixed.items())} MiB; "
            f"the KV cache and activations are sized{ctx}), and streaming one block at a time adds "
            f"{smallest.parts['weights'] / MiB:.0f} MiB; lower the context with --max-seq-len, or give it more "
            f"memory, more ranks or a bf16 store")


def plan_memory(specs: list[BlockSpec], fixed: dict[str, int], *, dtype: str, compute: str,
                window: int | None = None, budget: int | None = None, budget_name: str = "--mem-budget",
                context: int | None = None) -> MemoryPlan:
    """Resident set and window for: all resident (neither given), a window, or a budget (which keeps
    as many evenly spaced blocks resident as fit beside a window of 2, or of `window`). A budget too
    small for the fixed part and one streamed block raises BudgetTooSmall naming both."""
    from .scheduler import evenly_spaced

    from .quant.kernels import resident_nbytes

    n = len(specs)
    sizes = [sp.layout.nbytes for sp in specs]
    held_resident = [resident_nbytes(sp.layout, compute) for sp in specs]  # q8_0 repacked for bf16: 40/34
    parts = dict(fixed, scratch=_scratch_bytes(specs, compute))

    def make(resident: set[int], w: int) -> MemoryPlan:
        streamed = [sizes[b] for b in range(n) if b not in resident]
        w = min(w, len(streamed))
        held = sum(held_resident[b] for b in resident) + w * (max(streamed) if streamed else 0)
        return MemoryPlan(frozenset(resident), w, n, dict(parts, weights=held))

    if window is not None and budget is None:
        if not 1 <= window <= n:
            raise UsageError(f"--window {window} is out of range: this rank has {n} blocks (1..{n})")
        return make(set(), window)
    if budget is None:
        return make(set(range(n)), 0)
    everything = make(set(range(n)), 0)
    if everything.total <= budget:
        return everything
    w = window or 2
    smallest = make(set(), w)
    if smallest.total > budget:
        smallest = make(set(), 1)
        if smallest.total > budget:
            raise BudgetTooSmall(too_small_message(budget, smallest, budget_name, context))
        return smallest
    lo, hi = 0, n - 1  # the most evenly spaced resident blocks that still fit
    while lo < hi:
        k = (lo + hi + 1) // 2
        if make(evenly_spaced(n, k), w).total <= budget:
            lo = k
        else:
            hi = k - 1
    return make(evenly_spaced(n, lo), w)
