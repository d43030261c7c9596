"""The latency target's pure parts: the step-time model (decode rows and prompt rows), admission, and the
prompt rows a step may take, on hand-computed cases."""

import collections

import numpy as np
import pytest

from tpimpi.serve.latency import LatencyModel, fit, may_admit, prompt_budget


def line(d, p):  # a step's seconds: 30 ms, 2 ms per decode row, 0.5 ms per prompt row
    return 0.030 + 0.002 * d + 0.0005 * p


def model(coef, over=()):
    lm = LatencyModel()
    lm.coef, lm.over = coef, collections.deque(over)
    return lm


def test_the_model_learns_decode_and_prompt_rows_apart():
    lm = LatencyModel()
    lm.add(4, 0, line(4, 0))
    assert lm.predict(4) is None  # one decode row count: no slope yet
    for d, p in [(1, 0), (2, 0), (8, 0), (3, 40), (0, 64), (6, 16)] * 3:
        lm.add(d, p, line(d, p))
    assert lm.coef == pytest.approx((0.030, 0.002, 0.0005), rel=1e-6)
    assert lm.predict(16, 100) == pytest.approx(0.112, rel=1e-6)
    assert lm.tail() == pytest.approx(0.0, abs=1e-9)  # every step on its line


def sums(steps):
    xtx, xty = np.zeros((3, 3)), np.zeros(3)
    for d, p, t in steps:
        x = np.array([1.0, d, p])
        xtx, xty = xtx + np.outer(x, x), xty + x * t
    return xtx, xty


def test_until_prompt_rows_are_told_apart_they_cost_a_decode_row():
    assert fit(*sums([(4, 0, 0.038)] * 3)) is None  # one row count: nothing to fit
    assert fit(*sums([(d, 0, line(d, 0)) for d in (1, 2, 4, 8)])) == pytest.approx((0.030, 0.002, 0.002), rel=1e-6)
    # a server's first steps: a prompt alone (30 rows, 50 ms), then its decode steps (1 row, 32 ms): two
    # equations for three unknowns, so one line through the rows: 32 + (50 - 32) / 29 ms per row
    b = 0.018 / 29
    assert fit(*sums([(0, 30, 0.050), (1, 0, 0.032), (1, 0, 0.032)])) == pytest.approx((0.032 - b, b, b), rel=1e-6)


def test_slopes_are_not_negative():
    a, b, c = fit(*sums([(1, 0, 0.050), (2, 0, 0.049), (4, 0, 0.047)]))  # faster with more rows: noise
    assert (b, c) == (0.0, 0.0) and a == pytest.approx(0.146 / 3, rel=1e-9)


def test_the_tail_is_added_to_every_prediction():
    """One decode step in ten runs 12 ms over its line, whatever its rows (work beside the step): the 99th
    percentile of measured minus predicted learns the 12 ms, and a large batch is not charged more for it
    than a small one."""
    lm = LatencyModel()
    for i in range(240):
        d = 1 + i % 8
        lm.add(d, 0, line(d, 0) + (0.012 if i % 10 == 9 else 0.0))
    assert lm.tail() == pytest.approx(0.012, rel=0.15)
    assert lm.predict_tail(4) == pytest.approx(lm.predict(4) + lm.tail())
    assert lm.predict_tail(8) - lm.predict(8) == pytest.approx(lm.predict_tail(1) - lm.predict(1))


def test_prompt_rows_fill_what_the_target_leaves():
    lm = model((0.030, 0.002, 0.0005))
    # 4 decode rows: 38 ms; a 50 ms target leaves 12 ms = 24 prompt rows
    assert prompt_budget(0.050, lm, 4, 256) == 24
    assert prompt_budget(0.050, lm, 4, 16) == 16  # never more than a chunk
    assert prompt_budget(0.050, lm, 10, 256) == 1  # no room: one row, so a prompt still advances
    assert prompt_budget(None, lm, 4, 256) == 256  # no target
    assert prompt_budget(0.050, lm, 0, 256) == 256  # nobody decoding to protect
    assert prompt_budget(0.050, LatencyModel(), 4, 256) == 256  # nothing learned yet
    # a tail of 10 ms: 60 ms - 10 ms = 50 ms for the line, 24 rows again
    assert prompt_budget(0.060, model((0.030, 0.002, 0.0005), [0.010] * 10), 4, 256) == 24


def test_admission_needs_the_tail_prediction_and_the_recent_steps_under_the_target():
    assert may_admit(0.050, 0.049, 0.045)
    assert not may_admit(0.050, 0.051, 0.045)  # the step with one more would be over
    assert not may_admit(0.050, 0.049, 0.052)  # the steps are over already
    assert may_admit(0.050, None, 0.045)  # nothing predicted yet: the recent steps decide (one joins at a time)
    assert not may_admit(0.050, None, 0.052)
    lm = model((0.030, 0.002, 0.0005), [0.010] * 10)
    assert lm.predict_tail(5) == pytest.approx(0.050)  # (30 + 10) ms + 10 ms
    assert may_admit(0.0501, lm.predict_tail(5), None) and not may_admit(0.0501, lm.predict_tail(6), None)
