"""A one-node Slurm cluster on this machine, started by hand (no systemd, no cgroups), for tests.

    with SlurmCluster(tmp_dir) as c:
        subprocess.run(["sbatch", "--wait", "job.sbatch"], env=c.env)

Debian's packages provide the daemons; `install()` fetches them with apt-get when they are missing.
Everything the cluster uses is its own: munged runs as user munge with a fresh key and its socket in a
/tmp directory owned by munge (slurm.conf's AuthInfo points there), slurmctld and slurmd run as root
in the foreground as children of this process, with configuration, state, spool and logs under `root`
and ports nobody else was using. So two clusters (or an earlier run's leftovers) never meet, and the
daemons are told to stop if this process dies without stopping them.
`python3 tests/slurm_cluster.py install` installs the packages; `... up` keeps a cluster up by hand.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")  # + libpmix-dev only for `srun --mpi=pmix`
COMMANDS = ("slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "srun", "munged", "munge", "mungekey")
SBIN_PATH = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"  # root's daemons live in sbin


def missing() -> list[str]:
    """The Slurm and munge commands not installed."""
    return [c for c in COMMANDS if not shutil.which(c, path=SBIN_PATH)]


def install(timeout: float = 600) -> str | None:
    """Installs Debian's Slurm and munge if missing. Returns None when they are there, else why not."""
    if not missing():
        return None
    if os.geteuid() != 0:
        return f"Slurm is not installed ({', '.join(missing())} missing) and installing it needs root"
    if not shutil.which("apt-get"):
        return f"Slurm is not installed ({', '.join(missing())} missing) and there is no apt-get to install it"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    lock = ["-o", "DPkg::Lock::Timeout=120"]  # another apt-get (or this test in another session) may hold it
    p = subprocess.run(cmd + lock, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:  # most likely a stale package index: refresh it once and try again
        subprocess.run(["apt-get", "update", "-q", *lock], env=env, capture_output=True, timeout=timeout)
        p = subprocess.run(cmd + lock, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0 or missing():
        return f"`{' '.join(cmd)}` failed (exit {p.returncode}), {missing()} missing:\n{p.stderr[-2000:]}"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_conf(root: Path, munge_socket: Path, node: str, cpus: int) -> str:
    """One node that claims `cpus` CPUs whatever the hardware has (config_overrides; an honest 2-CPU
    node leaves a 4-task job pending forever), no cgroups, no accounting (read `scontrol show job`,
    not sacct). `sbatch --wait` polls at 2 s, then every min(8 s, MinJobAge / 2, ...) (it grows the
    interval x4 while it is below MinJobAge / 2): MinJobAge=15 keeps the poll at 8 s, not 32, and the
    job's record at least 15 s after it ends, long enough to read it after `sbatch --wait` returns."""
    return f"""\
ClusterName=tpimpitest
SlurmctldHost=localhost
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
MpiDefault=none
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
MailProg=/bin/true
MinJobAge=15
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=test Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


def _die_with_parent() -> None:
    """In a child before exec: get SIGTERM when the process that started it dies (Linux prctl)."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _quiet(cmd, env=None) -> bool:
    return subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0


def _tails(paths) -> str:
    return "".join(f"\n--- {p}:\n{Path(p).read_text(errors='replace')[-3000:]}" for p in paths if Path(p).exists())


def _wait(ok, timeout: float) -> bool:
    """Polls ok() every 0.1 s until it is true (True) or timeout seconds have passed (False)."""
    end = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > end:
            return False
        time.sleep(0.1)
    return True


def _require(what: str, ok, timeout: float, logs=()) -> None:
    if not _wait(ok, timeout):
        raise RuntimeError(f"{what} within {timeout:.0f} s{_tails(logs)}")


class SlurmCluster:
    """munged, slurmctld and slurmd for one node; stop() cancels leftover jobs and ends all three."""

    def __init__(self, root: Path, cpus: int = 8):
        self.root = Path(root)
        self.cpus = cpus
        self.node = socket.gethostname().split(".")[0]  # slurmd's own name for this host
        self.conf = self.root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))  # for sbatch, scontrol, ... and the jobs
        self.munge_dir: Path | None = None
        self.procs: dict[str, subprocess.Popen] = {}  # name -> daemon, in start order

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()

    def start(self) -> None:
        for d in ("state", "spool"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self._start_munge()
        self.conf.write_text(slurm_conf(self.root, self.munge_dir / "munge.socket", self.node, self.cpus))
        self._spawn("slurmctld", "-D", "-i", "-f", str(self.conf))
        _require("slurmctld did not answer", lambda: _quiet(["scontrol", "ping"], self.env), 30,
              self.logs("slurmctld"))
        self._spawn("slurmd", "-D", "-f", str(self.conf))
        _require(f"node {self.node} did not become idle", self._node_idle, 30, self.logs("slurmd", "slurmctld"))

    def logs(self, *names) -> list[Path]:
        return [self.root / f"{n}{ext}" for n in names for ext in (".log", ".stderr")]

    def _spawn(self, name: str, *args, **kw) -> None:
        cmd = [shutil.which(name, path=SBIN_PATH), *args]
        with open(self.root / f"{name}.stderr", "wb") as err:
            self.procs[name] = subprocess.Popen(cmd, env=self.env, stdin=subprocess.DEVNULL, stdout=err,
                                                stderr=subprocess.STDOUT, start_new_session=True,
                                                preexec_fn=_die_with_parent, **kw)

    def _start_munge(self) -> None:
        """Our own munged, as user munge, with a fresh key and its socket in a directory it owns."""
        d = self.munge_dir = Path(tempfile.mkdtemp(prefix="tpimpi-munge-"))  # not under root: munge must reach it
        shutil.chown(d, "munge", "munge")
        as_munge = dict(user="munge", group="munge", extra_groups=[])
        subprocess.run(["mungekey", "--create", f"--keyfile={d}/munge.key"], check=True, capture_output=True,
                       **as_munge)
        d.chmod(0o755)  # clients (root here) only need to reach the socket
        self._spawn("munged", "--foreground", f"--socket={d}/munge.socket", f"--key-file={d}/munge.key",
                    f"--pid-file={d}/munged.pid", f"--seed-file={d}/munged.seed", f"--log-file={d}/munged.log",
                    **as_munge)
        _require("munged did not answer", lambda: _quiet(["munge", "-n", f"--socket={d}/munge.socket"]), 15,
              [self.root / "munged.stderr", d / "munged.log"])

    def _node_idle(self) -> bool:
        p = subprocess.run(["scontrol", "show", "node", self.node], env=self.env, capture_output=True, text=True)
        return p.returncode == 0 and "State=IDLE" in p.stdout

    def show_job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, StdOut, ...)."""
        out = subprocess.run(["scontrol", "--oneliner", "show", "job", job_id], env=self.env, capture_output=True,
                             text=True, check=True).stdout
        return dict(f.split("=", 1) for f in out.split() if "=" in f)

    def stop(self) -> None:
        """Cancels any job still there, then stops the daemons, newest first, and removes munge's directory."""
        if "slurmd" in self.procs and self.procs["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--quiet", f"--user={os.geteuid()}"], env=self.env, capture_output=True,
                           timeout=30)
            # let slurmd end the jobs' processes (linuxproc tracks them) before it goes itself
            _wait(lambda: not subprocess.run(["squeue", "--noheader", "--format=%i"], env=self.env,
                                             capture_output=True, text=True).stdout.strip(), 15)
        for p in reversed(list(self.procs.values())):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait(10)
        self.procs.clear()
        if self.munge_dir:
            shutil.rmtree(self.munge_dir, ignore_errors=True)


def main(argv: list[str]) -> int:
    """`install`: install Slurm and munge if missing (CI does this first). `up [DIR]`: start a cluster
    and keep it until Ctrl-C or SIGTERM."""
    if not argv or argv[0] not in ("install", "up"):
        print(f"usage: {sys.argv[0]} install | up [DIR]", file=sys.stderr)
        return 2
    why = install()
    if why:
        print(f"slurm_cluster: {why}", file=sys.stderr)
        return 1
    if argv[0] == "install":
        print("slurm_cluster: Slurm and munge are installed")
        return 0
    root = Path(argv[1] if len(argv) > 1 else tempfile.mkdtemp(prefix="tpimpi-slurm-"))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop the cluster on SIGTERM as on Ctrl-C
    with SlurmCluster(root) as c:
        print(f"cluster up: export SLURM_CONF={c.conf}   (Ctrl-C stops it)", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
