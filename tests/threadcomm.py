"""A communicator for N ranks as N threads of one process: the model's collectives without MPI.

It sums partials in rank order on rank 0's buffer, as the star allreduce does, so results match MPI runs.
Used to test many rank counts quickly; the MPI tests cover the real transport.
"""

from __future__ import annotations

import threading

import numpy as np


class ThreadGroup:
    def __init__(self, size: int):
        self.size = size
        self.barrier = threading.Barrier(size, timeout=60)
        self.slots: list = [None] * size

    def comms(self) -> list["ThreadComm"]:
        return [ThreadComm(self, r) for r in range(self.size)]

    def run(self, fn) -> list:
        """fn(comm) on every rank in its own thread; returns each rank's result, re-raising the first error."""
        results, errors = [None] * self.size, []

        def body(c):
            try:
                results[c.rank] = fn(c)
            except BaseException as e:  # surface it in the test, and release the others
                errors.append(e)
                self.barrier.abort()

        threads = [threading.Thread(target=body, args=(c,)) for c in self.comms()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


class ThreadComm:
    def __init__(self, group: ThreadGroup, rank: int):
        self.g, self.rank, self.size = group, rank, group.size

    def setup(self, max_elems: int, algo: str = "star", hidden: int | None = None) -> None:
        pass

    def allreduce_(self, buf: np.ndarray) -> None:
        g = self.g
        g.slots[self.rank] = buf
        g.barrier.wait()
        if self.rank == 0:
            for r in range(1, self.size):
                buf += g.slots[r]
        g.barrier.wait()
        if self.rank:
            buf[...] = g.slots[0]
        g.barrier.wait()

    def bcast_(self, buf: np.ndarray) -> None:
        g = self.g
        g.slots[self.rank] = buf
        g.barrier.wait()
        if self.rank:
            buf[...] = g.slots[0]
        g.barrier.wait()

    def agree(self, error):
        if error:
            raise RuntimeError(error)
