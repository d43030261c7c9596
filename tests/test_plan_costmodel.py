"""The cost model against cases worked out by hand, and against memory.py's model (which it reuses)."""

import math

import pytest

from tpimpi.engine import memory_plan
from tpimpi.planner.costmodel import (
    Mode,
    Quota,
    allreduce_seconds,
    bcast_seconds,
    block_seconds,
    bytes_sent,
    predict,
    simulate,
    steady_condition,
)
from tpimpi.planner.devices import Device
from tpimpi.shard import plan as split_plan
from tpimpi.synth import shape_config


def dev(matvec=1e9, overhead=0.0, mem=8 << 30, direct=1e8, cached=1e9, lat=0.0, bw=math.inf, token=0.0,
        quota=0.0, period=0.0):
    return Device("h", {"float32": matvec, "bfloat16": matvec / 2}, {"float32": 1e12, "bfloat16": 1e12},
                  overhead, overhead, mem, direct, cached, lat, bw, token_overhead_s=token, cpu_quota=quota,
                  cpu_period_s=period)


def test_allreduce_message_patterns():
    n, L, B = 4000, 1e-3, 1e6  # 4 ms to send the whole message
    assert allreduce_seconds("star", n, 4, L, B) == pytest.approx(2e-3 + 2 * 3 * 4e-3)  # 2 hops, hub link x 6
    assert allreduce_seconds("ring", n, 4, L, B) == pytest.approx(6 * (1e-3 + 1e-3))  # 2(N-1) steps of n/4
    assert allreduce_seconds("tree", n, 4, L, B) == pytest.approx(4 * (1e-3 + 4e-3))  # 2 log2 4 steps
    assert allreduce_seconds("mpi", n, 5, L, math.inf) == pytest.approx(6e-3)  # ceil(log2 5) = 3
    # paper Prop. 1: 8 devices, latency only: ring 14 L, tree 6 L, star 2 L
    assert [allreduce_seconds(a, 8, 8, 1.0, math.inf) for a in ("ring", "tree", "star")] == [14, 6, 2]
    assert allreduce_seconds("star", n, 1, L, B) == 0.0
    assert bcast_seconds(1000, 3, L, B) == pytest.approx(1e-3 + 2 * 1e-3)


@pytest.mark.parametrize("k", [2, 3, 4, 5, 8])
def test_bytes_sent_add_up_to_the_message_count(k):
    n = 1000
    assert sum(bytes_sent("star", r, k, n) for r in range(k)) == 2 * (k - 1) * n  # k-1 up, k-1 down
    assert sum(bytes_sent("tree", r, k, n) for r in range(k)) == 2 * (k - 1) * n  # every rank but 0 gets one
    assert bytes_sent("tree", 0, 4, n) == 2 * n and bytes_sent("tree", 2, 4, n) == 2 * n  # up once, child 3
    assert bytes_sent("ring", 1, k, n) == 2 * (k - 1) * math.ceil(n / k)


def test_block_seconds_is_overhead_plus_streaming():
    d = dev(matvec=2e9, overhead=1e-4)
    assert block_seconds(d, "float32", "attn", 1_000_000) == pytest.approx(1e-4 + 4e6 / 2e9)
    assert block_seconds(d, "bfloat16", "head", 1_000_000) == pytest.approx(2e6 / 1e9)  # no overhead on the head
    # a prefill of T positions is bounded by its flops when those take longer than streaming
    assert block_seconds(d, "float32", "mlp", 1_000_000, T=4000) == pytest.approx(1e-4 + 2 * 1e6 * 4000 / 1e12)


def test_simulate_resident_ranks_wait_for_the_slowest():
    (st,) = simulate([[[1, 2], [3, 1]]], [[None, None], [None, None]], [0, 0], 2, [0.5], [0.0])
    # block 0: ranks ready at 1 and 3, allreduce ends 3.5; block 1: ready at 5.5 and 4.5, ends 6.0
    assert st.end == 6.0
    assert st.allreduce == [3.0, 2.0] and st.compute == [3, 4] and st.io_wait == [0, 0]


def test_simulate_window_1_serializes_reading_and_compute():
    times = simulate([[[1, 1]], [[1, 1]]], [[2, 2]], [1], 0, [0, 0], [0, 0])
    assert [t.end for t in times] == [6, 12]  # read 2, compute 1, read 2, compute 1 ...
    assert times[1].io_wait == [4]


def test_simulate_window_2_overlaps_reading_with_compute():
    events = []
    times = simulate([[[1, 1]]] * 3, [[2, 2]], [2], 0, [0] * 3, [0] * 3, events)
    # reads back to back: 0-2, 2-4, 4-6, 6-8 ...; compute waits for each: token = max(C, R) = 4
    assert [t.end for t in times] == [5, 9, 13]
    assert [(a, b) for s, r, k, a, b in events if k == "read"][:4] == [(0, 2), (2, 4), (4, 6), (6, 8)]


def test_simulate_reading_hidden_behind_allreduce():
    # Prop. 3-4: compute 1 + allreduce 1 per block covers a read of 2 with a window of 2
    times = simulate([[[1, 1]]] * 4, [[2, 2]], [2], 2, [1] * 4, [0] * 4)
    assert times[-1].end - times[-2].end == pytest.approx(4.0)
    assert times[-1].io_wait == [0.0]
    assert steady_condition(1, 1, 1, 2, 2) and not steady_condition(1, 1, 0.5, 2, 2)


def test_predict_memory_is_memory_py_model():
    cfg = shape_config("smollm2-135m")
    ratios, modes = [2, 1, 1], [Mode("resident"), Mode("window", 2), Mode("budget", budget=400 << 20)]
    pred = predict(cfg, [dev()] * 3, ratios, modes, new_tokens=3, max_seq=512)
    for r, (s, m) in enumerate(zip(split_plan(cfg.n_heads, cfg.n_kv_heads, cfg.ffn, ratios), modes)):
        assert pred.ranks[r].peak_bytes == memory_plan(cfg, s, r, 3, "float32", 512, m.options())[1].total
    assert pred.fits


def test_predict_one_resident_device_by_hand():
    cfg = shape_config("smollm2-135m", layers=2)
    d = dev(matvec=1e9, overhead=1e-3)
    pred = predict(cfg, [d], [1], [Mode("resident")], prompt_tokens=1, new_tokens=5, max_seq=64)
    h, f, hd = cfg.hidden, cfg.ffn, cfg.head_dim
    attn = h + (cfg.n_heads + 2 * cfg.n_kv_heads) * hd * h + h * cfg.n_heads * hd
    mlp = h + 2 * f * h + h * f
    head = cfg.vocab * h
    by_hand = 2 * (1e-3 + 4 * attn / 1e9) + 2 * (1e-3 + 4 * mlp / 1e9) + 4 * head / 1e9
    assert pred.s_per_token == pytest.approx(by_hand)
    assert pred.ttft_s == pytest.approx(by_hand)  # one prompt position: one pass
    # rank 0's work per token besides the head (norm, sampling) adds to every pass, once
    slow = predict(cfg, [dev(matvec=1e9, overhead=1e-3, token=2e-3)], [1], [Mode("resident")], prompt_tokens=1,
                   new_tokens=5, max_seq=64)
    assert slow.s_per_token == pytest.approx(by_hand + 2e-3) and slow.ranks[0].compute_s == pytest.approx(by_hand + 2e-3)


def test_token_overhead_is_rank_0s_and_the_workers_wait_for_it():
    cfg = shape_config("smollm2-135m", layers=2)
    base = predict(cfg, [dev(), dev()], [1, 1], [Mode("resident")] * 2, prompt_tokens=1, new_tokens=4, max_seq=64)
    t = predict(cfg, [dev(token=5e-3), dev(token=7e-3)], [1, 1], [Mode("resident")] * 2, prompt_tokens=1,
                new_tokens=4, max_seq=64)
    assert t.s_per_token == pytest.approx(base.s_per_token + 5e-3)  # rank 0's figure; a worker's is not used
    assert t.ranks[1].compute_s == pytest.approx(base.ranks[1].compute_s)


def test_predict_two_ranks_adds_the_allreduces():
    cfg = shape_config("smollm2-135m", layers=2)
    one = predict(cfg, [dev()], [1], [Mode("resident")], prompt_tokens=1, new_tokens=3, max_seq=64)
    far = dev(lat=1e-3)
    two = predict(cfg, [dev(), far], [1, 1], [Mode("resident")] * 2, prompt_tokens=1, new_tokens=3, max_seq=64)
    # 4 allreduces of 2 latencies (bandwidth unlimited) and 2 broadcasts of 1 latency per token
    assert two.allreduce_s == pytest.approx(2e-3)
    assert two.s_per_token > 4 * 2e-3 + 2e-3
    assert two.s_per_token < one.s_per_token + 4 * 2e-3 + 2e-3


def test_quota_runs_from_each_period_start_until_spent():
    q = Quota(0.5, 10.0)  # 5 s of every 10: runs 0-5, 10-15, ...
    assert q.advance(0, 3) == 3 and q.advance(3, 3) == 11  # 2 s left in this period, 1 s in the next
    assert q.advance(6, 1) == 11  # throttled until 10
    assert q.advance(0, 10) == 15  # two whole windows: 0-5 and 10-15
    assert q.advance(2, 9) == 21  # 3 s in 2-5, 5 s in 10-15, 1 s from 20
    assert q.next_up(2) == 2 and q.next_up(7) == 10
    shifted = Quota(0.5, 10.0, phase=4.0)  # runs 4-9, 14-19, ...
    assert shifted.next_up(2) == 4 and shifted.advance(2, 2) == 6 and shifted.advance(8, 2) == 15


def test_simulate_ranks_out_of_phase_wait_for_each_other():
    # two ranks, blocks of 1 s at full speed, each may run 2 s of every 4
    blocks = [[[1, 1], [1, 1]]]
    same = simulate(blocks, [[None] * 2] * 2, [0, 0], 2, [0.0], [0.0], quotas=[Quota(0.5, 4.0), Quota(0.5, 4.0)])
    # in phase: both run 0-1, then 1-2; the allreduce after block 1 waits for both to run again at 4
    assert same[0].end == 4
    apart = simulate(blocks, [[None] * 2] * 2, [0, 0], 2, [0.0], [0.0],
                     quotas=[Quota(0.5, 4.0), Quota(0.5, 4.0, phase=2.0)])
    # rank 0 runs 0-2, 4-6; rank 1 runs 2-4, 6-8. Block 0: rank 0 done at 1, rank 1 at 3; both may run
    # again at 4 (rank 0's next window). Block 1: rank 0 4-5, rank 1 waits for 6, done at 7; rank 0 next runs at 8
    assert apart[0].end == 8
    assert apart[0].compute == [2, 6] and apart[0].allreduce == [6, 2]  # compute: wall time, throttled part included


def test_a_fine_grained_quota_is_the_average_the_profile_measured():
    cfg = shape_config("smollm2-135m", layers=2)
    # the profile's figures are averages under the quota; with a period much shorter than a block, the
    # simulation at full speed within the quota's windows gives the same time
    fast = dict(matvec=1e11, overhead=2e-3)  # blocks of about 2 ms, most of a token
    plain = predict(cfg, [dev(**fast)] * 2, [1, 1], [Mode("resident")] * 2, prompt_tokens=1, new_tokens=4, max_seq=64)
    fine = predict(cfg, [dev(**fast, quota=0.5, period=1e-7)] * 2, [1, 1], [Mode("resident")] * 2,
                   prompt_tokens=1, new_tokens=4, max_seq=64)
    assert fine.s_per_token == pytest.approx(plain.s_per_token, rel=1e-3)
    # a period as long as the blocks: ranks out of phase lose time at the allreduces
    coarse = predict(cfg, [dev(**fast, quota=0.5, period=4e-3)] * 2, [1, 1], [Mode("resident")] * 2,
                     prompt_tokens=1, new_tokens=4, max_seq=64)
    assert coarse.s_per_token > 1.2 * plain.s_per_token
