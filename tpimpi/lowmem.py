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
import ctypes
import errno
import os
import signal
import sys
import time
from pathlib import Path

UNLIMITED = 1 << 62  # cgroup v1 reports "no limit" as a huge page-rounded number
MiB = 1 << 20


def _memory_mounts() -> dict[str, tuple[str, Path]]:
    """{'v1' or 'v2': (hierarchy root as seen in /proc/self/cgroup, mount point)} of the memory controller."""
    found = {}
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        pre, _, post = line.partition(" - ")
        fields, tail = pre.split(), post.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        root, mount, fstype, opts = fields[3], Path(fields[4]), tail[0], tail[2].split(",")
        if fstype == "cgroup" and "memory" in opts:
            found.setdefault("v1", (root, mount))
        elif fstype == "cgroup2":
            try:
                controllers = (mount / "cgroup.controllers").read_text().split()
            except OSError:
                controllers = []
            if "memory" in controllers:
                found.setdefault("v2", (root, mount))
    return found


def own_cgroup() -> tuple[str, Path] | None:
    """('v1' or 'v2', directory) of this process's memory cgroup, or None when there is no controller."""
    mounts = _memory_mounts()
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        kind = "v1" if "memory" in controllers.split(",") else "v2" if controllers == "" else None
        if kind in mounts:
            root, mount = mounts[kind]
            rel = os.path.relpath(path, root) if root != "/" else path.lstrip("/")
            return kind, (mount / rel).resolve() if rel not in ("", ".") else mount
    return None


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


def _rank() -> str:
    for k in ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID"):
        if os.environ.get(k, "").isdigit():
            return os.environ[k]
    return "0"


def _remove_stale(parent: Path) -> None:
    """Empty cgroups left by earlier runs whose launcher was killed (rmdir refuses non-empty ones)."""
    for d in parent.glob("tpimpi-r*-*"):
        pid = d.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            try:
                d.rmdir()
            except OSError:
                pass


def make_cgroup(limit: int) -> tuple[str, Path]:
    """A new child cgroup of this process's own, limited to `limit` bytes with no swap; raises OSError."""
    cg = own_cgroup()
    if cg is None:
        raise OSError("no memory cgroup controller is mounted")
    kind, parent = cg
    _remove_stale(parent)
    mount = _memory_mounts()[kind][1]
    return kind, make_child(kind, mount, parent, f"tpimpi-r{_rank()}-{os.getpid()}", limit)


def enable_memory_controller(mount: Path, parent: Path) -> None:
    """cgroup v2: a child of `parent` has memory.max only when "memory" is in parent's cgroup.subtree_control,
    and parent has the controller only when its own parent passes it down, and so on up to the mount's
    root. Enable it top-down wherever it is missing (cgroup v1 needs nothing of the kind)."""
    chain = [parent] + [d for d in parent.parents if d == mount or mount in d.parents]
    for d in reversed(chain):
        ctl = d / "cgroup.subtree_control"
        try:
            if "memory" not in ctl.read_text().split():
                ctl.write_text("+memory")
        except OSError as e:
            why = (": it holds processes, and cgroup v2 passes controllers down only from a cgroup without "
                   "processes of its own (start the job in a delegated cgroup, e.g. systemd-run --scope -p "
                   "Delegate=yes)" if e.errno == errno.EBUSY else "")
            raise OSError(e.errno, f"cannot enable the memory controller in {ctl} ({e.strerror}){why}") from None


def make_child(kind: str, mount: Path, parent: Path, name: str, limit: int) -> Path:
    """Create parent/name limited to `limit` bytes with no swap (enabling the v2 controller first)."""
    if kind == "v2":
        enable_memory_controller(mount, parent)
    d = parent / name
    d.mkdir()
    try:
        if kind == "v1":
            (d / "memory.limit_in_bytes").write_text(str(limit))
            if (d / "memory.memsw.limit_in_bytes").exists():  # must follow the memory limit: memsw >= memory
                (d / "memory.memsw.limit_in_bytes").write_text(str(limit))
        else:
            (d / "memory.max").write_text(str(limit))
            if (d / "memory.swap.max").exists():
                (d / "memory.swap.max").write_text("0")
    except OSError:
        d.rmdir()
        raise
    return d


def remove_cgroup(d: Path) -> None:
    """rmdir, retried briefly: the kernel releases a cgroup a moment after its last process exits."""
    for _ in range(50):
        try:
            d.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.02)


def _run_in(d: Path, cmd: list[str]) -> int:
    """Fork; the child joins cgroup d, dies with this process, and execs cmd. Returns the wait status."""
    pid = os.fork()
    if pid == 0:
        try:
            (d / "cgroup.procs").write_text(str(os.getpid()))
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: a killed launcher takes the command with it
            os.execvp(cmd[0], cmd)
        except OSError as e:
            print(f"tpimpi.lowmem: cannot start {cmd[0]!r}: {e.strerror or e}", file=sys.stderr, flush=True)
        os._exit(127)
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(s, lambda sig, _f: os.kill(pid, sig))  # mpirun's signals are meant for the command
    while True:
        try:
            return os.waitpid(pid, 0)[1]
        except InterruptedError:
            continue


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tpimpi.lowmem", description=__doc__.split("\n\n")[0],
                                usage="python -m tpimpi.lowmem --limit SIZE [--report] -- COMMAND ...")
    p.add_argument("--limit", required=True, help="memory this process may hold: 400M, 1.5G, ...")
    p.add_argument("--report", action="store_true", help="print the cgroup's peak usage when the command ends")
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    rank = _rank()
    say = (lambda msg: print(f"tpimpi.lowmem: {msg}", file=sys.stderr, flush=True))
    if not cmd:
        if rank == "0":
            say("no command given (usage: python -m tpimpi.lowmem --limit 400M -- python -m tpimpi.generate ...)")
        return 2
    from .memory import parse_size  # after the checks: the command has not started yet
    from .errors import UsageError

    try:
        limit = parse_size(args.limit, "--limit")
    except UsageError as e:
        if rank == "0":
            say(str(e))
        return 2
    try:
        kind, d = make_cgroup(limit)
    except OSError as e:
        if rank == "0":
            say(f"cannot make a memory cgroup ({e.strerror or e}): emulating a memory limit needs root, or a "
                f"delegated cgroup, and a writable memory controller (cgroup v1 or v2)")
        return 2
    try:
        status = _run_in(d, cmd)
        peak, kills = peak_usage(kind, d), oom_kills(kind, d)
    finally:
        remove_cgroup(d)
    peak_txt = f"{peak / MiB:.0f} MiB" if peak is not None else "unknown"
    if kills:
        say(f"rank {rank}: the kernel's OOM killer ended the command: what it holds does not fit in "
            f"{limit / MiB:.0f} MiB (peak {peak_txt}); stream the weights with --mem-budget or --window")
        return 128 + signal.SIGKILL
    if args.report:
        say(f"rank {rank}: limit {limit / MiB:.0f} MiB, peak cgroup usage {peak_txt} (page cache included)")
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


if __name__ == "__main__":
    sys.exit(main())
