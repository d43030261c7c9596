"""Latency on real packets without netem: every packet leaving a host's eth0 goes to an NFQUEUE, and this
handler (one per host, inside its namespace) lets each one go after a fixed delay, in order.

    ip netns exec HOST python -m tpimpi.cluster.delay --delay-ms 1

The rule is added only once the handler listens and removed before it stops, so no packet waits on a
queue nobody reads.
"""

from __future__ import annotations

import argparse
import collections
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

QUEUE = 7  # queue number inside the host's own namespace
RULE = ["OUTPUT", "-o", "eth0", "-j", "NFQUEUE", "--queue-num", str(QUEUE)]


def serve(delay_s: float, ready: Path | None = None) -> None:
    """Hold each queued packet delay_s seconds, then accept it (first in, first out)."""
    from netfilterqueue import COPY_META, NetfilterQueue

    held = collections.deque()  # (release time, packet)
    q = NetfilterQueue()
    q.bind(QUEUE, lambda pkt: held.append((time.monotonic() + delay_s, pkt)), max_len=1 << 16, mode=COPY_META,
           sock_len=16 << 20)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    fd = q.get_fd()
    if ready is not None:
        ready.write_text(str(os.getpid()))
    try:
        while not stop:
            timeout = max(0.0, held[0][0] - time.monotonic()) if held else 0.2
            if select.select([fd], [], [], timeout)[0]:
                q.run(block=False)
            now = time.monotonic()
            while held and held[0][0] <= now:
                held.popleft()[1].accept()
    finally:
        while held:
            held.popleft()[1].accept()
        q.unbind()


def _pidfile(cluster, i: int) -> Path:
    return Path(cluster.state) / f"delay-h{i}.pid"


def start(cluster, i: int, delay_ms: float) -> None:
    """Start host i's handler in its namespace, then send its outgoing packets through it."""
    pidfile = _pidfile(cluster, i)
    pidfile.unlink(missing_ok=True)
    log = open(Path(cluster.state) / f"delay-h{i}.log", "ab")
    subprocess.Popen(["ip", "netns", "exec", cluster.ns(i), sys.executable, "-m", "tpimpi.cluster.delay",
                      "--delay-ms", str(delay_ms), "--ready", str(pidfile)], stdout=log, stderr=log,
                     stdin=subprocess.DEVNULL, start_new_session=True,
                     env=dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p)))
    deadline = time.monotonic() + 20
    while not pidfile.exists():
        if time.monotonic() > deadline:
            from ..errors import TpimpiError

            raise TpimpiError(f"the delay handler of host {i} did not start; see {log.name}")
        time.sleep(0.05)
    subprocess.run(["ip", "netns", "exec", cluster.ns(i), "iptables", "-A", *RULE], check=True)


def stop(cluster, i: int) -> None:
    """Remove host i's queue rule, then stop its handler (which lets every held packet go)."""
    subprocess.run(["ip", "netns", "exec", cluster.ns(i), "iptables", "-D", *RULE], capture_output=True)
    pidfile = _pidfile(cluster, i)
    try:
        pid = int(pidfile.read_text())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            os.kill(pid, 0)
            time.sleep(0.02)
    except ProcessLookupError:
        pass
    pidfile.unlink(missing_ok=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tpimpi.cluster.delay", description=__doc__.split("\n\n")[0])
    p.add_argument("--delay-ms", type=float, required=True)
    p.add_argument("--ready", help="write this process's id here once the queue listens")
    args = p.parse_args(argv)
    try:  # the handler's wake-ups are the link's latency: on a loaded machine it must run before the ranks
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    except OSError:
        os.nice(-10)
    serve(args.delay_ms / 1e3, Path(args.ready) if args.ready else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
