"""Run a command as if on a slower device: alone in a CPU cgroup with a quota (CFS bandwidth control).

    mpirun -np 3 python -m tpimpi.cpulimit --cpu 0.6,0.6,0.2 -- python -m tpimpi.generate --prompt "..."

--cpu gives the CPU time each rank may use, in cores (0.2 = a fifth of one core), one value for every
rank or one per rank (indexed by the launcher's rank variable). Each process makes a child of its own
CPU cgroup (cgroup v1's cpu controller: cpu.cfs_quota_us over a 10 ms cpu.cfs_period_us, a longer one
below 0.1 cores, where the quota would be under the kernel's 1 ms minimum; cgroup v2: cpu.max), starts
the command in it, waits and removes the cgroup. Combine with tpimpi.lowmem for a device short of both
(`cpulimit --cpu 0.3 -- python -m tpimpi.lowmem --limit 600M -- ...`). Needs root or a delegated cgroup;
where the controller is not writable it says so and exits 2.

Only the standard library is imported here; the cgroup code is tpimpi.cgroup's, shared with tpimpi.lowmem.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from . import cgroup

PERIOD_US = 10_000  # a short period, so a throttled rank pauses for milliseconds, not a tenth of a second
MIN_QUOTA_US, MAX_PERIOD_US = 1_000, 1_000_000  # the kernel's bounds on a quota and a period


def quota_period(cores: float) -> tuple[int, int]:
    """(quota, period) in microseconds for `cores` cores of CPU time: a 10 ms period, longer where the quota
    would be under the kernel's 1 ms minimum (0.03 cores: 1 ms every 33 ms, not 1 ms every 10, which
    would be 0.1 cores)."""
    period = min(MAX_PERIOD_US, max(PERIOD_US, math.ceil(MIN_QUOTA_US / cores)))
    return max(MIN_QUOTA_US, round(cores * period)), period


def own_cpu_cgroup() -> tuple[str, Path] | None:
    """('v1' or 'v2', directory) of this process's CPU cgroup, or None when no cpu controller is mounted."""
    return cgroup.own("cpu")


def make_cpu_cgroup(cores: float) -> Path:
    """A new child CPU cgroup allowed `cores` cores of CPU time; raises OSError."""
    cg = own_cpu_cgroup()
    if cg is None:
        raise OSError("no cpu cgroup controller is mounted")
    kind, parent = cg
    cgroup.remove_stale(parent, "tpimpi-cpu")
    quota, period = quota_period(cores)
    files = ([("cpu.cfs_period_us", str(period)), ("cpu.cfs_quota_us", str(quota))] if kind == "v1"
             else [("cpu.max", f"{quota} {period}")])
    return cgroup.make_child(kind, "cpu", cgroup.mounts("cpu")[kind][1], parent, cgroup.child_name("tpimpi-cpu"),
                             files)


def own_quota() -> tuple[float, float]:
    """(cores, period in seconds) of this process's CPU quota: (inf, 0.0) where it has none (or no cpu
    controller is readable)."""
    cg = own_cpu_cgroup()
    try:
        if cg is None:
            raise OSError
        kind, d = cg
        if kind == "v1":
            quota, period = int((d / "cpu.cfs_quota_us").read_text()), int((d / "cpu.cfs_period_us").read_text())
        else:
            q, per = (d / "cpu.max").read_text().split()
            quota, period = (-1 if q == "max" else int(q)), int(per)
    except (OSError, ValueError):
        return math.inf, 0.0
    return (math.inf, 0.0) if quota <= 0 or period <= 0 else (quota / period, period / 1e6)


def parse_cores(text: str, rank: int) -> float:
    """This rank's cores from '0.5' or '0.6,0.6,0.2'; ValueError when there is no positive value for it."""
    values = [float(x) for x in text.split(",")]
    v = values[0] if len(values) == 1 else values[rank]
    if not v > 0:
        raise ValueError(f"{v} is not a positive number of cores")
    return v


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tpimpi.cpulimit", description=__doc__.split("\n\n")[0],
                                usage="python -m tpimpi.cpulimit --cpu CORES[,CORES...] -- COMMAND ...")
    p.add_argument("--cpu", required=True, help="cores of CPU time: one value, or one per rank")
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    cmd = cgroup.Command("tpimpi.cpulimit", args.command)
    if not cmd.argv:
        return cmd.refuse(f"no command given (usage: python -m {cmd.prog} --cpu 0.5 -- "
                          "python -m tpimpi.generate ...)")
    try:
        cores = parse_cores(args.cpu, int(cmd.rank))
    except (ValueError, IndexError) as e:
        return cmd.refuse(f"--cpu {args.cpu!r}: give one positive number of cores, or one per rank ({e})")
    try:
        d = make_cpu_cgroup(cores)
    except OSError as e:
        return cmd.refuse(f"cannot make a CPU cgroup ({e.strerror or e}): a CPU quota needs root, or a delegated "
                          f"cgroup, and a writable cpu controller")
    try:
        status = cgroup.run_in(d, cmd.argv, cmd.prog)
    finally:
        cgroup.remove(d)
    return cgroup.exit_code(status)


if __name__ == "__main__":
    sys.exit(main())
