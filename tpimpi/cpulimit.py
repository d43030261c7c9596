"""Run a command as if on a slower device: alone in a CPU cgroup with a quota (CFS bandwidth control).

    mpirun -np 3 python -m tpimpi.cpulimit --cpu 0.6,0.6,0.2 -- python -m tpimpi.generate --prompt "..."

--cpu gives the CPU time each rank may use, in cores (0.2 = a fifth of one core), one value for every
rank or one per rank (indexed by the launcher's rank variable). Each process makes a child of its own
CPU cgroup (cgroup v1's cpu controller: cpu.cfs_quota_us over a 10 ms cpu.cfs_period_us; cgroup v2:
cpu.max), starts the command in it, waits and removes the cgroup. Combine with tpimpi.lowmem for a
device short of both (`cpulimit --cpu 0.3 -- python -m tpimpi.lowmem --limit 600M -- ...`). Needs root
or a delegated cgroup; where the controller is not writable it says so and exits 2.

Only the standard library is imported here; the cgroup code is tpimpi.cgroup's, shared with tpimpi.lowmem.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import cgroup

PERIOD_US = 10_000  # a short period, so a throttled rank pauses for milliseconds, not a tenth of a second


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
    quota = max(1000, int(cores * PERIOD_US))
    files = ([("cpu.cfs_period_us", str(PERIOD_US)), ("cpu.cfs_quota_us", str(quota))] if kind == "v1"
             else [("cpu.max", f"{quota} {PERIOD_US}")])
    return cgroup.make_child(kind, "cpu", cgroup.mounts("cpu")[kind][1], parent, cgroup.child_name("tpimpi-cpu"),
                             files)


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
