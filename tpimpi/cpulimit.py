"""Run a command as if on a slower device: alone in a CPU cgroup with a quota (CFS bandwidth control).

    mpirun -np 3 python -m tpimpi.cpulimit --cpu 0.6,0.6,0.2 -- python -m tpimpi.generate --prompt "..."

--cpu gives the CPU time each rank may use, in cores (0.2 = a fifth of one core), one value for every
rank or one per rank (indexed by the launcher's rank variable). Each process makes a child of its own
CPU cgroup (cgroup v1's cpu controller: cpu.cfs_quota_us over a 10 ms cpu.cfs_period_us; cgroup v2:
cpu.max), starts the command in it, waits and removes the cgroup. Combine with tpimpi.lowmem for a
device short of both (`cpulimit --cpu 0.3 -- python -m tpimpi.lowmem --limit 600M -- ...`). Needs root
or a delegated cgroup; where the controller is not writable it says so and exits 2.

Only the standard library is imported here, as in tpimpi.lowmem (whose process runner it shares).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .lowmem import _rank, _run_in, remove_cgroup

PERIOD_US = 10_000  # a short period, so a throttled rank pauses for milliseconds, not a tenth of a second


def own_cpu_cgroup() -> tuple[str, Path] | None:
    """('v1' or 'v2', directory) of this process's CPU cgroup, or None when no cpu controller is mounted."""
    mounts = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        pre, _, post = line.partition(" - ")
        f, tail = pre.split(), post.split()
        if len(f) >= 5 and len(tail) >= 3:
            if tail[0] == "cgroup" and "cpu" in tail[2].split(","):
                mounts.setdefault("v1", (f[3], Path(f[4])))
            elif tail[0] == "cgroup2" and (Path(f[4]) / "cpu.max").parent.exists():
                mounts.setdefault("v2", (f[3], Path(f[4])))
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, ctrl, path = line.split(":", 2)
        kind = "v1" if "cpu" in ctrl.split(",") else "v2" if ctrl == "" else None
        if kind in mounts:
            root, mount = mounts[kind]
            rel = os.path.relpath(path, root) if root != "/" else path.lstrip("/")
            return kind, (mount / rel) if rel not in ("", ".") else mount
    return None


def make_cpu_cgroup(cores: float) -> Path:
    """A new child CPU cgroup allowed `cores` cores of CPU time; raises OSError."""
    cg = own_cpu_cgroup()
    if cg is None:
        raise OSError("no cpu cgroup controller is mounted")
    kind, parent = cg
    d = parent / f"tpimpi-cpu-r{_rank()}-{os.getpid()}"
    d.mkdir()
    quota = max(1000, int(cores * PERIOD_US))
    try:
        if kind == "v1":
            (d / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (d / "cpu.cfs_quota_us").write_text(str(quota))
        else:
            (d / "cpu.max").write_text(f"{quota} {PERIOD_US}")
    except OSError:
        d.rmdir()
        raise
    return d


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
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    rank = _rank()
    say = (lambda msg: print(f"tpimpi.cpulimit: {msg}", file=sys.stderr, flush=True))
    if not cmd:
        if rank == "0":
            say("no command given (usage: python -m tpimpi.cpulimit --cpu 0.5 -- python -m tpimpi.generate ...)")
        return 2
    try:
        cores = parse_cores(args.cpu, int(rank))
    except (ValueError, IndexError) as e:
        if rank == "0":
            say(f"--cpu {args.cpu!r}: give one positive number of cores, or one per rank ({e})")
        return 2
    try:
        d = make_cpu_cgroup(cores)
    except OSError as e:
        if rank == "0":
            say(f"cannot make a CPU cgroup ({e.strerror or e}): a CPU quota needs root, or a delegated cgroup, "
                f"and a writable cpu controller")
        return 2
    try:
        status = _run_in(d, cmd)
    finally:
        remove_cgroup(d)
    return 128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


if __name__ == "__main__":
    sys.exit(main())
