"""The latency target (DFTSP): a step's time predicted from its decode rows and prompt rows, and what
fits under the target: how many sequences may decode together, how many prompt rows a step may take.

What is modelled is a step's whole cycle on rank 0 (planning, the forward pass, the head, sampling and
handing the tokens to the HTTP thread): that is the gap every decoding sequence's client sees between two
tokens. A prompt row and a decode row cost differently (a prompt chunk of k rows runs k positions of
attention over its own prefix and moves the products from memory-bound towards compute-bound), so each
has its own coefficient: t = a + b * decode + c * prompt. The target is on the 99th percentile of
per-token latency, so every decision compares the prediction plus the tail: the 99th percentile of recent
decode steps' measured minus predicted time. The tail is added, not multiplied: what makes a step slow
here is work beside it (the HTTP thread delivering tokens and taking requests, other processes on the
cores, the garbage collector), milliseconds that do not grow with the step; a factor learned on small
steps would scale them up for large ones and keep the batch smaller than the target allows (measured on
the AMD EPYC at 2 ranks: BENCHMARKS.md, "Serving").
"""

from __future__ import annotations

import collections
import math

import numpy as np

TAIL_QUANTILE = 0.99


class LatencyModel:
    """Step time as a + b * decode + c * prompt rows, least squares with exponential forgetting, and the
    tail of recent steps over it (`tail`)."""

    def __init__(self, forget: float = 0.97, tail_window: int = 256):
        self.forget = forget
        self.xtx = np.zeros((3, 3))  # sum of f^age * x x^T, x = (1, decode, prompt)
        self.xty = np.zeros(3)  # sum of f^age * x * seconds
        self.over: collections.deque[float] = collections.deque(maxlen=tail_window)  # measured - predicted, s
        self.coef: tuple[float, float, float] | None = None  # (a, b, c) once the rows have varied

    def add(self, decode: int, prompt: int, seconds: float) -> None:
        """A step of `decode` decode rows and `prompt` prompt rows took `seconds` (only steps with decode
        rows count in the tail: a gap between two tokens is theirs)."""
        predicted = self.predict(decode, prompt)
        if decode and predicted is not None:
            self.over.append(seconds - predicted)
        x = np.array([1.0, decode, prompt])
        self.xtx = self.forget * self.xtx + np.outer(x, x)
        self.xty = self.forget * self.xty + x * seconds
        self.coef = fit(self.xtx, self.xty)

    def predict(self, decode: int, prompt: int = 0) -> float | None:
        """Predicted seconds of a step; None until steps of two different row counts were seen."""
        if self.coef is None:
            return None
        a, b, c = self.coef
        return a + b * decode + c * prompt

    def tail(self) -> float:
        """Seconds: the TAIL_QUANTILE of recent decode steps' measured minus predicted time (at least 0; 0
        before any)."""
        return max(0.0, float(np.quantile(self.over, TAIL_QUANTILE))) if self.over else 0.0

    def predict_tail(self, decode: int, prompt: int = 0) -> float | None:
        """Seconds that all but the slowest 1% of such steps should stay under."""
        p = self.predict(decode, prompt)
        return None if p is None else p + self.tail()


def fit(xtx: np.ndarray, xty: np.ndarray) -> tuple[float, float, float] | None:
    """(a, b, c) of t = a + b * decode + c * prompt from the normal equations, slopes at least 0. Until the
    steps tell decode rows and prompt rows apart (a few steps of each mix; the first ones cannot: a
    prompt-only step and a decode step give two equations for three unknowns), a prompt row is taken to
    cost what a decode row costs: one line through all rows, c = b. None while the rows have not varied."""
    coef = _solve(xtx, xty)
    if coef is not None:
        return coef
    rows = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])  # (1, decode, prompt) -> (1, decode + prompt)
    line = _solve(rows @ xtx @ rows.T, rows @ xty)
    return None if line is None else (line[0], line[1], line[1])


def _solve(xtx: np.ndarray, xty: np.ndarray, max_cond: float = 1e8) -> tuple[float, ...] | None:
    """Least squares from the normal equations, a slope that comes out negative (noise around a flat
    cost) fixed at 0 and the rest refitted; None when the system is too ill-conditioned to trust."""
    free = list(range(len(xty)))
    if np.linalg.cond(xtx) > max_cond:
        return None
    while True:
        coef = np.zeros(len(xty))
        try:
            coef[free] = np.linalg.solve(xtx[np.ix_(free, free)], xty[free])
        except np.linalg.LinAlgError:
            return None
        neg = [i for i in free[1:] if coef[i] < 0]
        if not neg:
            return tuple(float(v) for v in coef)
        free.remove(neg[0])


def may_admit(target: float, predicted_tail: float | None, recent: float | None) -> bool:
    """Whether one more sequence may join those running: the prediction (tail included) of a step with it,
    and the recent measured step time, both within the target. Before the model can predict (steps that
    all had the same number of rows teach it nothing: one sequence fed a one-token prompt, say), the
    recent steps decide alone; the batcher then lets sequences join one at a time, so the steps measure
    each size before the next."""
    if recent is not None and recent > target:
        return False
    return predicted_tail is None or predicted_tail <= target


def prompt_budget(target: float | None, model: LatencyModel, decode: int, chunk: int) -> int:
    """Prompt rows the next step may take beside `decode` decode rows: the most that keep the predicted
    step (tail included) within the target, between 1 (a prompt always advances) and `chunk`. With no
    target, no decode rows to protect or no model yet: the whole chunk."""
    if target is None or decode == 0 or model.coef is None:
        return chunk
    a, b, c = model.coef
    room = target - model.tail() - (a + b * decode)  # seconds left for prompt rows, tail taken out
    if c <= 0:
        return chunk if room > 0 else 1
    return max(1, min(chunk, math.floor(room / c + 1e-9)))  # (a row that just fits, rounding aside)
