"""K hosts as network namespaces behind one switch, and Open MPI launched across them.

Layout of a cluster called NAME (every object carries NAME, so set-up and teardown touch nothing else):
  namespace NAME-sw      the switch: a bridge `br0` and one veth end per host (no address, no route out)
  namespace NAME-head    where mpirun runs, like a laptop a user launches jobs from: on the subnet, no ranks
  namespace NAME-hI      host I: `eth0` at SUBNET's address I+1, `lo`; its link shaping and delay handler
  STATE/hosts/NAME-hI/   host I's disk. Inside host I (its own mount namespace) it is mounted at
                         STATE/disk, and STATE/hosts shows only NAME-hI: no host reads another's files
                         (so a store can be at one path on every host, or at STATE/hosts/{host}/...)
  STATE/agent            what Open MPI's launcher runs instead of ssh: address -> namespace
  STATE/hostfile, STATE/cluster.json
Processes run "on" host I through `run_argv(I, cmd)`: `ip netns exec NAME-hI unshare --uts --mount`, the
host name set to NAME-hI (Open MPI tells nodes apart by name) and the disk mounted.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import TpimpiError

DEFAULT_NAME = "tpimpi-cl"
DEFAULT_SUBNET = "10.77.0.0/24"
MAX_HOSTS = 64
# mpirun's connection to each host's daemon probes an idle link after 3 s, every 1 s, 3 times: a host whose
# link went down is declared lost in about 6 s (Open MPI's defaults: 300 + 20 x 9 s) and the job ends. The
# head namespace also gives up on unacknowledged data after 2 retransmissions (about 1.5 s; Linux's default
# of 15 takes 15 minutes), so mpirun does not hang on a lost host after a rank aborted the job.
# mpi_ft_enable: a rank whose TCP connection to a killed rank closes does not abort the job itself
# (naming itself); mpirun, which saw the process die, ends it naming the dead rank and its host.
KEEPALIVE = ("--prtemca", "oob_tcp_keepalive_time", "3", "--prtemca", "oob_tcp_keepalive_intvl", "1",
             "--prtemca", "oob_tcp_keepalive_probes", "3")


@dataclass(frozen=True)
class LinkShape:
    """One host's outgoing link: packets held delay_ms each (NFQUEUE), then sent at rate_mbps (tc tbf)."""

    delay_ms: float = 0.0
    rate_mbps: float = 0.0  # 0: unshaped (veth speed)

    def __post_init__(self):
        if self.delay_ms < 0 or self.rate_mbps < 0:
            raise TpimpiError(f"link delay {self.delay_ms} ms and rate {self.rate_mbps} Mbps must not be negative")


# The TPI-LLM paper's emulated testbed (1 ms, 300 Mbps), and a home Wi-Fi network: about 5 ms one way
# per hop through the access point and 80 Mbit/s of useful throughput (802.11ac, one stream, a room away).
PRESETS = {"none": LinkShape(), "paper": LinkShape(1.0, 300.0), "wifi": LinkShape(5.0, 80.0)}


def _sh(*argv: str, check: bool = True, quiet: bool = False) -> subprocess.CompletedProcess:
    p = subprocess.run(argv, capture_output=True, text=True)
    if check and p.returncode:
        raise TpimpiError(f"`{shlex.join(argv)}` failed: {(p.stderr or p.stdout).strip()}")
    return p


def _netns_list() -> set[str]:
    out = _sh("ip", "netns", "list", check=False).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


@dataclass(frozen=True)
class Cluster:
    """A cluster's names and addresses, a pure function of (name, hosts, subnet, state directory)."""

    name: str = DEFAULT_NAME
    hosts: int = 3
    subnet: str = DEFAULT_SUBNET
    state: str = ""
    slots: int = 8  # ranks a host may take

    def __post_init__(self):
        if not self.name.replace("-", "").isalnum() or len(self.name) > 40:
            raise TpimpiError(f"cluster name {self.name!r}: letters, digits and '-' only, at most 40")
        if not 1 <= self.hosts <= MAX_HOSTS:
            raise TpimpiError(f"--hosts {self.hosts} must be in 1..{MAX_HOSTS}")
        net = ipaddress.ip_network(self.subnet, strict=True)
        if not net.is_private or net.num_addresses < self.hosts + 2:
            raise TpimpiError(f"subnet {self.subnet} must be private and hold {self.hosts} hosts")
        if not self.state:
            object.__setattr__(self, "state", f"/tmp/{self.name}")

    @classmethod
    def load(cls, name: str = DEFAULT_NAME, state: str = "") -> "Cluster":
        """The cluster `up` recorded in its state directory."""
        path = Path(state or f"/tmp/{name}") / "cluster.json"
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError):
            raise TpimpiError(f"no cluster {name!r} is up (no {path}); start one with: "
                              f"python -m tpimpi.cluster up --name {name}") from None
        return cls(**{k: d[k] for k in ("name", "hosts", "subnet", "state", "slots")})

    def ns(self, i: int) -> str:
        return f"{self.name}-h{i}"

    @property
    def switch(self) -> str:
        return f"{self.name}-sw"

    @property
    def head(self) -> str:
        return f"{self.name}-head"

    @property
    def head_addr(self) -> str:
        return str(ipaddress.ip_network(self.subnet)[-2])

    def addr(self, i: int) -> str:
        return str(ipaddress.ip_network(self.subnet)[i + 1])

    @property
    def prefix(self) -> int:
        return ipaddress.ip_network(self.subnet).prefixlen

    def disk(self, i: int) -> Path:
        """Host i's disk as seen from outside the cluster."""
        return Path(self.state) / "hosts" / self.ns(i)

    @property
    def mountpoint(self) -> Path:
        """Where every host sees its own disk."""
        return Path(self.state) / "disk"

    @property
    def agent(self) -> Path:
        return Path(self.state) / "agent"

    @property
    def hostfile(self) -> Path:
        return Path(self.state) / "hostfile"

    def host_of(self, addr_or_name: str) -> int:
        for i in range(self.hosts):
            if addr_or_name in (self.addr(i), self.ns(i)):
                return i
        raise TpimpiError(f"{addr_or_name!r} is not a host of cluster {self.name!r}")

    # ---------------------------------------------------------------------------------------------
    # Running things on a host

    def host_script(self, i: int, cmd: str) -> str:
        """The shell text that becomes host i (name, disk) and runs cmd, inside its namespaces."""
        st, disk = shlex.quote(self.state), shlex.quote(str(self.mountpoint))
        hosts, own = shlex.quote(str(Path(self.state) / "hosts")), shlex.quote(str(self.disk(i)))
        return (f"hostname {self.ns(i)} && mount --bind {own} {disk} && mount -t tmpfs -o size=1m tpimpi-hide {hosts}"
                f" && mkdir {own} && mount --bind {disk} {own}"
                f" && export TPIMPI_CACHE={disk}/cache TPIMPI_CLUSTER={shlex.quote(self.name)}"
                f" TPIMPI_CLUSTER_STATE={st}"
                f" OMPI_MCA_mpi_yield_when_idle=1 && {cmd}")

    def run_argv(self, i: int, cmd: str) -> list[str]:
        """argv that runs the shell command cmd on host i."""
        return ["ip", "netns", "exec", self.ns(i), "unshare", "--uts", "--mount", "--propagation", "private",
                "sh", "-c", self.host_script(i, cmd)]

    def head_argv(self, cmd: list[str]) -> list[str]:
        """argv that runs cmd in the head namespace, where mpirun starts (it sees every host's disk, as a
        user's laptop would hold the files to stage; no rank runs there)."""
        return ["ip", "netns", "exec", self.head, *cmd]

    def mpirun_argv(self, args: list[str], np_: int | None = None) -> list[str]:
        """mpirun across the hosts (to be started in the head namespace, see head_argv):
        the hostfile, the agent in place of ssh, MPI over TCP on the cluster's subnet."""
        argv = ["mpirun", "--hostfile", str(self.hostfile), "--prtemca", "plm_ssh_agent", str(self.agent),
                "--prtemca", "oob_tcp_if_include", self.subnet, *KEEPALIVE, "--mca", "btl", "tcp,self",
                "--mca", "mpi_ft_enable", "true",
                "--mca", "btl_tcp_if_include", self.subnet, "-x", "OMPI_MCA_mpi_yield_when_idle=1",
                "--map-by", "node"]
        if np_:
            argv += ["-np", str(np_)]
        return argv + args

    # ---------------------------------------------------------------------------------------------
    # Set-up and teardown

    def up(self, shape: LinkShape = LinkShape()) -> "Cluster":
        """Create the switch, the hosts, their disks, agent and hostfile (idempotent: an existing cluster of
        the same name is taken down first), then shape every link."""
        self.down()
        st = Path(self.state)
        for i in range(self.hosts):
            self.disk(i).mkdir(parents=True, exist_ok=True)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        try:
            _sh("ip", "netns", "add", self.switch)
            sw = ("ip", "-n", self.switch)
            _sh(*sw, "link", "add", "br0", "type", "bridge")
            _sh(*sw, "link", "set", "br0", "up")
            _sh(*sw, "link", "set", "lo", "up")
            for i in range(self.hosts):
                ns = self.ns(i)
                _sh("ip", "netns", "add", ns)
                _sh("ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"p{i}", "netns",
                    self.switch)
                _sh(*sw, "link", "set", f"p{i}", "master", "br0", "up")
                h = ("ip", "-n", ns)
                _sh(*h, "addr", "add", f"{self.addr(i)}/{self.prefix}", "dev", "eth0")
                _sh(*h, "link", "set", "eth0", "up")
                _sh(*h, "link", "set", "lo", "up")
            _sh("ip", "netns", "add", self.head)
            _sh("ip", "link", "add", "eth0", "netns", self.head, "type", "veth", "peer", "name", "phead", "netns",
                self.switch)
            _sh(*sw, "link", "set", "phead", "master", "br0", "up")
            _sh("ip", "-n", self.head, "addr", "add", f"{self.head_addr}/{self.prefix}", "dev", "eth0")
            _sh("ip", "-n", self.head, "link", "set", "eth0", "up")
            _sh("ip", "-n", self.head, "link", "set", "lo", "up")
            _sh("ip", "netns", "exec", self.head, "sysctl", "-qw", "net.ipv4.tcp_retries2=2")
        except TpimpiError:
            self.down()
            raise
        self._write_files()
        self.shape(shape)
        return self

    def _write_files(self) -> None:
        st = Path(self.state)
        cases = "\n".join(f"  {self.addr(i)}|{self.ns(i)}) i={i} ;;" for i in range(self.hosts))
        inner = 'eval "$1"'
        scripts = "\n".join(f"  {i}) script={shlex.quote(self.host_script(i, inner))} ;;" for i in range(self.hosts))
        self.agent.write_text(f"""#!/bin/sh
# Open MPI's launcher runs `agent [ssh options] HOST COMMAND...` to start its daemon on HOST. In cluster
# {self.name} a host is a network namespace: become it and run the command there.
while [ $# -gt 0 ]; do case "$1" in -*) shift ;; *) break ;; esac; done
host=$1; shift
cmd="$*"
case "$host" in
{cases}
  *) echo "agent: $host is not a host of cluster {self.name}" >&2; exit 255 ;;
esac
case "$i" in
{scripts}
esac
exec ip netns exec {self.name}-h$i unshare --uts --mount --propagation private sh -c "$script" agent "$cmd"
""")
        self.agent.chmod(0o755)
        self.hostfile.write_text("".join(f"{self.addr(i)} slots={self.slots}\n" for i in range(self.hosts)))
        (st / "cluster.json").write_text(json.dumps(asdict(self), indent=1) + "\n")

    def exists(self) -> bool:
        return self.switch in _netns_list()

    def down(self) -> None:
        """Remove everything `up` made for this name: processes in its namespaces (ranks, daemons, delay
        handlers), the namespaces with their links, and the state directory. Safe to call again."""
        names = _netns_list()
        hosts = {self.ns(i) for i in range(MAX_HOSTS)}
        mine = [n for n in names if n in hosts or n in (self.switch, self.head)]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = [int(p) for n in mine for p in _sh("ip", "netns", "pids", n, check=False).stdout.split()]
            for p in pids:
                try:
                    os.kill(p, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 2
            while pids and time.monotonic() < deadline and any(_alive(p) for p in pids):
                time.sleep(0.05)
        for n in mine:
            _sh("ip", "netns", "del", n, check=False)
        st = Path(self.state)
        if (st / "cluster.json").exists() or st == Path(f"/tmp/{self.name}"):
            shutil.rmtree(st, ignore_errors=True)

    # ---------------------------------------------------------------------------------------------
    # Links

    def shape(self, shape: LinkShape, hosts=None) -> None:
        """Give each host's outgoing link this delay and rate (replacing what it had)."""
        from . import delay

        for tool, what in (("tc", "iproute2"), ("iptables", "iptables")):
            if (shape.rate_mbps if tool == "tc" else shape.delay_ms) and shutil.which(tool) is None:
                raise TpimpiError(f"shaping links needs {tool}: apt-get install {what}")
        if shape.delay_ms and importlib.util.find_spec("netfilterqueue") is None:
            raise TpimpiError("delaying packets needs the NetfilterQueue package: apt-get install "
                              "libnetfilter-queue-dev && pip install NetfilterQueue")
        for i in (range(self.hosts) if hosts is None else hosts):
            ns = self.ns(i)
            _sh("ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", "eth0", "root", check=False)
            if shape.rate_mbps:
                _sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate",
                    f"{shape.rate_mbps}mbit", "burst", "4kb", "limit", "4mb")
            delay.stop(self, i)
            if shape.delay_ms:
                delay.start(self, i, shape.delay_ms)
        d = json.loads((Path(self.state) / "cluster.json").read_text())
        d["shape"] = asdict(shape)
        (Path(self.state) / "cluster.json").write_text(json.dumps(d, indent=1) + "\n")

    def link(self, i: int, up: bool) -> None:
        """Take host i's link down (unplug its cable) or up again."""
        _sh("ip", "-n", self.switch, "link", "set", f"p{i}", "up" if up else "down")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def usable() -> str | None:
    """None if this machine can build a cluster, else why not (for tests to skip with)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install iproute2 util-linux)"
    probe = f"{DEFAULT_NAME}-probe{os.getpid()}"
    p = _sh("ip", "netns", "add", probe, check=False)
    if p.returncode:
        return f"the kernel refuses network namespaces: {p.stderr.strip()}"
    _sh("ip", "netns", "del", probe, check=False)
    return None
