"""Run a command as if on a device with little memory: alone in a memory cgroup with a hard limit.

    echo "..." | mpirun -np 8 python -m tpimpi.lowmem --limit 400M -- python -m tpimpi.generate

Each process launched this way makes a child cgroup under its own (the cgroup v1 memory controller,
or memory.max under cgroup v2), starts the command in it and waits. Everything the command allocates,
and the page cache its reads bring in, is charged against the limit, with no swap to escape to, as
on a board with that much RAM; the kernel reclaims page cache first and kills the command only when
what it holds does not fit. Afterwards the cgroup's peak usage and OOM kills are reported (one line,
or an explanation when the OOM killer ended the command) and the cgroup is removed.

Under cgroup v2 a child has memory.max only when its parent lists "memory" in cgroup.subtree_control
(and so on up to the mount's root); tpimpi.lowmem enables it top-down before making the child, and says
so plainly when the kernel refuses (a cgroup that holds processes cannot pass controllers down).

The limit is set before the command starts because Linux 6 no longer moves memory already charged
elsewhere when a process changes cgroup. Inside, tpimpi reads the limit of its own cgroup and sizes
its memory budget from it (resources.available_memory). Needs root or a delegated cgroup; where the
controller is not writable it says so and exits 2, without running the command.

Only the standard library is imported here: this process stays small and outside the limit.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from . import cgroup
from .cgroup import remove as remove_cgroup

UNLIMITED = 1 << 62  # cgroup v1 reports "no limit" as a huge page-rounded number
MiB = 1 << 20


def own_cgroup() -> tuple[str, Path] | None:
    """('v1' or 'v2', directory) of this process's memory cgroup, or None when there is no controller."""
    return cgroup.own("memory")


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        v = int(text)
    except ValueError:
        return None
    return v if v < UNLIMITED else None


def _limit_file(kind: str) -> str:
    return "memory.limit_in_bytes" if kind == "v1" else "memory.max"


def limit_of(kind: str, cg: Path) -> int | None:
    """The tightest memory limit on cg and the cgroups above it, in bytes (None: unlimited)."""
    limits = []
    d = cg
    while (d / _limit_file(kind)).exists():
        v = _read_int(d / _limit_file(kind))
        if v is not None:
            limits.append(v)
        if d.parent == d:
            break
        d = d.parent
    return min(limits) if limits else None


def own_limit() -> tuple[int | None, bool]:
    """(this process's memory limit in bytes or None, whether it is alone in its cgroup, i.e. the limit is
    its own rather than shared with the other ranks of a node, as in a Slurm job's cgroup)."""
    cg = own_cgroup()
    if cg is None:
        return None, False
    kind, d = cg
    try:
        procs = {int(p) for p in (d / "cgroup.procs").read_text().split()}
    except (OSError, ValueError):
        procs = set()
    return limit_of(kind, d), procs == {os.getpid()}


def peak_usage(kind: str, cg: Path) -> int | None:
    """The most memory (anonymous and page cache) the cgroup has held."""
    return _read_int(cg / ("memory.max_usage_in_bytes" if kind == "v1" else "memory.peak"))


def oom_kills(kind: str, cg: Path) -> int:
    """How many processes of the cgroup the kernel's OOM killer has ended."""
    try:
        text = (cg / ("memory.oom_control" if kind == "v1" else "memory.events")).read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        k, _, v = line.partition(" ")
        if k == "oom_kill":
            return int(v)
    return 0


def make_cgroup(limit: int) -> tuple[str, Path]:
    """A new child cgroup of this process's own, limited to `limit` bytes with no swap; raises OSError."""
    cg = own_cgroup()
    if cg is None:
        raise OSError("no memory cgroup controller is mounted")
    kind, parent = cg
    cgroup.remove_stale(parent, "tpimpi")
    mount = cgroup.mounts("memory")[kind][1]
    return kind, make_child(kind, mount, parent, cgroup.child_name("tpimpi"), limit)


def make_child(kind: str, mount: Path, parent: Path, name: str, limit: int) -> Path:
    """Create parent/name limited to `limit` bytes with no swap (enabling the v2 controller first)."""
    if kind == "v1":  # the swap limit must follow the memory limit: memsw >= memory
        files = [("memory.limit_in_bytes", str(limit)), ("memory.memsw.limit_in_bytes?", str(limit))]
    else:
        files = [("memory.max", str(limit)), ("memory.swap.max?", "0")]
    return cgroup.make_child(kind, "memory", mount, parent, name, files)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tpimpi.lowmem", description=__doc__.split("\n\n")[0],
                                usage="python -m tpimpi.lowmem --limit SIZE [--report] -- COMMAND ...")
    p.add_argument("--limit", required=True, help="memory this process may hold: 400M, 1.5G, ...")
    p.add_argument("--report", action="store_true", help="print the cgroup's peak usage when the command ends")
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    cmd = cgroup.Command("tpimpi.lowmem", args.command)
    if not cmd.argv:
        return cmd.refuse(f"no command given (usage: python -m {cmd.prog} --limit 400M -- "
                          "python -m tpimpi.generate ...)")
    from .errors import UsageError  # after the checks: the command has not started yet
    from .memory import parse_size

    try:
        limit = parse_size(args.limit, "--limit")
    except UsageError as e:
        return cmd.refuse(str(e))
    try:
        kind, d = make_cgroup(limit)
    except OSError as e:
        return cmd.refuse(f"cannot make a memory cgroup ({e.strerror or e}): emulating a memory limit needs root, "
                          f"or a delegated cgroup, and a writable memory controller (cgroup v1 or v2)")
    try:
        status = cgroup.run_in(d, cmd.argv, cmd.prog)
        peak, kills = peak_usage(kind, d), oom_kills(kind, d)
    finally:
        remove_cgroup(d)
    peak_txt = f"{peak / MiB:.0f} MiB" if peak is not None else "unknown"
    if kills:
        cmd.say(f"rank {cmd.rank}: the kernel's OOM killer ended the command: what it holds does not fit in "
            f"{limit / MiB:.0f} MiB (peak {peak_txt}); stream the weights with --mem-budget or --window")
        return 128 + signal.SIGKILL
    if args.report:
        cmd.say(f"rank {cmd.rank}: limit {limit / MiB:.0f} MiB, peak cgroup usage {peak_txt} (page cache included)")
    return cgroup.exit_code(status)


if __name__ == "__main__":
    sys.exit(main())
