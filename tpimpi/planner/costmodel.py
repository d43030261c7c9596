"""The cost model: predicted time and memory of one configuration, from the model's shapes and the
devices' profiled figures. Pure functions; nothing here measures or runs anything.

A configuration is: the devices taking part (in rank order; rank 0 is the master and the star's hub),
the split (ratios, through shard.py), each rank's memory mode, the storage dtype and the allreduce.

Time. Every rank runs the same cycle of blocks (attention and MLP of each layer; rank 0 then the output
head in chunks, and its per-token work besides them: the final norm, sampling) and all ranks meet at the
allreduce after every layer block. One block on one rank takes
    overhead(kind) + max(weight bytes / matvec rate, 2 x params x T / gemm rate)      (T positions)
where the overhead is the block's work besides its products (norm, rope, attention, the loop's Python)
and the matvec rate was measured streaming the rank's share of the weights with every rank of the node
at work (tpimpi.profile): what caches and the shared memory bus give a run.
A streamed block must also have been read: one reader thread per rank reads blocks in cycle order, block
b+W starting when block b is released (W = window), so reading overlaps the compute and the allreduces
of the W-1 blocks in between. `simulate` plays this out event by event, the allreduce after each layer
block ending a fixed time after the slowest rank arrives, so it finds where ranks wait for a read (the
paper's Prop. 3-4: with W = 2 the read of the next block is hidden when t_attn + t_ar >= tau_mlp and
t_mlp + t_ar >= tau_attn, `steady_condition`) and where they wait for the slowest rank.

Communication. One allreduce of n bytes among k ranks, with the slowest link's latency L and bandwidth B
(links are measured to rank 0; a ring or tree between workers is assumed no faster than that):
    star  2 L + 2 (k-1) n / B           every worker to the hub and back; the hub's link carries k-1 each way
    ring  2 (k-1) (L + n / (k B))       reduce-scatter and allgather of 1/k of the message per step
    tree, mpi, reduce_bcast  2 ceil(log2 k) (L + n / B)
which is also how link.Link emulates a link, so emulated runs check the model.

Memory is memory.py's model, through resources.memory_plan: nothing is re-derived here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import ModelConfig
from ..resources import MemoryOptions, memory_plan
from ..store import DTYPES, split_plan, store_formats
from .devices import Device

CTRL_BYTES = 24  # the control word rank 0 broadcasts every step: 3 int64
F32 = 4
# bytes per weight of each storage format; GGUF's blocks of 32: q8_0 a 2-byte scale + 32 bytes, q4_0 a scale
# + 16 bytes, q4_1 a scale and a minimum + 16 bytes (tpimpi.quant lays them out so)
WEIGHT_BYTES = {**{d: float(s) for d, (_, s) in DTYPES.items()}, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32}


def log2_steps(k: int) -> int:
    """Steps of a binomial tree over k ranks: ceil(log2 k)."""
    return max(0, (k - 1).bit_length())


def allreduce_seconds(algo: str, nbytes: int, k: int, latency_s: float, Bps: float) -> float:
    """One allreduce of nbytes among k ranks over links of this latency and bandwidth."""
    if k <= 1:
        return 0.0
    per_byte = 0.0 if math.isinf(Bps) else 1.0 / Bps
    if algo == "star":
        return 2 * latency_s + 2 * (k - 1) * nbytes * per_byte
    if algo == "ring":
        return 2 * (k - 1) * (latency_s + nbytes / k * per_byte)
    if algo in ("tree", "mpi", "reduce_bcast"):
        return 2 * log2_steps(k) * (latency_s + nbytes * per_byte)
    raise ValueError(f"unknown allreduce {algo!r}")


def bytes_sent(algo: str, rank: int, k: int, nbytes: int) -> int:
    """Bytes one rank sends in one allreduce of nbytes (for traces: the message pattern, not the time)."""
    if k <= 1:
        return 0
    if algo == "star":
        return (k - 1) * nbytes if rank == 0 else nbytes
    if algo == "ring":
        return 2 * (k - 1) * math.ceil(nbytes / k)
    steps = log2_steps(k)  # binomial tree: a rank sends once going up (not the root), then to its children
    up = 0 if rank == 0 else nbytes
    low = (rank & -rank).bit_length() - 1 if rank else steps  # rank's lowest set bit: children below it
    return up + sum(nbytes for m in range(low) if rank + (1 << m) < k)


def bcast_seconds(nbytes: int, k: int, latency_s: float, Bps: float) -> float:
    """Rank 0 broadcasting nbytes: one latency, k-1 copies through the hub's link."""
    if k <= 1:
        return 0.0
    return latency_s + (0.0 if math.isinf(Bps) else (k - 1) * nbytes / Bps)


def rank_memory(cfg, s, rank: int, world: int, dtype: str, max_seq: int, options):
    """(block specs, memory plan) of one rank: memory.py's plan through resources.memory_plan, on the store's
    own layouts of the format (dense or GGUF's quantized blocks)."""
    return memory_plan(cfg, s, rank, world, dtype, max_seq, options)


def block_seconds(dev: Device, dtype: str, kind: str, params: int, T: int = 1) -> float:
    """One block of `params` weights on this device for T positions ('attn', 'mlp' or 'head')."""
    nbytes = params * WEIGHT_BYTES[dtype]
    stream = nbytes / dev.matvec_Bps[dtype]
    flops = 2.0 * params * T / dev.gemm_flops[dtype]
    overhead = {"attn": dev.attn_overhead_s, "mlp": dev.mlp_overhead_s}.get(kind, 0.0)
    return overhead + max(stream, flops if T > 1 else 0.0)


@dataclass(frozen=True)
class Mode:
    """A rank's memory mode: 'resident', 'window' (W buffers) or 'budget' (bytes: resident blocks as fit)."""

    kind: str
    window: int | None = None
    budget: int | None = None

    def options(self, chunk: int = 256, io: str = "cache") -> MemoryOptions:
        return MemoryOptions(resident=self.kind == "resident", window=self.window if self.kind == "window" else None,
                             budget=self.budget if self.kind == "budget" else None, io=io, prefill_chunk=chunk)

    def describe(self) -> str:
        if self.kind == "window":
            return f"window {self.window}"
        if self.kind == "budget":
            return f"budget {self.budget / 2**20:.0f} MiB"
        return "resident"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "window": self.window, "budget": self.budget}

    @classmethod
    def from_dict(cls, d: dict) -> "Mode":
        return cls(d["kind"], d.get("window"), d.get("budget"))


def steady_condition(t_attn: float, t_mlp: float, t_ar: float, tau_attn: float, tau_mlp: float) -> bool:
    """TPI-LLM Prop. 3-4 (window 2): reading is hidden when each block's compute and allreduce cover the
    read of the next block of the other kind."""
    return t_attn + t_ar >= tau_mlp and t_mlp + t_ar >= tau_attn


@dataclass
class StepTimes:
    """Per-rank seconds of one simulated step (prefill chunk or decoded token)."""

    start: float
    end: float
    compute: list
    io_wait: list
    allreduce: list  # in the allreduce, waiting for the slowest rank included


@dataclass(frozen=True)
class Quota:
    """A CPU quota (CFS bandwidth control): the rank may run `cores` x `period` seconds of every period,
    the periods starting at `phase` + k x period. A rank waiting in MPI busy-polls, so it spends its quota
    whether it computes or waits: it runs from each period's start until the quota is used, whatever it
    does. A burst of work w therefore ends about ceil(w / (cores x period)) periods later, and ranks whose
    periods are out of phase wait for each other at every allreduce."""

    cores: float
    period: float
    phase: float = 0.0

    def next_up(self, t: float) -> float:
        """The first moment from t at which the rank may run."""
        x = (t - self.phase) % self.period
        return t if x < self.cores * self.period else t + self.period - x

    def advance(self, t: float, work: float) -> float:
        """When a rank starting at t has run `work` seconds."""
        up = self.cores * self.period
        k, x = divmod(t - self.phase, self.period)
        if x >= up:  # throttled: the next period
            k, x = k + 1, 0.0
        if work <= up - x:
            return self.phase + k * self.period + x + work
        n, rest = divmod(work - (up - x), up)
        if rest == 0:
            return self.phase + (k + n) * self.period + up
        return self.phase + (k + n + 1) * self.period + rest


PHASES = 8  # quota phases averaged over (the runs' cgroups start their periods at unrelated moments)


def quota_phases(devices, n: int = PHASES) -> list[list[Quota | None]]:
    """n phase assignments of the devices' CPU quotas (None: no quota), spread evenly and deterministically:
    assignment j puts rank r's periods at frac(j x (r + 1) x 0.618 + r / k) of its period."""
    k = len(devices)
    return [[Quota(d.cpu_quota, d.cpu_period_s, ((j * (r + 1) * 0.6180339887 + r / k) % 1.0) * d.cpu_period_s)
             if 0 < d.cpu_quota < 1 and d.cpu_period_s > 0 else None for r, d in enumerate(devices)]
            for j in range(n)]


def simulate(compute, read_s, windows, n_sync: int, ar_s, bcast_s, events: list | None = None,
             quotas=None) -> list[StepTimes]:
    """Play out steps of the block cycle on every rank.

    compute[step][rank][block]: seconds of each block; read_s[rank][block]: seconds to read a streamed
    block, None for a resident one; windows[rank]: buffers of its window; n_sync: the first n_sync blocks
    are each followed by an allreduce of ar_s[step] seconds (blocks after them, rank 0's head, are not);
    bcast_s[step]: rank 0's broadcasts that start a step. If `events` is a list, (step, rank, kind, t0, t1)
    intervals are appended to it, kind in compute / io_wait / allreduce / read. quotas[rank]: (cores,
    period, phase) of a CPU quota (`Quota`) or None: that rank computes, and leaves an allreduce, only
    while its quota lets it run (compute is then in seconds at full speed)."""
    quotas = quotas or [None] * len(read_s)
    run = [q.advance if q else (lambda t, w: t + w) for q in quotas]
    up = [q.next_up if q else (lambda t: t) for q in quotas]
    R = len(read_s)
    cyc = [[b for b, t in enumerate(read_s[r]) if t is not None] for r in range(R)]
    submit = [{j: 0.0 for j in range(windows[r])} if cyc[r] else {} for r in range(R)]  # occurrence -> time
    done: list[dict] = [{} for _ in range(R)]
    free = [0.0] * R  # when each rank's reader is next idle
    used = [0] * R  # occurrences of the streamed cycle used so far
    out, t = [], 0.0

    def read_done(r: int, j: int) -> float:
        if j not in done[r]:
            start = max(free[r], submit[r][j])
            free[r] = done[r][j] = start + read_s[r][cyc[r][j % len(cyc[r])]]
            if events is not None:
                events.append((step_i, r, "read", start, free[r]))
            done[r].pop(j - 2 * windows[r] - 1, None)
        return done[r][j]

    for step_i, step in enumerate(compute):
        st = StepTimes(t, t, [0.0] * R, [0.0] * R, [0.0] * R)
        ready = [t + bcast_s[step_i]] * R
        for b in range(max(len(x) for x in step)):
            for r in range(R):
                if b >= len(step[r]):
                    continue
                now = ready[r]
                if read_s[r][b] is not None:
                    j = used[r]
                    used[r] += 1
                    got = read_done(r, j)
                    if got > now:
                        st.io_wait[r] += got - now
                        if events is not None:
                            events.append((step_i, r, "io_wait", now, got))
                        now = got
                    submit[r][j + windows[r]] = run[r](now, step[r][b])
                    submit[r].pop(j, None)
                done_at = run[r](now, step[r][b])
                if events is not None:
                    events.append((step_i, r, "compute", now, done_at))
                st.compute[r] += done_at - now
                ready[r] = now = done_at
            if b < n_sync:
                last = max(ready)
                sync = max(u(last) for u in up) + ar_s[step_i]  # every rank takes part: each must be running
                for r in range(R):
                    st.allreduce[r] += sync - ready[r]
                    if events is not None:
                        events.append((step_i, r, "allreduce", ready[r], sync))
                ready = [sync] * R
        t = st.end = max(ready)
        out.append(st)
    return out


@dataclass(frozen=True)
class RankPrediction:
    peak_bytes: int
    memory: str  # the memory plan's description
    compute_s: float  # per decoded token
    io_wait_s: float
    allreduce_s: float
    read_bytes: int  # per decoded token
    read_Bps: float  # the disk rate assumed (page cache when the streamed bytes fit beside the plan)
    fits: bool
    io_hidden: bool  # Prop. 3-4's condition holds on this rank (always for resident ranks)


@dataclass(frozen=True)
class Prediction:
    ttft_s: float
    s_per_token: float
    allreduce_s: float  # one allreduce of one token's hidden state
    ranks: tuple[RankPrediction, ...]

    @property
    def fits(self) -> bool:
        return all(r.fits for r in self.ranks)


def cluster_link(devices) -> tuple[float, float]:
    """(latency, bandwidth) of the slowest link to rank 0 among the workers."""
    workers = devices[1:]
    if not workers:
        return 0.0, math.inf
    return max(d.link_latency_s for d in workers), min(d.link_Bps for d in workers)


def _params(layout) -> int:
    return sum(math.prod(p.shape) for p in layout.parts)


def predict(cfg: ModelConfig, devices, ratios, modes, dtype: str = "float32", algo: str = "star", *,
            prompt_tokens: int = 32, new_tokens: int = 8, max_seq: int = 1024, chunk: int = 256,
            io: str = "cache", events: list | None = None) -> Prediction:
    """Predicted TTFT, seconds per decoded token and every rank's peak memory for one configuration."""
    k = len(devices)
    slices = split_plan(cfg, ratios, store_formats(cfg, dtype))  # a quantized store cuts FFN in whole groups
    L, B = cluster_link(devices)
    chunks = [min(chunk, prompt_tokens - i) for i in range(0, prompt_tokens, chunk)]
    steps = chunks + [1] * max(1, new_tokens - 1)
    compute, read_s, windows, plans, rates = [[] for _ in steps], [], [], [], []
    for r, (dev, s, mode) in enumerate(zip(devices, slices, modes)):
        specs, mp = rank_memory(cfg, s, r, k, dtype, max_seq, mode.options(chunk, io))
        kinds = ["attn", "mlp"] * cfg.n_layers + ["head"] * (len(specs) - 2 * cfg.n_layers)
        streamed = sum(sp.layout.nbytes for b, sp in enumerate(specs) if b not in mp.resident)
        fits_cache = io in ("cache", "mmap") and streamed <= dev.mem_bytes - mp.total
        rate = dev.disk_cache_Bps if fits_cache else dev.disk_direct_Bps
        read_s.append([None if b in mp.resident else sp.layout.nbytes / rate for b, sp in enumerate(specs)])
        windows.append(mp.window)
        plans.append((mp, streamed))
        rates.append(rate)
        for i, T in enumerate(steps):
            compute[i].append([block_seconds(dev, dtype, kind, _params(sp.layout), 1 if kind == "head" else T)
                               for kind, sp in zip(kinds, specs)])
            if r == 0:  # rank 0's norm and sampling after the head's products
                compute[i][0][-1] += dev.token_overhead_s
    ar = [allreduce_seconds(algo, T * cfg.hidden * F32, k, L, B) for T in steps]
    bc = [bcast_seconds(CTRL_BYTES, k, L, B) + bcast_seconds(T * cfg.hidden * F32, k, L, B) for T in steps]
    n_pre = len(chunks)
    phases = quota_phases(devices)
    if all(q is None for q in phases[0]):
        phases = phases[:1]
    else:  # the profile's figures are averages under the quota: the simulation wants seconds at full speed
        full = [d.cpu_quota if 0 < d.cpu_quota < 1 and d.cpu_period_s > 0 else 1.0 for d in devices]
        compute = [[[c * full[r] for c in blocks] for r, blocks in enumerate(step)] for step in compute]
    runs = [simulate(compute, read_s, windows, 2 * cfg.n_layers, ar, bc, events if j == 0 else None, quotas)
            for j, quotas in enumerate(phases)]
    ttft = sum(times[n_pre - 1].end for times in runs) / len(runs)
    per_token = sum((times[-1].end - times[n_pre - 1].end) / (len(times) - n_pre) for times in runs) / len(runs)
    decode = [t for times in runs for t in times[n_pre:]]
    n = len(decode)
    ranks = []
    for r, dev in enumerate(devices):
        mp, streamed = plans[r]
        c = compute[-1][r]
        tau = [x for x in read_s[r][: 2 * cfg.n_layers : 2] if x is not None] or [0.0]
        tau_m = [x for x in read_s[r][1 : 2 * cfg.n_layers : 2] if x is not None] or [0.0]
        hidden = mp.window != 1 and steady_condition(c[0], c[1], ar[-1], max(tau), max(tau_m)) if mp.streamed else True
        ranks.append(RankPrediction(
            mp.total, mp.describe(), sum(t.compute[r] for t in decode) / n, sum(t.io_wait[r] for t in decode) / n,
            sum(t.allreduce[r] for t in decode) / n, streamed, rates[r], mp.total <= dev.mem_bytes, hidden))
    return Prediction(ttft, per_token, ar[-1], tuple(ranks))
