"""Communication: the only module that imports mpi4py.

Every collective the runtime uses is a method here, so the model code reads `comm.allreduce_(partial)`
and a size-1 `SerialComm` runs the same code without MPI. Bulk data moves with mpi4py's uppercase
buffer calls on preallocated float32 arrays; nothing is pickled.
"""

from __future__ import annotations

import os
import socket
import sys
import time

import numpy as np

from .errors import TpimpiError, UsageError
from .link import Link
from .wire import WIRES, WireBuffers

CONCRETE_ALGOS = ("star", "star_bcast", "mpi", "reduce_bcast", "ring", "tree")
ALLREDUCE_ALGOS = CONCRETE_ALGOS + ("auto",)
WIRE_ALGOS = ("star", "star_bcast")  # the algorithms that can send compressed partials (rank 0 sums)
_TAG_STAR, _TAG_RING, _TAG_TREE, _TAG_PING, _TAG_BACK = 17, 18, 19, 20, 21
MSG_BYTES = 1024  # fixed-size slot for one rank's error message in `agree`
HOST_BYTES = 64  # fixed-size slot for one rank's host name
# While every rank runs the decode loop, a rank that waits this long for a peer (rank 0) or twice as long
# (the others, so that rank 0 names the culprit first) ends the job: a host whose link went down or that
# froze sends nothing and closes nothing. TPIMPI_PEER_TIMEOUT overrides it (seconds, 0 = wait forever);
# the wait allowed grows to 10x the longest wait seen, so slow disks and large blocks do not trip it.
PEER_TIMEOUT_S = 5.0
# auto's start-up measurement (MPIComm.measure_auto): AUTO_ROUNDS interleaved rounds of AUTO_REPS calls of
# every algorithm; AUTO_MORE_ROUNDS more for those within AUTO_CLOSE of the fastest (median round); among those
# within AUTO_TIE of the fastest then, the first in CONCRETE_ALGOS order (the stars first: the paper's
# algorithm, and the peer watchdog covers them, not MPI's blocking collectives), as a difference that small
# is below what the rounds resolve.
AUTO_ROUNDS, AUTO_REPS, AUTO_MORE_ROUNDS, AUTO_CLOSE, AUTO_TIE = 3, 2, 3, 1.15, 1.02


class RankFailure(TpimpiError):
    """Raised on every rank when any rank reported an error in `agree`."""


class PeerLost(TpimpiError):
    """A peer sent nothing for longer than the peer timeout while every rank ran the decode loop."""


class SerialComm:
    """One process, no MPI: every collective is the identity."""

    rank, size = 0, 1
    in_lockstep = False  # set while every rank runs the decode loop
    wire = "float32"
    bytes_sent = bytes_recv = 0

    @property
    def hosts(self) -> list[str]:
        return [socket.gethostname()]

    def setup(self, max_elems: int, algo: str = "star", wire: str | None = None,
              hidden: int | None = None) -> None:
        check_wire(algo, wire or self.wire)

    def allreduce_(self, buf: np.ndarray) -> None:
        pass

    def bcast_(self, buf: np.ndarray) -> None:
        pass

    def bcast_idle_(self, buf: np.ndarray, spin_s: float = 0.0) -> None:
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
    """MPI.COMM_WORLD with the allreduce algorithms on preallocated buffers (star: rank 0 is the hub)."""

    def __init__(self, link: Link = Link()):
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.algo, self.link, self.wire = "star", link, "float32"
        self.in_lockstep = False  # set while every rank runs the decode loop
        self.bytes_sent = self.bytes_recv = 0  # what this rank handed to / got from the transport
        self._recv = np.empty((0, 0), dtype=np.float32)
        self._wire = WireBuffers()  # the star's partials and sum as they travel (encoded for --wire)
        self._auto: list[tuple[int, str]] = []  # (largest size, algorithm) from the start-up measurement
        self.auto_seen: dict[int, dict[str, float]] = {}  # size -> each candidate's median round, s/call (rank 0's)
        self.timeout = float(os.environ.get("TPIMPI_PEER_TIMEOUT", PEER_TIMEOUT_S))
        self._longest_wait = 0.0
        name = np.zeros(HOST_BYTES, dtype=np.uint8)
        raw = socket.gethostname().encode()[: HOST_BYTES - 1]
        name[: len(raw)] = np.frombuffer(raw, dtype=np.uint8)
        names = np.empty((self.size, HOST_BYTES), dtype=np.uint8)  # [ranks, bytes]
        self.comm.Allgather(name, names)
        self.hosts = [bytes(row).rstrip(b"\0").decode(errors="replace") for row in names]

    def setup(self, max_elems: int, algo: str = "star", wire: str | None = None,
              hidden: int | None = None) -> None:
        """Preallocate receive buffers for messages of up to max_elems floats, sent as `wire` (float32,
        bfloat16 or q8); `auto` measures every algorithm at a few sizes from one token's hidden state
        (hidden) up to max_elems and keeps the fastest for each."""
        wire = wire or self.wire
        check_wire(algo, wire)
        rows = self.size - 1 if self.rank == 0 else 1  # star: a row per worker; ring, tree: one scratch row
        if self._recv.shape[0] < rows or self._recv.shape[1] < max_elems:
            self._recv = np.empty((rows, max_elems), dtype=np.float32)  # [rows, elems]
        self._wire.setup(wire, rows, max_elems)
        self.algo, self.wire = algo, wire
        if algo == "auto":
            self._auto = self.measure_auto(max_elems, hidden or max_elems)

    def allreduce_(self, buf: np.ndarray) -> None:
        """Sum buf over all ranks, in place; every rank ends with bit-identical values."""
        if self.size == 1:
            return
        algo = self.algo
        if algo == "auto":
            algo = next((a for size, a in self._auto if buf.size <= size), self._auto[-1][1])
        getattr(self, f"_allreduce_{algo}")(buf.reshape(-1))

    def measure_auto(self, max_elems: int, hidden: int) -> list[tuple[int, str]]:
        """For sizes hidden .. max_elems (x4 steps), the fastest concrete algorithm, as rank 0 timed it.

        The candidates are timed in interleaved rounds (`time_rounds`), so the machine's and the links'
        drift falls on all of them alike, and compared by their median round: AUTO_ROUNDS rounds of
        AUTO_REPS calls each, then AUTO_MORE_ROUNDS more for those within AUTO_CLOSE of the fastest,
        and among those within AUTO_TIE of the fastest after that the first in CONCRETE_ALGOS order
        (`pick_fastest`)."""
        sizes, n = [], min(hidden, max_elems)
        while n < max_elems:
            sizes.append(n)
            n *= 4
        sizes.append(max_elems)
        table = []
        for n in sizes:
            buf = np.zeros(n, dtype=np.float32)  # zeros: repeated in-place sums cannot overflow
            cands = CONCRETE_ALGOS if self.wire == "float32" else WIRE_ALGOS
            times = self.time_rounds(cands, buf, AUTO_ROUNDS, AUTO_REPS)
            close = self._from_root(cands, close_to_fastest(_medians(times), AUTO_CLOSE))
            if len(close) > 1:  # near-ties: more rounds of those only, before choosing
                for a, t in self.time_rounds(close, buf, AUTO_MORE_ROUNDS, AUTO_REPS).items():
                    times[a] += t
            self.auto_seen[n] = _medians(times)
            pick = self._from_root(cands, [pick_fastest({a: self.auto_seen[n][a] for a in close})])
            table.append((n, pick[0]))
        return table

    def _from_root(self, cands: tuple[str, ...], chosen: list[str]) -> list[str]:
        """Rank 0's subset of cands, on every rank (so every rank takes the same path)."""
        mask = np.array([a in chosen for a in cands], dtype=np.uint8)
        self.comm.Bcast(mask, root=0)
        return [a for a, m in zip(cands, mask) if m]

    def time_rounds(self, algos, buf: np.ndarray, rounds: int, reps: int) -> dict[str, list[float]]:
        """Seconds per allreduce of buf with each of algos, one figure a round, on this rank, timed in
        interleaved rounds (collective): every round runs each algorithm in turn, in an order that rotates
        from round to round, each after a barrier and one untimed call (which also absorbs the ranks' skew
        after the barrier), then `reps` calls back to back, timed together: one call alone on one rank
        alternates between near zero (the peers' data already there) and a whole round trip. Drift over
        the rounds (other load, the links' queues) falls on every algorithm alike. "auto" times what
        setup's measurement chose for this size."""
        algos = list(algos)
        times: dict[str, list[float]] = {a: [] for a in algos}
        for r in range(rounds):
            for a in algos[r % len(algos):] + algos[: r % len(algos)]:
                fn = self.allreduce_ if a == "auto" else getattr(self, f"_allreduce_{a}")
                self.comm.Barrier()
                fn(buf)
                t = self.MPI.Wtime()
                for _ in range(reps):
                    fn(buf)
                times[a].append((self.MPI.Wtime() - t) / reps)
        return times

    def time_allreduce(self, algo: str, buf: np.ndarray, reps: int, warmup: int = 2) -> float:
        """Median seconds of one allreduce of buf with `algo` (collective; after a barrier). "auto" times
        what setup's measurement chose for this size."""
        fn = self.allreduce_ if algo == "auto" else getattr(self, f"_allreduce_{algo}")
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
        """MPI's own Allreduce (blocking: its algorithms are the point; the watchdog does not cover it).
        Emulated as a binomial tree: 2 log2(N) message steps of the whole buffer."""
        self.link.wait(buf.nbytes, copies=2 * _log2(self.size), hops=2 * _log2(self.size))
        self._count(buf.nbytes, buf.nbytes)  # what this rank hands MPI; its algorithm decides what travels
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)

    def _allreduce_reduce_bcast(self, buf: np.ndarray) -> None:
        self.link.wait(buf.nbytes, copies=2 * _log2(self.size), hops=2 * _log2(self.size))
        self._count(buf.nbytes, buf.nbytes)
        self.comm.Reduce(self.MPI.IN_PLACE if self.rank == 0 else buf, buf if self.rank == 0 else None,
                         op=self.MPI.SUM, root=0)
        self.comm.Bcast(buf, root=0)

    def _gather_star(self, buf: np.ndarray) -> np.ndarray | None:
        """The star's first hop: every worker's partial, encoded for the wire, to rank 0, which adds them
        to its own in rank order (the sum does not depend on arrival order). Returns the worker's send
        request still in flight (None on rank 0)."""
        if self.rank == 0:
            wire = self._wire.incoming(self.size - 1, buf.size)  # [workers, wire bytes]
            reqs = [self.comm.Irecv(wire[r - 1], source=r, tag=_TAG_STAR) for r in range(1, self.size)]
            self._wait(reqs, [f"rank {r}" for r in range(1, self.size)])
            self._count(0, wire.size)
            if self.link.active:  # the workers' messages share the hub's link: the rest arrive after the first
                self.link.wait(wire.shape[1], copies=self.size - 2, hops=0)
            self._wire.add_received(wire, buf)
            return None
        out = self._wire.outgoing(buf)
        self.link.wait(out.nbytes)
        self._count(out.nbytes, 0)
        return self.comm.Isend(out, dest=0, tag=_TAG_STAR)

    def _allreduce_star(self, buf: np.ndarray) -> None:
        """The paper's star: every worker sends its partial to rank 0, rank 0 adds them and sends the sum
        back to each worker with its own non-blocking send: two message latencies at any rank count."""
        back = self._wire.back(buf)
        if self.rank == 0:
            self._gather_star(buf)
            self.link.wait(back.nbytes, copies=self.size - 1)
            reqs = [self.comm.Isend(back, dest=r, tag=_TAG_BACK) for r in range(1, self.size)]
            self._count((self.size - 1) * back.nbytes, 0)
            self._wait(reqs, [f"rank {r}" for r in range(1, self.size)])
        else:
            recv = self.comm.Irecv(back, source=0, tag=_TAG_BACK)  # posted first: the sum lands in place
            send = self._gather_star(buf)  # (which sends a copy of buf, so buf is free to receive)
            self._wait([send, recv], ["rank 0", "rank 0"])
            self._count(0, back.nbytes)
            self._wire.take_back(back, buf)

    def _allreduce_star_bcast(self, buf: np.ndarray) -> None:
        """The star with MPI's Ibcast for the way back (a binomial tree above 4 ranks in Open MPI, so
        log2(N) hops back instead of one)."""
        send = self._gather_star(buf)
        if send is not None:
            self._wait([send], ["rank 0"])
        back = self._wire.back(buf)
        if self.rank == 0:
            self.link.wait(back.nbytes, copies=self.size - 1)
            self._count((self.size - 1) * back.nbytes, 0)
        else:
            self._count(0, back.nbytes)
        self._wait([self.comm.Ibcast(back, root=0)], "rank 0's broadcast")
        if self.rank:
            self._wire.take_back(back, buf)

    def _sendrecv(self, send, dest, recv, source, tag) -> None:
        """Send and/or receive one message (either may be None), through the link and the watchdog."""
        reqs, peers = [], []
        if recv is not None:
            reqs.append(self.comm.Irecv(recv, source=source, tag=tag))
            peers.append(f"rank {source}")
            self._count(0, recv.nbytes)
        if send is not None:
            self.link.wait(send.nbytes)
            reqs.append(self.comm.Isend(send, dest=dest, tag=tag))
            peers.append(f"rank {dest}")
            self._count(send.nbytes, 0)
        self._wait(reqs, peers)

    def _count(self, sent: int, received: int) -> None:
        self.bytes_sent += sent
        self.bytes_recv += received

    def _wait(self, reqs, peers) -> None:
        """Complete reqs. In the decode loop, a peer that sends nothing for the peer timeout ends the job
        with one message naming it and its host (peers: a name per request, or one for all)."""
        MPI = self.MPI
        if not (self.in_lockstep and self.timeout > 0) or MPI.Request.Testall(reqs):
            MPI.Request.Waitall(reqs)
            return
        t0 = time.monotonic()
        limit = max(self.timeout, 10 * self._longest_wait) * (1 if self.rank == 0 else 2)
        while not MPI.Request.Testall(reqs):
            waited = time.monotonic() - t0
            if waited > limit:
                raise PeerLost(self._lost(reqs, peers, waited))
        self._longest_wait = max(self._longest_wait, time.monotonic() - t0)

    def _lost(self, reqs, peers, waited: float) -> str:
        where = f"rank {self.rank} on host {self.hosts[self.rank]}"
        if isinstance(peers, str):  # a collective: which rank holds it up is MPI's secret
            return (f"{where} has waited {waited:.1f} s for {peers} (a host down, a link cut or a process "
                    f"frozen); ending the job")
        else:
            missing = list(dict.fromkeys(p for r, p in zip(reqs, peers) if not r.Test()))
        named = []
        for m in missing:
            if m.startswith("rank "):
                r = int(m.split()[1])
                m = f"rank {r} on host {self.hosts[r]}"
            named.append(m)
        return (f"{where} has heard nothing from {', '.join(named)} for "
                f"{waited:.1f} s (host down, link cut or process frozen); ending the job")

    def _allreduce_ring(self, buf: np.ndarray) -> None:
        """Reduce-scatter then allgather around the ring: 2(N-1) steps of 1/N of the buffer each."""
        N, r = self.size, self.rank
        bounds = np.linspace(0, buf.size, N + 1).astype(int)
        seg = [buf[bounds[i] : bounds[i + 1]] for i in range(N)]
        scratch = self._recv[0]
        right, left = (r + 1) % N, (r - 1) % N
        for step in range(N - 1):  # after this, rank r holds the full sum of segment (r + 1) % N
            send, recv = seg[(r - step) % N], seg[(r - step - 1) % N]
            self._sendrecv(send, right, scratch[: recv.size], left, _TAG_RING)
            recv += scratch[: recv.size]
        for step in range(N - 1):
            send, recv = seg[(r + 1 - step) % N], seg[(r - step) % N]
            self._sendrecv(send, right, recv, left, _TAG_RING)

    def _allreduce_tree(self, buf: np.ndarray) -> None:
        """Binomial-tree reduce to rank 0, then binomial-tree broadcast: 2 log2(N) steps."""
        N, r = self.size, self.rank
        scratch = self._recv[0, : buf.size]
        mask = 1
        while mask < N:
            if r & mask:
                self._sendrecv(buf, r - mask, None, None, _TAG_TREE)
                break
            if r + mask < N:
                self._sendrecv(None, None, scratch, r + mask, _TAG_TREE)
                buf += scratch
            mask <<= 1
        mask = 1 << max(0, _log2(N) - 1)
        while mask:
            if r % (2 * mask) == 0 and r + mask < N:
                self._sendrecv(buf, r + mask, None, None, _TAG_TREE)
            elif r % (2 * mask) == mask:
                self._sendrecv(None, None, buf, r - mask, _TAG_TREE)
            mask >>= 1

    def pingpong(self, peer: int, buf: np.ndarray, reps: int, stat=np.median) -> float:
        """Median (or `stat`) seconds of half a round trip of buf between this rank and `peer` (both call
        it; the lower rank sends first), through the emulated link when there is one."""
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
        return float(stat(times[1:]))

    def bcast_(self, buf: np.ndarray) -> None:
        """Broadcast buf from rank 0, in place (through the hub's link when one is emulated)."""
        if self.size > 1:
            if self.rank == 0:
                self.link.wait(buf.nbytes, copies=self.size - 1)
                self._count((self.size - 1) * buf.nbytes, 0)
            else:
                self._count(0, buf.nbytes)
            self._wait([self.comm.Ibcast(buf, root=0)], "rank 0")

    def bcast_idle_(self, buf: np.ndarray, spin_s: float = 0.0) -> None:
        """Broadcast buf from rank 0 where the others may wait long (a server between requests): they poll
        for spin_s (yielding the core between polls), then sleep while they wait (polling up to every
        5 ms) instead of spinning on the cores. Matches only bcast_idle_ (a non-blocking broadcast) on the
        other ranks, not bcast_."""
        if self.size == 1:
            return
        if self.rank == 0:
            self.link.wait(buf.nbytes, copies=self.size - 1)
        req = self.comm.Ibcast(buf, root=0)
        until = time.perf_counter() + spin_s
        while time.perf_counter() < until:
            if req.Test():
                return
            time.sleep(0)
        delay = 5e-5
        while not req.Test():
            time.sleep(delay)
            delay = min(delay * 2, 5e-3)

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
            by_text: dict[str, list[int]] = {}
            for r, m in failed:
                by_text.setdefault(m, []).append(r)
            raise RankFailure("; ".join(self._who(ranks) + f": {m}" for m, ranks in by_text.items()))

    def _who(self, ranks: list[int]) -> str:
        """"rank 2" or "ranks 1, 2", with their hosts when the ranks are not all on one host."""
        who = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"
        if len(set(self.hosts)) > 1:
            hosts = list(dict.fromkeys(self.hosts[r] for r in ranks))
            who += f" (host{'s' if len(hosts) > 1 else ''} {', '.join(hosts)})"
        return who

    def bcast_bytes(self, data: bytes | None) -> bytes:
        """Start-up only: rank 0's bytes on every rank (a length word, then the payload)."""
        n = np.array([len(data or b"")], dtype=np.int64)
        self.comm.Bcast(n, root=0)
        buf = np.frombuffer(data, dtype=np.uint8).copy() if self.rank == 0 else np.empty(int(n[0]), np.uint8)
        self.comm.Bcast(buf, root=0)
        return buf.tobytes()

    def isend_(self, buf: np.ndarray, dest: int, tag: int = 0):
        """Start sending buf (any dtype, contiguous) to dest; returns the request (`.Wait()` it)."""
        self._count(buf.nbytes, 0)
        return self.comm.Isend(buf, dest=dest, tag=tag)

    def irecv_(self, buf: np.ndarray, source: int, tag: int = 0):
        """Start receiving into buf from source; returns the request (`.Wait()` it)."""
        self._count(0, buf.nbytes)
        return self.comm.Irecv(buf, source=source, tag=tag)

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


def peer_failure(e: BaseException) -> str | None:
    """A one-line account if e is MPI reporting a failed peer or link (not a bug in tpimpi), else None."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is None or not isinstance(e, mpi.Exception):
        return None
    return (f"MPI reports {e.Get_error_string().strip()} (a peer rank died or its host became unreachable); "
            f"ending the job")


def check_wire(algo: str, wire: str) -> None:
    """Refuse an unknown algorithm or wire format, or a compressed wire with an algorithm that cannot sum it."""
    if algo not in ALLREDUCE_ALGOS:
        raise UsageError(f"allreduce {algo!r} is not one of {', '.join(ALLREDUCE_ALGOS)}")
    if wire not in WIRES:
        raise UsageError(f"--wire {wire!r} is not one of {', '.join(WIRES)}")
    if wire != "float32" and algo not in WIRE_ALGOS + ("auto",):
        raise UsageError(f"--wire {wire} needs an allreduce that sums on rank 0: --allreduce "
                         f"{', '.join(WIRE_ALGOS)} or auto, not {algo}")


def _medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {a: float(np.median(t)) for a, t in times.items()}


def close_to_fastest(medians: dict[str, float], within: float) -> list[str]:
    """The algorithms whose median is within a factor `within` of the fastest one's."""
    best = min(medians.values())
    return [a for a, t in medians.items() if t <= within * best]


def pick_fastest(medians: dict[str, float], tie: float = AUTO_TIE) -> str:
    """The fastest algorithm; of those within a factor `tie` of it, the first in CONCRETE_ALGOS order."""
    return min(close_to_fastest(medians, tie), key=CONCRETE_ALGOS.index)


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
