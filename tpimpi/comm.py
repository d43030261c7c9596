"""Communication: the only module that imports mpi4py.

Every collective the runtime uses is a method here, so the model code reads `comm.allreduce_(partial)`
and a size-1 `SerialComm` runs the same code without MPI. Bulk data moves with mpi4py's uppercase
buffer calls on preallocated float32 arrays; nothing is pickled.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import numpy as np

from .errors import TpimpiError

CONCRETE_ALGOS = ("star", "mpi", "reduce_bcast", "ring", "tree")
ALLREDUCE_ALGOS = CONCRETE_ALGOS + ("auto",)
_TAG_STAR, _TAG_RING, _TAG_TREE, _TAG_PING = 17, 18, 19, 20
MSG_BYTES = 1024  # fixed-size slot for one rank's error message in `agree`


class RankFailure(TpimpiError):
    """Raised on every rank when any rank reported an error in `agree`."""


class SerialComm:
    """One process, no MPI: every collective is the identity."""

    rank, size = 0, 1
    in_lockstep = False  # set while every rank runs the decode loop

    def setup(self, max_elems: int, algo: str = "star") -> None:
        pass

    def allreduce_(self, buf: np.ndarray) -> None:
        pass

    def bcast_(self, buf: np.ndarray) -> None:
        pass

    def agree(self, error: str | None) -> None:
        if error:
            raise RankFailure(error)

    def gather_ints(self, values: list[int]) -> list[list[int]]:
        return [[int(v) for v in values]]

    def bcast_bytes(self, data: bytes | None) -> bytes:
        return data or b""

    def barrier(self) -> None:
        pass

    def abort(self, code: int = 1) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


@dataclass(frozen=True)
class Link:
    """An emulated network link (this kernel has no netem): a message waits latency + bytes / bandwidth
    before it is sent. Zero latency and bandwidth 0 (unlimited) emulate nothing."""

    latency_s: float = 0.0
    bandwidth_Bps: float = 0.0

    @classmethod
    def from_cli(cls, latency_ms: float, bandwidth_mbps: float) -> "Link":
        """From the command line's milliseconds and megabits per second (0 = not emulated)."""
        if latency_ms < 0 or bandwidth_mbps < 0:
            raise TpimpiError("--link-latency-ms and --link-bandwidth-mbps must not be negative")
        return cls(latency_ms / 1e3, bandwidth_mbps * 1e6 / 8)

    @property
    def active(self) -> bool:
        return self.latency_s > 0 or self.bandwidth_Bps > 0

    def wait(self, nbytes: int, copies: int = 1, hops: int = 1) -> None:
        """Sleep for `hops` message latencies plus `copies` messages of nbytes through the link."""
        t = hops * self.latency_s + (copies * nbytes / self.bandwidth_Bps if self.bandwidth_Bps else 0.0)
        if t > 0:
            time.sleep(t)


class MPIComm:
    """MPI.COMM_WORLD with the allreduce algorithms on preallocated buffers (star: rank 0 is the hub)."""

    def __init__(self, link: Link = Link()):
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.algo, self.link = "star", link
        self.in_lockstep = False  # set while every rank runs the decode loop
        self._recv = np.empty((0, 0), dtype=np.float32)
        self._auto: list[tuple[int, str]] = []  # (largest size, algorithm) from the start-up measurement

    def setup(self, max_elems: int, algo: str = "star") -> None:
        """Preallocate receive buffers for messages of up to max_elems floats; `auto` measures every
        algorithm at a few sizes up to max_elems and keeps the fastest for each."""
        if algo not in ALLREDUCE_ALGOS:
            raise TpimpiError(f"allreduce {algo!r} is not one of {', '.join(ALLREDUCE_ALGOS)}")
        rows = self.size - 1 if self.rank == 0 else 1  # star: a row per worker; ring, tree: one scratch row
        if self._recv.shape[0] < rows or self._recv.shape[1] < max_elems:
            self._recv = np.empty((rows, max_elems), dtype=np.float32)  # [rows, elems]
        self.algo = algo
        if algo == "auto":
            self._auto = self.measure_auto(max_elems)

    def allreduce_(self, buf: np.ndarray) -> None:
        """Sum buf over all ranks, in place; every rank ends with bit-identical values."""
        if self.size == 1:
            return
        algo = self.algo
        if algo == "auto":
            algo = next((a for size, a in self._auto if buf.size <= size), self._auto[-1][1])
        getattr(self, f"_allreduce_{algo}")(buf.reshape(-1))

    def measure_auto(self, max_elems: int, reps: int = 5) -> list[tuple[int, str]]:
        """For sizes hidden .. max_elems (x4 steps), the fastest concrete algorithm, as rank 0 timed it."""
        sizes, n = [], min(576, max_elems)
        while n < max_elems:
            sizes.append(n)
            n *= 4
        sizes.append(max_elems)
        table = []
        for n in sizes:
            buf = np.zeros(n, dtype=np.float32)  # zeros: repeated in-place sums cannot overflow
            best = None
            for algo in CONCRETE_ALGOS:
                t = self.time_allreduce(algo, buf, reps)
                if best is None or t < best[0]:
                    best = (t, algo)
            choice = np.array([CONCRETE_ALGOS.index(best[1])], dtype=np.int64)
            self.comm.Bcast(choice, root=0)  # rank 0's choice, so every rank takes the same path
            table.append((n, CONCRETE_ALGOS[int(choice[0])]))
        return table

    def time_allreduce(self, algo: str, buf: np.ndarray, reps: int, warmup: int = 2) -> float:
        """Median seconds of one allreduce of buf with `algo` (collective; after a barrier)."""
        fn = getattr(self, f"_allreduce_{algo}")
        for _ in range(warmup):
            fn(buf)
        self.comm.Barrier()
        times = []
        for _ in range(reps):
            t = self.MPI.Wtime()
            fn(buf)
            times.append(self.MPI.Wtime() - t)
        return float(np.median(times))

    def _allreduce_mpi(self, buf: np.ndarray) -> None:
        # emulated as a binomial tree: 2 log2(N) message steps of the whole buffer
        self.link.wait(buf.nbytes, copies=2 * _log2(self.size), hops=2 * _log2(self.size))
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)

    def _allreduce_reduce_bcast(self, buf: np.ndarray) -> None:
        self.link.wait(buf.nbytes, copies=2 * _log2(self.size), hops=2 * _log2(self.size))
        self.comm.Reduce(self.MPI.IN_PLACE if self.rank == 0 else buf, buf if self.rank == 0 else None,
                         op=self.MPI.SUM, root=0)
        self.comm.Bcast(buf, root=0)

    def _allreduce_star(self, buf: np.ndarray) -> None:
        """Every worker sends its partial to rank 0 (non-blocking), rank 0 adds them in rank order and
        broadcasts the sum back (non-blocking): two message latencies whatever the rank count."""
        n, link = buf.size, self.link
        if self.rank == 0:
            recv = self._recv[: self.size - 1, :n]
            reqs = [self.comm.Irecv(recv[r - 1], source=r, tag=_TAG_STAR) for r in range(1, self.size)]
            self.MPI.Request.Waitall(reqs)
            if link.active:  # the workers' messages share the hub's link: the rest arrive after the first
                link.wait(buf.nbytes, copies=self.size - 2, hops=0)
            for r in range(self.size - 1):  # fixed order: the sum does not depend on arrival order
                buf += recv[r]
            link.wait(buf.nbytes, copies=self.size - 1)
        else:
            link.wait(buf.nbytes)
            self.comm.Isend(buf, dest=0, tag=_TAG_STAR).Wait()
        self.comm.Ibcast(buf, root=0).Wait()

    def _allreduce_ring(self, buf: np.ndarray) -> None:
        """Reduce-scatter then allgather around the ring: 2(N-1) steps of 1/N of the buffer each."""
        N, r = self.size, self.rank
        bounds = np.linspace(0, buf.size, N + 1).astype(int)
        seg = [buf[bounds[i] : bounds[i + 1]] for i in range(N)]
        scratch = self._recv[0]
        right, left = (r + 1) % N, (r - 1) % N
        for step in range(N - 1):  # after this, rank r holds the full sum of segment (r + 1) % N
            send, recv = seg[(r - step) % N], seg[(r - step - 1) % N]
            self.link.wait(send.nbytes)
            self.comm.Sendrecv(send, dest=right, sendtag=_TAG_RING, recvbuf=scratch[: recv.size], source=left,
                               recvtag=_TAG_RING)
            recv += scratch[: recv.size]
        for step in range(N - 1):
            send, recv = seg[(r + 1 - step) % N], seg[(r - step) % N]
            self.link.wait(send.nbytes)
            self.comm.Sendrecv(send, dest=right, sendtag=_TAG_RING, recvbuf=recv, source=left, recvtag=_TAG_RING)

    def _allreduce_tree(self, buf: np.ndarray) -> None:
        """Binomial-tree reduce to rank 0, then binomial-tree broadcast: 2 log2(N) steps."""
        N, r = self.size, self.rank
        scratch = self._recv[0, : buf.size]
        mask = 1
        while mask < N:
            if r & mask:
                self.link.wait(buf.nbytes)
                self.comm.Send(buf, dest=r - mask, tag=_TAG_TREE)
                break
            if r + mask < N:
                self.comm.Recv(scratch, source=r + mask, tag=_TAG_TREE)
                buf += scratch
            mask <<= 1
        mask = 1 << max(0, _log2(N) - 1)
        while mask:
            if r % (2 * mask) == 0 and r + mask < N:
                self.link.wait(buf.nbytes)
                self.comm.Send(buf, dest=r + mask, tag=_TAG_TREE)
            elif r % (2 * mask) == mask:
                self.comm.Recv(buf, source=r - mask, tag=_TAG_TREE)
            mask >>= 1

    def pingpong(self, peer: int, buf: np.ndarray, reps: int) -> float:
        """Median seconds of half a round trip of buf between this rank and `peer` (both call it; the
        lower rank sends first), through the emulated link when there is one."""
        first = self.rank < peer
        times = []
        for _ in range(reps + 1):  # the first round trip warms the connection up
            t = self.MPI.Wtime()
            for sending in ((True, False) if first else (False, True)):
                if sending:
                    self.link.wait(buf.nbytes)
                    self.comm.Send(buf, dest=peer, tag=_TAG_PING)
                else:
                    self.comm.Recv(buf, source=peer, tag=_TAG_PING)
            times.append((self.MPI.Wtime() - t) / 2)
        return float(np.median(times[1:]))

    def bcast_(self, buf: np.ndarray) -> None:
        """Broadcast buf from rank 0, in place (through the hub's link when one is emulated)."""
        if self.size > 1:
            if self.rank == 0:
                self.link.wait(buf.nbytes, copies=self.size - 1)
            self.comm.Bcast(buf, root=0)

    def agree(self, error: str | None) -> None:
        """Collective: if any rank passes an error, every rank raises RankFailure naming those ranks."""
        mine = np.zeros(MSG_BYTES, dtype=np.uint8)
        if error:
            raw = error.encode("utf-8", "replace")[: MSG_BYTES - 1]
            mine[: len(raw)] = np.frombuffer(raw, dtype=np.uint8)
            mine[MSG_BYTES - 1] = 1
        allmsg = np.empty((self.size, MSG_BYTES), dtype=np.uint8)  # [ranks, bytes]
        self.comm.Allgather(mine, allmsg)
        failed = [(r, bytes(allmsg[r, :-1]).rstrip(b"\0").decode("utf-8", "replace"))
                  for r in range(self.size) if allmsg[r, -1]]
        if failed:
            texts = {m for _, m in failed}
            if len(texts) == 1 and (len(failed) == self.size or failed[0][0] == 0):
                raise RankFailure(texts.pop())  # the same problem everywhere, or rank 0's own: say it once
            raise RankFailure("; ".join(f"rank {r}: {m}" for r, m in failed))

    def bcast_bytes(self, data: bytes | None) -> bytes:
        """Start-up only: rank 0's bytes on every rank (a length word, then the payload)."""
        n = np.array([len(data or b"")], dtype=np.int64)
        self.comm.Bcast(n, root=0)
        buf = np.frombuffer(data, dtype=np.uint8).copy() if self.rank == 0 else np.empty(int(n[0]), np.uint8)
        self.comm.Bcast(buf, root=0)
        return buf.tobytes()

    def gather_ints(self, values: list[int]) -> list[list[int]]:
        """Every rank's list of integers (all of the same length), on every rank."""
        mine = np.array(values, dtype=np.int64)
        out = np.empty((self.size, mine.size), dtype=np.int64)  # [ranks, values]
        self.comm.Allgather(mine, out)
        return out.tolist()

    def barrier(self) -> None:
        """A barrier that sleeps while it waits, so waiting ranks leave the cores to the working one."""
        req = self.comm.Ibarrier()
        delay = 1e-4
        while not req.Test():
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def abort(self, code: int = 1) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        self.comm.Abort(code)


def _log2(n: int) -> int:
    """Steps of a binomial tree over n ranks: ceil(log2 n)."""
    return max(0, (n - 1).bit_length())


def launched() -> bool:
    """Whether an MPI launcher (mpirun, srun) started this process."""
    return any(k in os.environ for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "PMI_RANK"))


def world(link: Link = Link()):
    """The communicator of this process: MPI's world when launched by mpirun/srun, else serial."""
    return MPIComm(link) if launched() else SerialComm()


def versions() -> dict[str, str]:
    """mpi4py's version and the MPI library's, for benchmark records."""
    import mpi4py
    from mpi4py import MPI

    return {"mpi4py": mpi4py.__version__, "mpi": MPI.Get_library_version().split(",")[0].strip("\0 \n")}


def local_size() -> int:
    """How many ranks share this node (from the launcher's environment), for choosing thread counts."""
    for k in ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE"):
        v = os.environ.get(k, "")
        if v.isdigit() and int(v) > 0:
            return int(v)
    return 1
