"""Hosts in a box: build a cluster of network namespaces and run Open MPI across it.

    python -m tpimpi.cluster up --hosts 4 --preset paper     # 4 hosts, 1 ms and 300 Mbps per link
    python -m tpimpi.cluster mpirun -np 4 python -m tpimpi.generate --model STORE --prompt Hi
    python -m tpimpi.cluster exec 2 ls -l /tmp/tpimpi-cl/disk   # a command on host 2
    python -m tpimpi.cluster link 2 down                     # unplug host 2
    python -m tpimpi.cluster down
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from ..errors import TpimpiError
from .netns import DEFAULT_NAME, DEFAULT_SUBNET, PRESETS, Cluster, LinkShape, usable


def _shape(args) -> LinkShape:
    base = PRESETS[args.preset]
    return LinkShape(base.delay_ms if args.delay_ms is None else args.delay_ms,
                     base.rate_mbps if args.rate_mbps is None else args.rate_mbps)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tpimpi.cluster", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n")[1])
    p.add_argument("--name", default=os.environ.get("TPIMPI_CLUSTER", DEFAULT_NAME),
                   help=f"names its namespaces NAME-h0.. and NAME-sw (default {DEFAULT_NAME})")
    p.add_argument("--state", default="", help="its directory: host disks, agent, hostfile (default /tmp/NAME)")
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="create (or re-create) the cluster")
    up.add_argument("--hosts", type=int, default=4)
    up.add_argument("--subnet", default=DEFAULT_SUBNET)
    up.add_argument("--slots", type=int, default=8, help="ranks each host may take")
    for sp in (up, sub.add_parser("shape", help="change every link's delay and rate")):
        sp.add_argument("--preset", choices=sorted(PRESETS), default="none",
                        help="paper: 1 ms, 300 Mbps; wifi: 5 ms, 80 Mbps")
        sp.add_argument("--delay-ms", type=float, help="delay of each packet leaving a host (one hop)")
        sp.add_argument("--rate-mbps", type=float, help="rate of each host's outgoing link (0: unshaped)")
    sub.add_parser("down", help="remove the cluster and everything it made")
    sub.add_parser("status", help="hosts, addresses, disks")
    ln = sub.add_parser("link", help="take a host's link down or up")
    ln.add_argument("host", type=int)
    ln.add_argument("state_", choices=["up", "down"], metavar="up|down")
    ex = sub.add_parser("exec", help="run a command on a host")
    ex.add_argument("host", type=int)
    ex.add_argument("command", nargs="*", help="the command and its arguments")
    mr = sub.add_parser("mpirun", help="mpirun across the hosts (from host 0); the rest goes to mpirun")
    mr.add_argument("args", nargs="*", help="mpirun's options, the program and its arguments")
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = []
    for k, word in enumerate(argv):  # what follows `mpirun` or `exec HOST` is the command, options and all
        if word in ("mpirun", "exec"):
            cut = k + 1 + (word == "exec")
            argv, rest = argv[:cut], argv[cut:]
            break
    args = p.parse_args(argv)
    if args.cmd == "exec":
        args.command = rest
    elif args.cmd == "mpirun":
        args.args = rest
    try:
        if args.cmd == "up":
            why = usable()
            if why:
                raise TpimpiError(why)
            c = Cluster(args.name, args.hosts, args.subnet, args.state, args.slots).up(_shape(args))
            print(f"cluster {c.name}: {c.hosts} hosts {c.addr(0)}..{c.addr(c.hosts - 1)}, disks under "
                  f"{c.disk(0).parent}, seen by each host at {c.mountpoint}; hostfile {c.hostfile}")
            return 0
        if args.cmd == "down":
            Cluster(args.name, state=args.state).down()
            return 0
        c = Cluster.load(args.name, args.state)
        if args.cmd == "shape":
            c.shape(_shape(args))
        elif args.cmd == "status":
            for i in range(c.hosts):
                print(f"{c.ns(i)}  {c.addr(i)}  disk {c.disk(i)}")
        elif args.cmd == "link":
            c.link(args.host, args.state_ == "up")
        elif args.cmd == "exec":
            os.execvp("ip", c.run_argv(args.host, shlex.join(args.command)))
        elif args.cmd == "mpirun":
            os.execvp("ip", c.head_argv(c.mpirun_argv(args.args)))
        return 0
    except TpimpiError as e:
        print(f"tpimpi.cluster: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
