"""What this rank's node offers and what a run will hold there: memory, cgroup limits, threads, plans.

Facts the engine reads before and after generating (available memory, the memory cgroup's limit and
peak, VmHWM), the thread policy for the matrix products, and the memory plan of every rank printed by
`--plan`. Nothing here runs a model.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from pathlib import Path

import torch

from . import comm as comm_mod
from . import lowmem, native
from .errors import UsageError
from .memory import BudgetTooSmall, fixed_parts, parse_size, plan_memory
from .store import rank_specs

DEFAULT_MAX_SEQ = 2048


def peak_rss() -> int:
    """This process's peak resident memory. VmHWM belongs to the process's own address space; getrusage's
    ru_maxrss can carry over the parent's peak when a large parent started it with vfork."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> None:
    """Start VmHWM again from the current RSS (Linux: 5 to /proc/self/clear_refs); elsewhere a no-op."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


@dataclass(frozen=True)
class MemoryOptions:
    """How blocks are held: all resident, a window, or a budget (None: this node's free memory)."""

    resident: bool = False
    window: int | None = None
    budget: int | None = None
    io: str = "cache"
    compute: str = "float32"
    prefill_chunk: int = 256

    @classmethod
    def from_args(cls, args) -> "MemoryOptions":
        return cls(args.resident, args.window, parse_size(args.mem_budget) if args.mem_budget else None,
                   args.io, args.compute, args.prefill_chunk)


def available_memory() -> int:
    """Memory one rank may plan for: the node's available memory shared among its ranks, or the limit of
    the rank's memory cgroup if lower (its own when it is alone in the cgroup, as under tpimpi.lowmem;
    otherwise shared among the node's ranks, as in a Slurm job's cgroup)."""
    local = comm_mod.local_size()
    avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    avail //= local
    limit, alone = lowmem.own_limit()
    if limit is not None:
        avail = min(avail, limit if alone else limit // local)
    return avail


def cgroup_figures() -> tuple[int, int]:
    """(memory limit, peak usage) of this process's memory cgroup in bytes, 0 where there is none."""
    cg = lowmem.own_cgroup()
    limit = lowmem.limit_of(*cg) if cg else None
    if limit is None:  # an unlimited cgroup's peak is other processes' too
        return 0, 0
    return limit, lowmem.peak_usage(*cg) or 0


def memory_plan(cfg, s, rank, world, dtype, max_seq, mem: MemoryOptions, data_start: int = 0, slots: int = 1):
    """(block specs, memory plan) of one rank: a pure function of the shapes and the options (and of the
    KV-cache slots: one, or a server's --max-batch)."""
    specs0 = rank_specs(cfg, s, rank, dtype)
    head_chunk = max(sp.layout.nbytes for sp in specs0)  # head chunks no larger than a layer block
    specs = rank_specs(cfg, s, rank, dtype, head_chunk, data_start)
    fixed = fixed_parts(cfg, s, rank, world, max_seq, mem.prefill_chunk, slots)
    name = "--mem-budget"
    if mem.resident:
        budget, window = None, None
    elif mem.window is not None:
        budget, window = None, mem.window
    elif mem.budget:
        budget, window = mem.budget, None
    else:
        budget, window = int(0.8 * available_memory()), None
        name = "the default memory budget (0.8 x the memory available to this rank) of"
    try:
        return specs, plan_memory(specs, fixed, dtype=dtype, compute=mem.compute, window=window, budget=budget,
                                  budget_name=name, context=max_seq)
    except BudgetTooSmall as e:
        fits = _largest_context(cfg, s, rank, world, dtype, max_seq, mem, specs, budget, slots)
        raise BudgetTooSmall(f"{e} (--max-seq-len {fits} fits)" if fits else str(e)) from None


def _largest_context(cfg, s, rank, world, dtype, max_seq, mem: MemoryOptions, specs, budget,
                     slots: int = 1) -> int | None:
    """The largest power-of-two context below max_seq (down to 64) whose plan fits the budget, if any."""
    n = 1 << (max_seq - 1).bit_length() - 1
    while n >= 64:
        try:
            plan_memory(specs, fixed_parts(cfg, s, rank, world, n, mem.prefill_chunk, slots), dtype=dtype,
                        compute=mem.compute, budget=budget)
            return n
        except BudgetTooSmall:
            n //= 2
    return None


def plan_report(model, world, ratios, dtype, max_seq, mem: MemoryOptions, slots: int = 1) -> str:
    """What every rank would hold, from the model's shapes alone (nothing is converted or loaded)."""
    from .models import default_model_path, is_store
    from .sources import open_source
    from .store import load_manifest, split_plan, store_formats

    if model is not None and is_store(Path(model)):
        m = load_manifest(model)
        cfg, dtype, ratios = m["config"], m["dtype"], m["ratios"]
        if m["world"] != world:
            raise UsageError(f"store {model!r} is split for {m['world']} ranks, not {world}")
    else:
        cfg = open_source(model or default_model_path()).config
        dtype = dtype or "float32"
    max_seq = max_seq or min(cfg.max_context, DEFAULT_MAX_SEQ)
    lines = [f"{cfg.arch}: {cfg.n_layers} layers, hidden {cfg.hidden}, {cfg.n_heads} heads ({cfg.n_kv_heads} KV), "
             f"FFN {cfg.ffn}, vocab {cfg.vocab}; {world} ranks, {dtype}, context {max_seq}"
             + (f", {slots} KV-cache slots" if slots > 1 else "")]
    for r, s in enumerate(split_plan(cfg, ratios, store_formats(cfg, dtype))):
        _, mp = memory_plan(cfg, s, r, world, dtype, max_seq, mem, slots=slots)
        lines.append(f"rank {r}: heads {s.q_heads[0]}-{s.q_heads[1] - 1} ({s.n_q}), KV {s.n_kv}, FFN {s.n_ffn}: "
                     f"{mp.describe()}")
    return "\n".join(lines)


def set_threads(threads: int | None, matmul: str = "blas") -> int:
    """Threads per rank (the cores divided among the ranks of this node, unless given) for the library that
    does the matrix products: for float32 ("blas") the compiled kernel of tpimpi.native, or numpy's BLAS
    without it; torch for bfloat16 compute or the baselines ("torch"). The other pools get one thread: two pools of busy-waiting threads on the same cores slow
    each other down tenfold (measured; BENCHMARKS.md)."""
    from threadpoolctl import threadpool_limits

    n = threads or max(1, len(os.sched_getaffinity(0)) // comm_mod.local_size())
    native.threads = n
    # float32 with the compiled kernel (tpimpi.native): it takes the threads for resident matrices; BLAS
    # keeps one (streamed blocks then multiply on one thread), as its idle threads would spin beside it
    blas = n if matmul == "blas" and not native.available() else 1
    threadpool_limits(blas, user_api="blas")
    torch.set_num_threads(1 if matmul == "blas" else n)
    return n


def threads_in_use() -> int:
    """The largest of torch's, the BLAS's and the compiled kernel's thread counts in this process: the threads
    the products use."""
    from threadpoolctl import threadpool_info

    return max([torch.get_num_threads(), native.threads if native.available() else 1]
               + [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"])


