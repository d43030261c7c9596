"""Running a store on a communicator the way generate does, for comparisons with the reference."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tpimpi.engine import Engine, MemoryOptions, decode_loop
from tpimpi.sampling import SamplingConfig


@dataclass(frozen=True)
class NoStopTokenizer:
    """Generation without end-of-sequence stops, so exactly n tokens come out as in hf_greedy."""

    eos_ids: frozenset = frozenset()

    def decode(self, ids):
        return ""


def prompt_logits(model, head, comm, ids: list[int]) -> np.ndarray | None:
    """Last-position logits of a fresh prefill of ids, fed in the model's chunks (rank 0), None elsewhere."""
    for pos in range(0, len(ids), model.chunk):
        part = ids[pos : pos + model.chunk]
        T = len(part)
        if comm.rank == 0:
            head.embed_into(part, model.x[:T])
        comm.bcast_(model.x_np[:T])
        x = model.forward(T, pos)
        if comm.rank == 0:
            logits = head.logits(x[T - 1])  # every pass, as generate does: the head is in the block cycle
    return logits.numpy().copy() if comm.rank == 0 else None


def run_store(path, comm, ids: list[int], n_new: int, allreduce: str = "star", max_seq: int = 64,
              mem: MemoryOptions = MemoryOptions(resident=True)):
    """(prompt logits, greedy ids) on rank 0 and (None, None) elsewhere."""
    eng = Engine(comm, path, max_seq=max_seq, allreduce=allreduce, mem=mem).load()
    logits = prompt_logits(eng.model, eng.head, comm, ids)
    res = decode_loop(comm, eng.model, eng.head, NoStopTokenizer(), ids, SamplingConfig(), n_new, max_seq,
                      stream=False)
    eng.close()
    return (logits, res["token_ids"]) if comm.rank == 0 else (None, None)


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    """Largest absolute difference relative to the reference's largest magnitude."""
    return float(np.abs(a - ref).max() / np.abs(ref).max())
