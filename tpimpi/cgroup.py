"""A child cgroup for one command, under cgroup v1 or v2: what tpimpi.lowmem (memory) and tpimpi.cpulimit
(CPU) share. Finding this process's cgroup of a controller, making a child with its limit files written
(under v2 after enabling the controller top-down in cgroup.subtree_control), running a command in it, and
removing it afterwards.

Only the standard library is imported: the launching process stays small and outside the limit.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import sys
import time
from pathlib import Path


def mounts(controller: str) -> dict[str, tuple[str, Path]]:
    """{'v1' or 'v2': (hierarchy root as seen in /proc/self/cgroup, mount point)} where `controller`
    (memory, cpu) is available."""
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
        if fstype == "cgroup" and controller in opts:
            found.setdefault("v1", (root, mount))
        elif fstype == "cgroup2":
            try:
                controllers = (mount / "cgroup.controllers").read_text().split()
            except OSError:
                controllers = []
            if controller in controllers:
                found.setdefault("v2", (root, mount))
    return found


def own(controller: str) -> tuple[str, Path] | None:
    """('v1' or 'v2', directory) of this process's cgroup of `controller`, or None when it is not mounted."""
    found = mounts(controller)
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        kind = "v1" if controller in controllers.split(",") else "v2" if controllers == "" else None
        if kind in found:
            root, mount = found[kind]
            rel = os.path.relpath(path, root) if root != "/" else path.lstrip("/")
            return kind, (mount / rel).resolve() if rel not in ("", ".") else mount
    return None


def rank() -> str:
    """The launcher's rank of this process ("0" without one)."""
    for k in ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID"):
        if os.environ.get(k, "").isdigit():
            return os.environ[k]
    return "0"


class Command:
    """The command line tpimpi.lowmem and tpimpi.cpulimit share: `PROG OPTIONS -- COMMAND ...`, run on
    every rank, where only rank 0 speaks about bad input (every rank sees the same)."""

    def __init__(self, prog: str, words: list[str]):
        self.prog = prog
        self.argv = words[1:] if words[:1] == ["--"] else words  # the command to run
        self.rank = rank()

    def say(self, msg: str) -> None:
        print(f"{self.prog}: {msg}", file=sys.stderr, flush=True)

    def refuse(self, msg: str) -> int:
        """Rank 0 says msg; every rank returns the exit code 2 (bad input)."""
        if self.rank == "0":
            self.say(msg)
        return 2


def child_name(prefix: str) -> str:
    """A child's name, unique on the host: PREFIX-rRANK-PID (remove_stale finds those of dead launchers)."""
    return f"{prefix}-r{rank()}-{os.getpid()}"


def remove_stale(parent: Path, prefix: str) -> None:
    """Empty cgroups left by earlier runs whose launcher was killed (rmdir refuses non-empty ones)."""
    for d in parent.glob(f"{prefix}-r*-*"):
        pid = d.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            try:
                d.rmdir()
            except OSError:
                pass


def enable_controller(controller: str, mount: Path, parent: Path) -> None:
    """cgroup v2: a child of `parent` has the controller's files only when it is in parent's
    cgroup.subtree_control, and parent has the controller only when its own parent passes it down, and so
    on up to the mount's root. Enable it top-down wherever it is missing (cgroup v1 needs nothing of the kind)."""
    chain = [parent] + [d for d in parent.parents if d == mount or mount in d.parents]
    for d in reversed(chain):
        ctl = d / "cgroup.subtree_control"
        try:
            if controller not in ctl.read_text().split():
                ctl.write_text(f"+{controller}")
        except OSError as e:
            why = (": it holds processes, and cgroup v2 passes controllers down only from a cgroup without "
                   "processes of its own (start the job in a delegated cgroup, e.g. systemd-run --scope -p "
                   "Delegate=yes)" if e.errno == errno.EBUSY else "")
            raise OSError(e.errno, f"cannot enable the {controller} controller in {ctl} ({e.strerror}){why}") from None


def make_child(kind: str, controller: str, mount: Path, parent: Path, name: str, files: list[tuple[str, str]]) -> Path:
    """Create parent/name and write its limit files in order (file name, value; a name ending in '?' is
    written only where the kernel has the file); under v2 the controller is enabled first. Nothing is left
    behind when a write fails (raises OSError)."""
    if kind == "v2":
        enable_controller(controller, mount, parent)
    d = parent / name
    d.mkdir()
    try:
        for fname, value in files:
            optional = fname.endswith("?")
            path = d / fname.rstrip("?")
            if not optional or path.exists():
                path.write_text(value)
    except OSError:
        d.rmdir()
        raise
    return d


def remove(d: Path) -> None:
    """rmdir, retried briefly: the kernel releases a cgroup a moment after its last process exits."""
    for _ in range(50):
        try:
            d.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.02)


def run_in(d: Path, cmd: list[str], prog: str) -> int:
    """Fork; the child joins cgroup d, dies with this process, and execs cmd. Returns the wait status.
    mpirun's signals to this process are passed on to the command."""
    pid = os.fork()
    if pid == 0:
        try:
            (d / "cgroup.procs").write_text(str(os.getpid()))
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: a killed launcher takes the command with it
            os.execvp(cmd[0], cmd)
        except OSError as e:
            print(f"{prog}: cannot start {cmd[0]!r}: {e.strerror or e}", file=sys.stderr, flush=True)
        os._exit(127)
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCONT):
        signal.signal(s, lambda sig, _f: os.kill(pid, sig))  # mpirun's signals are meant for the command
        # (SIGCONT too: tpimpi.serve tells mpirun's ending of the job by the SIGCONT before its SIGTERM)
    while True:
        try:
            return os.waitpid(pid, 0)[1]
        except InterruptedError:
            continue


def exit_code(status: int) -> int:
    """A shell's exit code for a wait status."""
    return 128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
