"""Running a store on a communicator the way generate does, for comparisons with the reference."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tpimpi.generate import decode_loop
from tpimpi.head import Head
from tpimpi.model import RankModel
from tpimpi.sampling import SamplingConfig
from tpimpi.scheduler import ResidentBlocks
from tpimpi.store import RankStore


@dataclass(frozen=True)
class NoStopTokenizer:
    """Generation without end-of-sequence stops, so exactly n tokens come out as in hf_greedy."""

    eos_ids: frozenset = frozenset()

    def decode(self, ids):
        return ""


def prompt_logits(model: RankModel, head, comm, ids: list[int]) -> np.ndarray | None:
    """Last-position logits of a fresh prefill of ids (rank 0), None elsewhere."""
    T = len(ids)
    if comm.rank == 0:
        head.embed_into(ids, model.x[:T])
    comm.bcast_(model.x_np[:T])
    x = model.forward(T, 0)
    return head.logits(x[T - 1]).numpy().copy() if comm.rank == 0 else None


def run_store(path, comm, ids: list[int], n_new: int, allreduce: str = "star", max_seq: int = 64):
    """(prompt logits, greedy ids) on rank 0 and (None, None) elsewhere."""
    st = RankStore(path, comm.rank, comm.size)
    head = Head(st) if comm.rank == 0 else None
    model = RankModel(st.cfg, st.slice, ResidentBlocks(st), comm, max_seq, allreduce)
    logits = prompt_logits(model, head, comm, ids)
    res = decode_loop(comm, model, head, NoStopTokenizer(), ids, SamplingConfig(), n_new, max_seq, stream=False)
    st.close()
    return (logits, res["token_ids"]) if comm.rank == 0 else (None, None)


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    """Largest absolute difference relative to the reference's largest magnitude."""
    return float(np.abs(a - ref).max() / np.abs(ref).max())
