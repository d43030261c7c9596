"""Communication: the only module that imports mpi4py.

Every collective the runtime uses is a method here, so the model code reads `comm.allreduce_(partial)`
and a size-1 `SerialComm` runs the same code without MPI. Bulk data moves with mpi4py's uppercase
buffer calls on preallocated float32 arrays; nothing is pickled.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

from .errors import TpimpiError

ALLREDUCE_ALGOS = ("star", "mpi")
_TAG_STAR = 17
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


class MPIComm:
    """MPI.COMM_WORLD with a star allreduce on preallocated buffers (rank 0 is the hub)."""

    def __init__(self):
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.algo = "star"
        self.in_lockstep = False  # set while every rank runs the decode loop
        self._recv = np.empty((0, 0), dtype=np.float32)

    def setup(self, max_elems: int, algo: str = "star") -> None:
        """Preallocate the hub's receive buffers for messages of up to max_elems floats."""
        if algo not in ALLREDUCE_ALGOS:
            raise TpimpiError(f"allreduce {algo!r} is not one of {', '.join(ALLREDUCE_ALGOS)}")
        self.algo = algo
        if algo == "star" and self.rank == 0:
            self._recv = np.empty((self.size - 1, max_elems), dtype=np.float32)  # [workers, elems]

    def allreduce_(self, buf: np.ndarray) -> None:
        """Sum buf over all ranks, in place; every rank ends with bit-identical values."""
        if self.size == 1:
            return
        if self.algo == "mpi":
            self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
            return
        n = buf.size
        if self.rank == 0:
            recv = self._recv[:, :n]
            reqs = [self.comm.Irecv(recv[r - 1], source=r, tag=_TAG_STAR) for r in range(1, self.size)]
            self.MPI.Request.Waitall(reqs)
            for r in range(self.size - 1):  # fixed order: the sum does not depend on arrival order
                buf += recv[r].reshape(buf.shape)
        else:
            self.comm.Isend(buf, dest=0, tag=_TAG_STAR).Wait()
        self.comm.Ibcast(buf, root=0).Wait()

    def bcast_(self, buf: np.ndarray) -> None:
        """Broadcast buf from rank 0, in place."""
        if self.size > 1:
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


def launched() -> bool:
    """Whether an MPI launcher (mpirun, srun) started this process."""
    return any(k in os.environ for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "PMI_RANK"))


def world():
    """The communicator of this process: MPI's world when launched by mpirun/srun, else serial."""
    return MPIComm() if launched() else SerialComm()


def local_size() -> int:
    """How many ranks share this node (from the launcher's environment), for choosing thread counts."""
    for k in ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE"):
        v = os.environ.get(k, "")
        if v.isdigit() and int(v) > 0:
            return int(v)
    return 1
