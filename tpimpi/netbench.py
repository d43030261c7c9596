"""Allreduce microbenchmark: star, MPI Allreduce, Reduce+Bcast, ring and binomial tree, over message
sizes and an emulated edge link (latency and bandwidth injected per message, as the kernel here has
no netem), to reproduce TPI-LLM's Prop. 1: at the sizes of one token's hidden state, latency and
not bandwidth is the cost, and the star's two message latencies beat the ring's 2(N-1).

    mpirun -np 8 python -m tpimpi.netbench --link-latency-ms 1 --link-bandwidth-mbps 300

Rank 0 appends one JSON line per (algorithm, size) to --out and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import numpy as np

from . import comm as comm_mod
from .errors import TpimpiError, UsageError
from .wire import WIRES

DEFAULT_SIZES = "576,1024,2048,4096,8192"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tpimpi.netbench", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default=DEFAULT_SIZES, help="message sizes in float32 elements")
    p.add_argument("--algos", default=",".join(comm_mod.CONCRETE_ALGOS), help="any of "
                   f"{', '.join(comm_mod.ALLREDUCE_ALGOS)} (auto: what it picks for each size, measured at start-up)")
    p.add_argument("--wire", choices=WIRES, default="float32", help="partials on the wire (stars and auto only)")
    p.add_argument("--note", action="append", default=[], metavar="KEY=VALUE",
                   help="a field to add to every record (e.g. transport=netns-tcp hosts=8)")
    p.add_argument("--reps", type=int, default=30, help="timed calls of each algorithm at each size")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds the calls are spread over (each "
                   "round runs every algorithm in turn, so drift of the machine or the links falls on all alike)")
    p.add_argument("--link-latency-ms", type=float, default=0.0)
    p.add_argument("--link-bandwidth-mbps", type=float, default=0.0)
    p.add_argument("--out", default="data/results/allreduce.jsonl")
    args = p.parse_args(argv)
    comm = comm_mod.world()
    try:
        if comm.size < 2:
            raise UsageError("run it under mpirun with at least 2 ranks")
        sizes = [int(x) for x in args.sizes.split(",")]
        algos = args.algos.split(",")
        bad = set(algos) - set(comm_mod.ALLREDUCE_ALGOS)
        if bad or min(sizes) < 1 or args.reps < 1 or args.rounds < 1:
            raise UsageError(f"unknown algorithms {sorted(bad)}, or sizes/reps/rounds below 1")
        for a in algos:
            comm_mod.check_wire(a, args.wire)
        notes = dict(n.split("=", 1) for n in args.note if "=" in n)
        if len(notes) != len(args.note):
            raise UsageError(f"--note takes KEY=VALUE, not {args.note}")
        comm.link = comm_mod.Link.from_cli(args.link_latency_ms, args.link_bandwidth_mbps)
    except (TpimpiError, ValueError) as e:
        if comm.rank == 0:
            print(f"tpimpi.netbench: error: {e}", file=sys.stderr)
        return 2
    # auto: its start-up timings, at every size from the smallest asked up to the largest (as a model
    # measures from one token's hidden state up); without hidden it timed only the largest size
    comm.setup(max(sizes), "auto" if "auto" in algos else "star", args.wire, hidden=min(sizes))
    rows = []
    rounds = min(args.rounds, args.reps)
    per_round = -(-args.reps // rounds)
    for n in sizes:
        buf = np.zeros(n, dtype=np.float32)  # zeros: repeated in-place sums cannot overflow
        times = comm.time_rounds(algos, buf, rounds, per_round)  # seconds per call, a figure per round
        for algo in algos:
            rows.append({"system": "allreduce", "algo": algo, "ranks": comm.size, "elems": n,
                         "median_s": float(np.median(times[algo])), "link_latency_ms": args.link_latency_ms,
                         "link_bandwidth_mbps": args.link_bandwidth_mbps, "reps": rounds * per_round,
                         "rounds": rounds, "wire": args.wire, "hosts": len(set(comm.hosts)), **notes,
                         **(auto_fields(comm, n) if algo == "auto" else {})})
    if comm.rank == 0:
        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(dict(r, time=stamp, command=" ".join(sys.argv))) + "\n")
        where = " ".join(f"{k}={v}" for k, v in notes.items())
        print(f"{comm.size} ranks on {len(set(comm.hosts))} hosts{', ' + where if where else ''}; emulated link "
              f"{args.link_latency_ms} ms / {args.link_bandwidth_mbps or 'unlimited'} Mbps; wire {args.wire}; "
              "median over the rounds of the mean call, microseconds:")
        print("floats   " + "".join(f"{a:>14}" for a in algos))
        for n in sizes:
            print(f"{n:<9}" + "".join(f"{r['median_s'] * 1e6:14.1f}" for r in rows if r["elems"] == n))
    return 0


def auto_fields(comm, n: int) -> dict:
    """What auto chose for n floats, and the medians its start-up measurement saw at that size, ms."""
    m = next(m for m, _ in comm._auto if n <= m or m == comm._auto[-1][0])
    return {"auto_pick": dict(comm._auto)[m], "auto_seen_size": m,
            "auto_seen_ms": {a: round(t * 1e3, 3) for a, t in comm.auto_seen.get(m, {}).items()}}


if __name__ == "__main__":
    sys.exit(main())
