"""The wire formats (pure), and over real MPI the two stars with every wire: exact rank-order sums for
float32, the same values on every rank for all, and the bytes each rank counts."""

import numpy as np
import pytest
import torch

from tpimpi import comm as comm_mod
from tpimpi.errors import UsageError
from tpimpi.wire import Q8_BLOCK, WIRES, Codec, wire_nbytes


def _roundtrip(wire, x):
    c = Codec(wire, x.size)
    raw = np.empty(c.nbytes(x.size), dtype=np.uint8)
    c.encode(x, raw)
    out = np.empty_like(x)
    c.decode(raw, out)
    return out


@pytest.mark.parametrize("n", [1, 31, 32, 33, 576, 8192])
def test_wire_sizes(n):
    assert wire_nbytes("float32", n) == 4 * n
    assert wire_nbytes("bfloat16", n) == 2 * n
    assert wire_nbytes("q8", n) == -(-n // Q8_BLOCK) * 34  # Q80: a float16 scale and 32 bytes per block


def test_bfloat16_rounds_as_torch_does():
    x = np.random.default_rng(0).standard_normal(4096).astype(np.float32) * 100
    expect = torch.from_numpy(x).bfloat16().float().numpy()
    assert np.array_equal(_roundtrip("bfloat16", x), expect)


@pytest.mark.parametrize("n", [1, 7, 576, 1000])
def test_q8_error_is_within_half_a_step_of_each_block(n):
    rng = np.random.default_rng(n)
    x = (rng.standard_normal(n) * rng.uniform(0.01, 100, n)).astype(np.float32)
    y = _roundtrip("q8", x)
    pad = np.zeros(-(-n // Q8_BLOCK) * Q8_BLOCK, dtype=np.float32)
    pad[:n] = x
    step = np.abs(pad.reshape(-1, Q8_BLOCK)).max(axis=1) / 127  # one quantization step per block
    err = np.abs(pad - np.pad(y, (0, pad.size - n))).reshape(-1, Q8_BLOCK)
    assert (err <= step[:, None] * 0.51 + 1e-3 * step[:, None]).all()


def test_q8_keeps_zeros_and_float32_is_exact():
    x = np.zeros(100, dtype=np.float32)
    x[50] = 3.5
    assert np.array_equal(_roundtrip("q8", x)[:32], np.zeros(32, dtype=np.float32))
    y = np.random.default_rng(1).standard_normal(300).astype(np.float32)
    assert np.array_equal(_roundtrip("float32", y), y)


def test_compressed_wires_need_an_algorithm_that_sums_on_rank_0():
    for algo in comm_mod.ALLREDUCE_ALGOS:
        comm_mod.check_wire(algo, "float32")
    comm_mod.check_wire("star", "q8")
    comm_mod.check_wire("auto", "bfloat16")
    with pytest.raises(UsageError, match="--allreduce star, star_bcast or auto, not ring"):
        comm_mod.check_wire("ring", "q8")
    with pytest.raises(UsageError, match="--wire 'f16'"):
        comm_mod.check_wire("star", "f16")


def test_auto_keeps_the_fastest_median_and_breaks_near_ties_by_the_algorithms_order():
    medians = {"ring": 10.0, "mpi": 10.1, "star": 10.15, "tree": 11.4, "star_bcast": 13.0}
    assert comm_mod.close_to_fastest(medians, 1.15) == ["ring", "mpi", "star", "tree"]
    assert comm_mod.pick_fastest(medians, tie=1.02) == "star"  # within 2% of the fastest: the star first
    assert comm_mod.pick_fastest(medians, tie=1.0) == "ring"
    assert comm_mod.pick_fastest({"star": 12.0, "mpi": 11.0}, tie=1.02) == "mpi"  # 9% apart: not a tie


@pytest.fixture(scope="module")
def comm():
    c = comm_mod.world()
    assert isinstance(c, comm_mod.MPIComm) and c.size >= 2
    return c


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("wire", WIRES)
@pytest.mark.parametrize("algo", ["star", "star_bcast"])
def test_stars_sum_on_rank_0_and_agree(comm, algo, wire):
    comm.setup(5000, algo, wire)
    try:
        rng = np.random.default_rng(comm.rank + 7)
        for n in (1, 576, 5000):
            buf = rng.standard_normal(n).astype(np.float32)
            parts = np.empty((comm.size, n), dtype=np.float32)
            comm.comm.Allgather(buf, parts)
            sent0, recv0 = comm.bytes_sent, comm.bytes_recv
            comm.allreduce_(buf)
            every = np.empty((comm.size, n), dtype=np.float32)
            comm.comm.Allgather(buf, every)
            assert (every == every[0]).all()  # the same values on every rank, whatever the wire
            nbytes = wire_nbytes(wire, n)
            if comm.rank:
                assert (comm.bytes_sent - sent0, comm.bytes_recv - recv0) == (nbytes, nbytes)
            else:
                assert (comm.bytes_sent - sent0, comm.bytes_recv - recv0) == ((comm.size - 1) * nbytes,) * 2
            if wire == "float32":
                expect = parts[0].copy()
                for r in range(1, comm.size):
                    expect += parts[r]
                assert np.array_equal(buf, expect)  # rank order, bit for bit
            else:  # each worker's partial and the sum are rounded once each
                tol = (2 ** -8 if wire == "bfloat16" else 1 / 127) * (np.abs(parts).sum() / n * 4 + 1)
                assert np.abs(buf - parts.astype(np.float64).sum(axis=0)).max() < tol * comm.size
    finally:
        comm.setup(5000, "star", "float32")


@pytest.mark.mpi(min_size=2)
def test_auto_with_a_compressed_wire_picks_a_star(comm):
    comm.setup(2304, "auto", "q8")
    try:
        assert {a for _, a in comm._auto} <= set(comm_mod.WIRE_ALGOS)
    finally:
        comm.setup(2304, "star", "float32")


@pytest.mark.mpi(min_size=3)
def test_auto_times_the_candidates_in_rounds_and_picks_a_star_on_a_slow_link(comm):
    """With 3 ms per message (emulated), a star takes 2 message latencies and every other algorithm at least
    4 at 3+ ranks: auto must find a star, on every rank; time_rounds gives each algorithm a figure a round."""
    buf = np.zeros(64, dtype=np.float32)
    times = comm.time_rounds(("star", "ring"), buf, 3, 2)
    assert {a: len(t) for a, t in times.items()} == {"star": 3, "ring": 3}  # a mean call per round
    comm.link = comm_mod.Link(latency_s=0.003)
    try:
        comm.setup(64, "auto")
        assert comm._auto[-1][1] in comm_mod.WIRE_ALGOS
        picks = np.array([comm_mod.CONCRETE_ALGOS.index(comm._auto[-1][1])], dtype=np.int64)
        assert len({p[0] for p in comm.gather_ints(picks.tolist())}) == 1
    finally:
        comm.link = comm_mod.Link()
        comm.setup(5000, "star", "float32")


@pytest.mark.mpi(min_size=2)
def test_netbench_times_auto_at_every_size_it_reports(comm, tmp_path, monkeypatch):
    """auto measures from the smallest size asked up to the largest (as a model does from its hidden
    size), so its pick for a small message is timed at that size; netbench used to time only the largest."""
    import json

    from tpimpi import netbench

    out = tmp_path / "ar.jsonl"  # only rank 0 writes
    monkeypatch.setattr(comm_mod, "world", lambda *a, **k: comm)  # netbench's communicator is this one
    try:
        assert netbench.main(["--sizes", "64,4096", "--reps", "1", "--algos", "star,auto", "--out", str(out)]) == 0
        assert [n for n, _ in comm._auto] == [64, 256, 1024, 4096]
        if comm.rank == 0:
            autos = [r for r in map(json.loads, out.read_text().splitlines()) if r["algo"] == "auto"]
            assert {r["elems"]: r["auto_pick"] for r in autos} == {64: dict(comm._auto)[64], 4096: dict(comm._auto)[4096]}
            for r in autos:  # what the start-up measurement saw, beside the benchmark's own medians
                assert set(r["auto_seen_ms"]) == set(comm_mod.CONCRETE_ALGOS)
    finally:
        comm.setup(5000, "star", "float32")


@pytest.mark.mpi(min_size=2)
def test_a_silent_peer_in_the_decode_loop_is_named(comm):
    """Rank 0 waits on rank 1, which stays silent past the peer timeout: rank 0 raises, naming it."""
    buf = np.zeros(4, dtype=np.float32)
    timeout, comm.timeout, comm._longest_wait = comm.timeout, 0.3, 0.0
    comm.in_lockstep = True
    try:
        if comm.rank == 0:
            req = comm.irecv_(buf, 1, tag=99)
            with pytest.raises(comm_mod.PeerLost, match=rf"rank 0 on host \S+ has heard nothing from rank 1 on host "
                                                        rf"{comm.hosts[1]} for 0\.\d s"):
                comm._wait([req], ["rank 1"])
            req.Wait()  # rank 1 speaks at last: nothing is left pending for the next test
        elif comm.rank == 1:
            import time

            time.sleep(0.8)
            comm.isend_(buf, 0, tag=99).Wait()
    finally:
        comm.in_lockstep, comm.timeout = False, timeout
        comm.barrier()
