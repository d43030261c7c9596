"""The profile's measurements, where a figure can be checked without a quiet machine."""

import time

import pytest

from tpimpi.planner import measure
from tpimpi.synth import shape_config


def test_model_weight_bytes_by_hand():
    cfg = shape_config("smollm2-135m")  # 30 layers, hidden 576, 9 heads of 64, 3 KV heads, FFN 1536, vocab 49152
    attn = 576 * (9 + 2 * 3) * 64 + 576 * 9 * 64
    assert measure.model_weight_bytes(cfg, 4) == 4 * (30 * (attn + 3 * 576 * 1536) + 49152 * 576)
    assert measure.model_weight_bytes(cfg, 18 / 32) == int(18 / 32 * (30 * (attn + 3 * 576 * 1536) + 49152 * 576))


def test_cpu_difference_is_the_extra_work():
    def part():  # this thread's work only: thread CPU time is what is compared
        sum(range(20_000))

    def twice():
        part()
        part()

    t0 = time.thread_time()
    for _ in range(50):
        part()
    alone = (time.thread_time() - t0) / 50
    assert measure._cpu_difference(twice, part, 0.05) == pytest.approx(alone, rel=0.5)
    assert measure._cpu_difference(part, part, 0.05) < 0.3 * alone  # nothing beyond the part


def test_block_overheads_cover_the_work_besides_products():
    cfg = shape_config("smollm2-135m")
    attn, mlp = measure.block_overheads(cfg, 2)
    assert 0 < mlp < attn < 0.05  # attention (rope, the cache, softmax) does more than the MLP's activation
    assert 0 < measure.token_overhead(cfg) < 0.05
