"""Which devices take part, with what share, memory mode and allreduce: an exact search.

Shares are whole units out of UNITS (ratios for shard.py). For one device and u units the per-token
cost is, from the cost model's parts: C (its layer blocks' compute) and R (reading its streamed blocks), with
the memory mode the fastest that fits (everything resident, else a budget of the memory it may use, the
rest streamed through a window). With A the communication of one token (2 x layers allreduces and
rank 0's broadcasts, fixed once the number of ranks k, the slowest link and the algorithm are fixed) plus
rank 0's output head (every rank waits for it before the next token):
    cost(u) = max(C + A, R)   reading overlaps compute and allreduces (window >= 2)
              C + R + A       a window of 1 (no overlap)
and a token takes the largest cost over the ranks (every allreduce waits for the slowest). For each
algorithm, k and slowest link, a dynamic program over devices finds the units minimising that largest
cost exactly (min over u of max(best of the devices before, cost of this one)), with the master (device 0:
it holds the tokenizer and the head, and sees the prompt) always in.

The min-max objective is exact when the slowest rank is the same in every block. The token time is in
fact a sum over blocks of the slowest rank in each (an attention block's fixed cost may differ from an
MLP block's from device to device), so the best few optima of every combination, and of every device
forced in and out, are predicted in full by costmodel.predict with shard.py's split of their ratios,
and the plan is the best of those predictions. A greedy heuristic (shares in proportion to speed, then
dropping the slowest device while that helps) is printed as a cross-check, and its plan is predicted with
the others. Links: for every (slowest latency, lowest bandwidth) the workers' links define, only workers
within it may take part, and the communication is costed at it (link_sets).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import UsageError
from ..shard import RankSlice
from ..store import split_plan, store_formats
from .costmodel import (
    CTRL_BYTES,
    F32,
    Mode,
    Prediction,
    _params,
    allreduce_seconds,
    bcast_seconds,
    block_seconds,
    predict,
    rank_memory,
)

UNITS = 60
ALGOS = ("star", "tree", "ring", "mpi")
USABLE = 0.85  # of a device's memory the plan may fill: the rest for the page cache and the unexpected
INF = math.inf


@dataclass(frozen=True)
class Settings:
    """What the plan is for."""

    dtype: str = "float32"
    prompt_tokens: int = 32
    new_tokens: int = 32
    max_seq: int = 1024
    chunk: int = 256
    io: str = "cache"
    algos: tuple[str, ...] = ALGOS


@dataclass(frozen=True)
class Share:
    """One device at one share: its mode and the cost model's parts for one decoded token."""

    mode: Mode | None  # None: does not fit at this share
    compute_s: float
    read_s: float
    window: int
    peak_bytes: int


def approx_slice(cfg, u: int, units: int, granule: int = 1) -> RankSlice:
    """The largest slice a share of u units can get from shard.py's rounding (ceil of each count; FFN
    columns in whole granules, as a quantized store cuts them)."""
    q = min(cfg.n_heads, math.ceil(cfg.n_heads * u / units))
    kv = min(cfg.n_kv_heads, math.ceil(q / cfg.group))
    f = min(cfg.ffn, granule * math.ceil(cfg.ffn * u / units / granule))
    return RankSlice((0, q), (0, kv), (0, f))


def choose_mode(cfg, s: RankSlice, rank: int, world: int, dev, st: Settings):
    """(mode, specs, memory plan) of the fastest mode that fits this device: resident, else a budget
    (as many resident blocks as fit, the rest streamed; reported as a window when none fit)."""
    usable = int(USABLE * dev.mem_bytes)
    res = Mode("resident")
    specs, mp = rank_memory(cfg, s, rank, world, st.dtype, st.max_seq, res.options(st.chunk, st.io))
    if mp.total <= usable:
        return res, specs, mp
    mode = Mode("budget", budget=usable)
    try:
        specs, mp = rank_memory(cfg, s, rank, world, st.dtype, st.max_seq, mode.options(st.chunk, st.io))
    except UsageError:  # even one streamed block does not fit
        return None, specs, mp
    if mp.total > usable:
        return None, specs, mp
    if not mp.resident:
        mode = Mode("window", window=mp.window)
    return mode, specs, mp


def share_cost(cfg, dev, rank: int, world: int, s: RankSlice, st: Settings) -> Share:
    """The cost model's per-token parts for one device holding slice s."""
    mode, specs, mp = choose_mode(cfg, s, rank, world, dev, st)
    if mode is None:
        return Share(None, INF, INF, 0, mp.total)
    # layer blocks only: rank 0's head runs after the last layer while the others wait, so its time is
    # added to every rank's cost (head_seconds), not to rank 0's alone
    c = sum(block_seconds(dev, st.dtype, k, _params(sp.layout))
            for k, sp in zip(["attn", "mlp"] * cfg.n_layers, specs[: 2 * cfg.n_layers]))
    streamed = sum(sp.layout.nbytes for b, sp in enumerate(specs) if b not in mp.resident)
    rate = dev.disk_cache_Bps if st.io in ("cache", "mmap") and streamed <= dev.mem_bytes - mp.total \
        else dev.disk_direct_Bps
    return Share(mode, c, streamed / rate, mp.window, mp.total)


def head_seconds(cfg, dev, st: Settings) -> float:
    """Rank 0's output head for one token on this device (one product over the vocabulary), and its work
    besides (final norm, sampling)."""
    return block_seconds(dev, st.dtype, "head", cfg.vocab * cfg.hidden) + dev.token_overhead_s


def share_table(cfg, devices, st: Settings, units: int = UNITS) -> list[list[Share | None]]:
    """table[d][u]: device d holding u units (None at u = 0: left out)."""
    n, granule = len(devices), store_formats(cfg, st.dtype).granule
    return [[None] + [share_cost(cfg, dev, d, n, approx_slice(cfg, u, units, granule), st)
                      for u in range(1, units + 1)]
            for d, dev in enumerate(devices)]


def comm_seconds(cfg, algo: str, k: int, latency: float, Bps: float) -> float:
    """Communication of one decoded token: 2 x layers allreduces and rank 0's two broadcasts."""
    ar = allreduce_seconds(algo, cfg.hidden * F32, k, latency, Bps)
    return 2 * cfg.n_layers * ar + bcast_seconds(CTRL_BYTES, k, latency, Bps) + \
        bcast_seconds(cfg.hidden * F32, k, latency, Bps)


def cost_row(row: list, A: float) -> np.ndarray:
    """cost(u) of one device for u = 0..units, given A: the communication of a token plus rank 0's head,
    which every rank waits for (0 at u = 0)."""
    out = np.zeros(len(row))
    for u, sh in enumerate(row[1:], 1):
        if sh.mode is None:
            out[u] = INF
        elif sh.window == 1:
            out[u] = sh.compute_s + sh.read_s + A
        else:
            out[u] = max(sh.compute_s + A, sh.read_s)
    return out


def minmax_dp(costs: np.ndarray, k: int, units: int) -> tuple[float, list[int]]:
    """Exactly k devices with u > 0 and the units summing to `units`: the least largest cost and the units
    per device. costs[d][u] for u = 0..units; costs[d][0] = 0 lets d be left out, INF forbids it."""
    n, T = costs.shape[0], units + 1
    t_idx, u_idx = np.meshgrid(np.arange(T), np.arange(T), indexing="ij")  # [t, u]
    valid = (u_idx >= 1) & (u_idx <= t_idx)
    prev_at = np.where(valid, t_idx - u_idx, 0)  # [t, u]: units used before this device
    best = np.full((k + 1, T), INF)  # best[j][t]: j devices in, t units used, over the devices so far
    best[0][0] = 0.0
    choice = np.zeros((n, k + 1, T), dtype=np.int64)  # units given to device d on the best path
    for d in range(n):
        new = np.full_like(best, INF)
        if costs[d][0] == 0.0:
            new[:] = best  # d left out
        for j in range(1, k + 1):
            cand = np.where(valid, np.maximum(best[j - 1][prev_at], costs[d][u_idx]), INF)  # [t, u]
            u = np.argmin(cand, axis=1)
            val = cand[np.arange(T), u]
            better = val < new[j]
            new[j] = np.where(better, val, new[j])
            choice[d][j] = np.where(better, u, 0)
        best = new
    if not math.isfinite(best[k][units]):
        return INF, []
    alloc, j, t = [0] * n, k, units
    for d in range(n - 1, -1, -1):
        u = int(choice[d][j][t])
        alloc[d] = u
        if u:
            j, t = j - 1, t - u
    return float(best[k][units]), alloc


def brute_force(costs: np.ndarray, units: int) -> float:
    """The same optimum by trying every allocation (small clusters only: tests)."""
    from itertools import product

    n, best = costs.shape[0], INF
    for alloc in product(range(units + 1), repeat=n):
        if sum(alloc) == units and alloc[0] > 0:
            best = min(best, max(costs[d][u] for d, u in enumerate(alloc) if u))
    return best


@dataclass(frozen=True)
class Candidate:
    objective: float  # the search's largest per-rank cost of a token
    units: tuple[int, ...]  # per device of the profile, 0 = left out
    algo: str


def candidates(cfg, devices, table, st: Settings, units: int = UNITS, forced: dict | None = None) -> list[Candidate]:
    """The exact optimum of the min-max objective for every algorithm, rank count k and slowest link,
    best first (distinct allocations). forced: {device: True (must take part) or False (must not)}."""
    n = len(devices)
    forced = forced or {}
    found: dict = {}
    links = link_sets(devices)
    for algo in st.algos:
        for k in range(1, n + 1):
            for lat, bw in ([(0.0, INF)] if k == 1 else [lb for s, lb in links.items() if len(s) >= k - 1]):
                A = comm_seconds(cfg, algo, k, lat, bw) + head_seconds(cfg, devices[0], st)
                costs = np.zeros((n, units + 1))
                for d in range(n):
                    costs[d] = cost_row(table[d], A)
                    slower = devices[d].link_latency_s > lat or devices[d].link_Bps < bw
                    if d > 0 and (slower or forced.get(d) is False):
                        costs[d][1:] = INF
                    if d == 0 or forced.get(d) is True:
                        costs[d][0] = INF
                obj, alloc = minmax_dp(costs, k, units)
                key = (tuple(alloc), algo)
                if alloc and (key not in found or obj < found[key].objective):
                    found[key] = Candidate(obj, tuple(alloc), algo)
        if n == 1:
            break
    return sorted(found.values(), key=lambda c: c.objective)


def link_sets(devices) -> dict:
    """{workers allowed: (their slowest latency, their lowest bandwidth)} for every (latency, bandwidth)
    threshold the workers' links define: any set of workers has its slowest link among these."""
    lats = {d.link_latency_s for d in devices[1:]}
    bws = {d.link_Bps for d in devices[1:]}
    out = {}
    for lat in lats:
        for bw in bws:
            ok = frozenset(i for i, d in enumerate(devices) if i and d.link_latency_s <= lat and d.link_Bps >= bw)
            if ok:
                out[ok] = (max(devices[i].link_latency_s for i in ok), min(devices[i].link_Bps for i in ok))
    return out


def search(cfg, devices, table, st: Settings, units: int = UNITS, forced: dict | None = None) -> Candidate | None:
    """The exact optimum of the min-max objective over devices, shares, k, slowest link and algorithm."""
    found = candidates(cfg, devices, table, st, units, forced)
    return found[0] if found else None


def greedy(cfg, devices, table, st: Settings, units: int = UNITS) -> Candidate | None:
    """Cross-check: every device in with units in proportion to its speed (1 / its cost at a full share),
    the best algorithm, then the slowest device dropped while the objective improves."""
    def evaluate(members):
        k = len(members)
        lat, bw = (max(devices[d].link_latency_s for d in members[1:]), min(devices[d].link_Bps for d in members[1:])) \
            if k > 1 else (0.0, INF)
        speed = {d: 1.0 / max(table[d][1].compute_s, 1e-12) for d in members}  # inf compute: no room, speed 0
        total = sum(speed.values())
        if total <= 0:
            return None
        alloc = [0] * len(devices)
        for d in members:
            alloc[d] = max(1, round(units * speed[d] / total))
        alloc[members[0]] += units - sum(alloc)
        if alloc[members[0]] < 1:
            return None
        out = None
        for algo in st.algos:
            A = comm_seconds(cfg, algo, k, lat, bw) + head_seconds(cfg, devices[0], st)
            obj = max(cost_row(table[d], A)[alloc[d]] for d in members)
            if out is None or obj < out.objective:
                out = Candidate(obj, tuple(alloc), algo)
        return out

    members = list(range(len(devices)))
    best = evaluate(members)
    while len(members) > 1:
        slowest = max(members[1:], key=lambda d: table[d][1].compute_s)
        trial = evaluate([d for d in members if d != slowest])
        if trial is None or best is None or trial.objective >= best.objective:
            break
        members.remove(slowest)
        best = trial
    return best


def realize(cfg, devices, cand: Candidate, st: Settings, modes=None) -> tuple[list[int], list[Mode], Prediction]:
    """The candidate as a run: its devices in profile order, shard.py's actual split of its ratios, each
    rank's mode for its actual slice (or the modes given), and the full prediction."""
    members = [d for d, u in enumerate(cand.units) if u]
    ratios = [cand.units[d] for d in members]
    devs = [devices[d] for d in members]
    slices = split_plan(cfg, ratios, store_formats(cfg, st.dtype))
    if modes is None:
        modes = [choose_mode(cfg, s, r, len(devs), dev, st)[0] or Mode("window", window=1)
                 for r, (dev, s) in enumerate(zip(devs, slices))]
    pred = predict(cfg, devs, ratios, modes, st.dtype, cand.algo, prompt_tokens=st.prompt_tokens,
                   new_tokens=st.new_tokens, max_seq=st.max_seq, chunk=st.chunk, io=st.io)
    return members, modes, pred
