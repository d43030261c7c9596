"""Profile the devices of a cluster for the planner: every rank measures its own device.

    mpirun -np N python -m tpimpi.profile [--model M] [--out cluster.json]

Each rank measures, at the model's shapes and with the threads a run would use, all ranks at once:
one-token products over its share of the model's weights and prefill products, for every storage format
(weight bytes/s, flops/s), the work of an attention and an MLP block besides their products (and on
rank 0 the per-token work besides the head's products), the memory it may plan for (its cgroup's limit
included), O_DIRECT and page-cache reads of a 64 MiB temporary file on the store's file system, and (one
rank at a time) a ping-pong with rank 0 at a few message sizes. Rank 0 writes one JSON profile: every rank's device, host names, ranks per host.
Pass the same --link-latency-ms / --link-bandwidth-mbps as the runs to profile an emulated network.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from . import comm as comm_mod
from .cpulimit import own_quota
from .engine import collective
from .resources import available_memory, set_threads
from .errors import TpimpiError, UsageError
from .memory import BASE_RSS
from .models import cache_root, is_store
from .planner.devices import Device, Profile
from .planner.measure import (CYCLE_BYTES, MAX_CYCLE, PRODUCTS, block_overheads, disk_rates, model_weight_bytes,
                              product_rates, token_overhead)
from .planner.planfile import resolve_model

PING_SIZES = (8, 64 << 10, 1 << 20)  # bytes: latency, then bandwidth from the slope
PING_REPS = (20, 8, 4)
JSON_SLOT = 1 << 14  # bytes of one rank's figures when gathered


def _gather_json(comm, obj) -> list:
    """Every rank's JSON-able object, on every rank (through int64 words: no pickling)."""
    raw = json.dumps(obj).encode()
    if len(raw) > JSON_SLOT:
        raise TpimpiError(f"rank {comm.rank}'s figures take {len(raw)} bytes, more than {JSON_SLOT}")
    buf = np.zeros(JSON_SLOT, dtype=np.uint8)
    buf[: len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    rows = comm.gather_ints(buf.view(np.int64))
    return [json.loads(np.array(r, dtype=np.int64).view(np.uint8).tobytes().rstrip(b"\0")) for r in rows]


def measure_links(comm) -> tuple[float, float]:
    """(latency s, bandwidth B/s) between this rank and rank 0, measured one worker at a time: the median
    round trip, or the fastest where a rank has a CPU quota (a round trip waiting for a throttled rank's
    next period measures the quota, which the cost model plays out itself, not the link)."""
    quota = [q for (q,) in comm.gather_ints([int(not math.isinf(own_quota()[0]))])]
    stat = np.min if any(quota) else np.median
    lat = bw = 0.0
    for peer in range(1, comm.size):
        if comm.rank in (0, peer):
            t = [comm.pingpong(peer if comm.rank == 0 else 0, np.zeros(n, dtype=np.uint8), reps, stat)
                 for n, reps in zip(PING_SIZES, PING_REPS)]
            if comm.rank == peer:
                lat = t[0]
                slope = (t[-1] - t[0]) / (PING_SIZES[-1] - PING_SIZES[0])
                bw = 1.0 / slope if slope > 0 else float("inf")
        comm.barrier()
    return lat, bw


def measure_device(comm, cfg, dtypes, threads: int, disk_dir: str, disk_bytes: int) -> dict:
    """This rank's figures. Every rank times its products at the same time (a barrier before each format),
    as in a run: ranks sharing a node share its cores, caches and memory bus. One-token products cycle
    through this rank's equal share of the model's weights, as decode does, up to half the memory the
    runtime leaves (and MAX_CYCLE)."""
    mem = int(available_memory())
    room = max(16 << 20, (mem - BASE_RSS) // 2)
    rates = {}
    for d in dtypes:
        share = model_weight_bytes(cfg, PRODUCTS[d].itemsize) // comm.size
        comm.barrier()
        rates[d] = product_rates(cfg, comm.size, d, cycle_bytes=min(MAX_CYCLE, room, max(CYCLE_BYTES, share)))
    comm.barrier()
    attn, mlp = block_overheads(cfg, comm.size)
    token = token_overhead(cfg) if comm.rank == 0 else 0.0
    try:
        direct, cached, _ = disk_rates(disk_dir, disk_bytes)
    except OSError as e:
        raise TpimpiError(f"cannot measure the disk in {disk_dir!r} ({e.strerror or e}); pass --disk-dir") from None
    cores = len(os.sched_getaffinity(0))
    quota, period = own_quota()
    return {"host": platform.node(), "matvec_Bps": {d: r[0] for d, r in rates.items()},
            "gemm_flops": {d: r[1] for d, r in rates.items()}, "attn_overhead_s": attn, "mlp_overhead_s": mlp,
            "token_overhead_s": token, "mem_bytes": mem, "disk_direct_Bps": direct, "disk_cache_Bps": cached,
            "cores": cores, "threads": threads, "cpu_quota": 0.0 if math.isinf(quota) else quota,
            "cpu_period_s": period}


def run(comm, argv=None) -> int:
    p = argparse.ArgumentParser(prog="tpimpi.profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="store, .gguf, Hugging Face directory or a shape name of tpimpi.synth "
                   "(llama2-70b, ...): the shapes products are measured at (default: the default model)")
    p.add_argument("--out", default="cluster.json", help="where rank 0 writes the profile")
    p.add_argument("--dtypes", default=",".join(PRODUCTS), help="storage formats to measure")
    p.add_argument("--threads", type=int, help="threads per rank (default: as a run: cores / local ranks)")
    p.add_argument("--disk-dir", help="a directory on the store's file system (default: the store given as "
                   "--model, else $TPIMPI_CACHE, where converted stores go)")
    p.add_argument("--disk-mib", type=int, default=64, help="size of the temporary file the disk is read from")
    p.add_argument("--link-latency-ms", type=float, default=0.0, help="emulated link, as in the runs")
    p.add_argument("--link-bandwidth-mbps", type=float, default=0.0)
    args = p.parse_args(argv)
    dtypes = args.dtypes.split(",")
    bad = [d for d in dtypes if d not in PRODUCTS]
    if bad:
        raise UsageError(f"--dtypes {','.join(bad)}: not a storage format (known: {', '.join(PRODUCTS)})")
    comm.link = comm_mod.Link.from_cli(args.link_latency_ms, args.link_bandwidth_mbps)
    t0 = time.perf_counter()
    cfg_json = collective(comm, lambda: json.dumps(resolve_model(args.model)[0].to_dict()) if comm.rank == 0 else "")
    from .config import ModelConfig

    cfg = ModelConfig.from_dict(json.loads(comm.bcast_bytes(cfg_json.encode()).decode()))
    threads = set_threads(args.threads)
    disk_dir = args.disk_dir or (args.model if args.model and is_store(Path(args.model)) else str(cache_root()))
    comm.barrier()
    if args.disk_mib < 1:
        raise UsageError(f"--disk-mib {args.disk_mib} must be at least 1")
    mine = collective(comm, measure_device, comm, cfg, dtypes, threads, disk_dir, args.disk_mib << 20)
    lat, bw = measure_links(comm)
    mine.update(link_latency_s=lat, link_Bps=None if comm.rank == 0 or bw == float("inf") else bw)
    if comm.rank != 0 and mine["link_Bps"] is None:
        mine["link_Bps"] = 1e12  # no measurable slope: as good as unlimited (JSON has no infinity)
    ar = {}
    if comm.size > 1:
        comm.setup(cfg.hidden, "star")
        buf = np.zeros(cfg.hidden, dtype=np.float32)
        ar = {a: comm.time_allreduce(a, buf, 10) for a in comm_mod.CONCRETE_ALGOS}
    figures = _gather_json(comm, mine)
    if comm.rank == 0:
        prof = Profile(tuple(Device.from_dict(f, f"rank {i}") for i, f in enumerate(figures)),
                       args.model or "default", ar or None)
        extra = {"config": cfg.to_dict(), "link_emulated": {"latency_ms": args.link_latency_ms,
                                                            "bandwidth_mbps": args.link_bandwidth_mbps},
                 "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": time.perf_counter() - t0}
        tmp = f"{args.out}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(prof.to_json(extra))
        os.replace(tmp, args.out)
        hosts = ", ".join(f"{h} ({len(r)} ranks)" for h, r in prof.hosts.items())
        print(f"profiled {comm.size} ranks on {hosts} in {time.perf_counter() - t0:.1f} s -> {args.out}",
              file=sys.stderr)
        for i, d in enumerate(prof.devices):
            mv = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in d.matvec_Bps.items())
            link = f"link {d.link_latency_s * 1e3:.2f} ms, {d.link_Bps * 8 / 1e6:.0f} Mbps" if i else "master"
            print(f"  rank {i}: products GB/s {mv}; blocks {d.attn_overhead_s * 1e3:.2f}/{d.mlp_overhead_s * 1e3:.2f} "
                  f"ms{f', token {d.token_overhead_s * 1e3:.2f} ms' if i == 0 else ''}; memory {d.mem_bytes / 2**20:.0f} MiB; disk {d.disk_direct_Bps / 1e9:.2f} GB/s direct, "
                  f"{d.disk_cache_Bps / 1e9:.1f} cached; {link}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    comm = comm_mod.world()
    try:
        return run(comm, argv)
    except (TpimpiError, OSError) as e:
        if comm.rank == 0:
            print(f"tpimpi: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
