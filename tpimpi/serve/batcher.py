"""Continuous batching: the step loop every rank runs, and rank 0's choice of what each step computes.

Each step runs one forward pass over rows of several sequences ([T, hidden] through every layer and both
allreduces): one row per decoding sequence, plus prompt rows of sequences still prefilling, at most
--prefill-chunk of them, so a long prompt delays the running sequences by one chunk per step, not by
the whole prompt. Every sequence has a KV-cache slot of its own; a finished or cancelled one gives its
slot back before the next step, and the ids its keys and values were made from stay on record: a new
sequence takes the free slot that shares the longest start with its prompt and is fed from there (the
prompt cache; a chat template's system prompt is fed once, not once per request). New sequences join
between steps while the measured latency allows (DFTSP: a per-token latency target decides admission and
the prefill rows).

Rank 0 decides and broadcasts a fixed-size int64 control word: [command, segments, rows, then (slot, pos,
n) per segment]; the others only ever see it and hidden states (no token ids, no text).
"""

from __future__ import annotations

import collections
import gc
import json
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..sampling import SamplingConfig, StopText, sample
from .latency import LatencyModel, may_admit, prompt_budget

CMD_STOP, CMD_RUN = 0, 1
CTRL_HEAD = 3  # command, segments, rows
BUSY_POLL_S = 0.05  # how long a worker polls for the next step before it sleeps (rank 0 samples meanwhile)


def common_prefix(a, b, most: int) -> int:
    """How many leading items a and b share, at most `most`."""
    n = min(len(a), len(b), max(0, most))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def control_word(slots: int) -> np.ndarray:
    """The step's control array: [command, n segments, T rows, (slot, pos, n) x slots]."""
    return np.zeros(CTRL_HEAD + 3 * slots, dtype=np.int64)


def pack(ctrl: np.ndarray, segments: list[tuple[int, int, int]] | None) -> None:
    """Write a step (or, for None, the stop command) into ctrl."""
    ctrl[:] = 0
    if segments is None:
        return
    ctrl[0], ctrl[1], ctrl[2] = CMD_RUN, len(segments), sum(n for _, _, n in segments)
    for i, seg in enumerate(segments):
        ctrl[CTRL_HEAD + 3 * i : CTRL_HEAD + 3 * i + 3] = seg


def unpack(ctrl: np.ndarray) -> list[tuple[int, int, int]] | None:
    """The segments of a step, or None for stop."""
    if ctrl[0] == CMD_STOP:
        return None
    k = int(ctrl[1])
    return [tuple(int(v) for v in ctrl[CTRL_HEAD + 3 * i : CTRL_HEAD + 3 * i + 3]) for i in range(k)]


@dataclass(eq=False)
class Sequence:
    """One request's generation on rank 0. `emit(kind, ...)` hands events to the HTTP side (thread-safe):
    ("text", str), ("done", finish_reason, prompt_tokens, completion_tokens, cached_prompt_tokens),
    ("error", status, message)."""

    prompt_ids: list[int]
    max_new: int
    samp: SamplingConfig
    stops: tuple[str, ...]
    emit: object
    rid: str = ""  # the response's id (the step log names a step's sequences by it)
    t_submit: float = field(default_factory=time.perf_counter)
    cancelled: bool = False  # set by the HTTP side when the client goes away
    slot: int = -1
    pos: int = 0  # positions already in the KV cache
    cached: int = 0  # prompt ids whose keys and values the slot held already (the prompt cache)
    pending: list[int] = field(default_factory=list)  # ids to feed (the prompt, then the last sampled id)
    out_ids: list[int] = field(default_factory=list)
    t_first: float | None = None
    gen: torch.Generator | None = None  # the sampler's random stream, seeded by the request
    stream: object = None  # the tokenizer's incremental decoder
    text: StopText | None = None
    seen: torch.Tensor | None = None  # [n] ids so far, for the repetition penalty

    def cancel(self) -> None:
        self.cancelled = True


class ShuttingDown(Exception):
    pass


class QueueFull(Exception):
    pass


class Batcher:
    """Rank 0's scheduler: waiting queue, slots, admission under the latency target, sampling, stop rules."""

    def __init__(self, head, tok, max_seq: int, slots: int, chunk: int, max_queue: int,
                 max_token_latency_s: float | None = None, shutdown_timeout_s: float = 10.0, step_log=None,
                 prompt_cache: bool = True):
        self.head, self.tok, self.max_seq, self.chunk = head, tok, max_seq, chunk
        self.max_queue, self.target = max_queue, max_token_latency_s
        self.shutdown_timeout_s = shutdown_timeout_s
        self.free = list(range(slots - 1, -1, -1))  # slot numbers, next to use last
        # the prompt cache: the ids whose keys and values a free slot still holds at positions 0, 1, ... (what
        # its last sequence fed); a new sequence takes the free slot that shares the longest prefix with its
        # prompt and starts after it (None: off, every prompt is fed whole)
        self.held: dict[int, list[int]] | None = {} if prompt_cache else None
        self.cached_tokens = 0  # prompt ids not fed again thanks to the cache, over the server's life
        self.active: list[Sequence] = []  # in admission order
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.cond = threading.Condition()
        self.latency = LatencyModel()
        self.recent_s: float | None = None  # moving average of the latest decode steps' time
        self.draining_since: float | None = None
        self.steps = self.rows_total = 0
        self._step: list[tuple[Sequence, int, int]] = []  # (sequence, first row, rows) of the step running
        self._t_step, self._t_ask, self._step_decodes = 0.0, 0.0, 0
        self._texts: list[str] = []  # rid of every text event this step handed out, in order
        self.step_log = step_log  # a text file: one JSON line per step (--step-log), or None
        self.gc_s, self._gc_t0 = 0.0, 0.0  # seconds the garbage collector ran (any thread) since the last step
        if step_log is not None:
            gc.callbacks.append(self._gc_clock)

    # ---- the HTTP side ----------------------------------------------------------------------------------
    def submit(self, seq: Sequence) -> None:
        """Queue a sequence (any thread); ShuttingDown or QueueFull when it cannot be taken."""
        with self.cond:
            if self.draining_since is not None:
                raise ShuttingDown()
            if len(self.waiting) >= self.max_queue + len(self.free):  # those beyond the free slots wait
                raise QueueFull()
            self.waiting.append(seq)
            self.cond.notify()

    def wake(self) -> None:
        with self.cond:
            self.cond.notify()

    def drain(self) -> None:
        """Stop taking requests; running ones finish (or are cancelled after shutdown_timeout_s). Safe to call
        from a signal handler: it only sets a field (the loop wakes within 0.1 s)."""
        if self.draining_since is None:
            self.draining_since = time.monotonic()

    def cancel_all(self, message: str) -> None:
        """Stop taking requests and answer every waiting and running one with a 503 error now (the process is
        about to end: the slots are not given back)."""
        with self.cond:
            self.draining_since = self.draining_since or time.monotonic()
            for seq in [*self.waiting, *self.active]:
                seq.emit("error", 503, message)

    def load(self) -> dict:
        return {"running": len(self.active), "waiting": len(self.waiting), "free_slots": len(self.free),
                "steps": self.steps, "rows": self.rows_total, "cached_prompt_tokens": self.cached_tokens}

    # ---- the step loop (rank 0) ---------------------------------------------------------------------------
    def next_step(self) -> list[tuple[int, int, int]] | None:
        """Block until there is work; the segments of the next step, or None once drained."""
        self._t_ask = time.perf_counter()
        with self.cond:
            while True:
                self._drop_cancelled()
                if self.draining_since is not None:
                    self._shut_down()
                self._admit()
                if self.active:
                    break
                if self.draining_since is not None:
                    return None
                self.cond.wait(0.1)
                self._t_ask = time.perf_counter()  # idle time is no step's
            return self._plan()

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self.active if s.cancelled]:
            self._release(seq)
        if any(s.cancelled for s in self.waiting):
            self.waiting = collections.deque(s for s in self.waiting if not s.cancelled)

    def _shut_down(self) -> None:
        while self.waiting:
            self.waiting.popleft().emit("error", 503, "the server is shutting down")
        if time.monotonic() - self.draining_since > self.shutdown_timeout_s:
            for seq in list(self.active):
                seq.emit("error", 503, "the server shut down before this request finished")
                self._release(seq)

    def _decoding(self) -> list[Sequence]:
        return [s for s in self.active if s.out_ids]

    def _admit(self) -> None:
        """Waiting sequences take free slots. Under a latency target one joins at a time, once every running
        sequence decodes (so the steps have measured the batch as it is before it grows; sequences that
        joined together would all start decoding in one step, at a size nobody has measured, as a burst of
        requests at start-up did), and only while the prediction of a step with it stays within the target."""
        while self.waiting and self.free:
            if self.target is not None and self.active and (
                    any(not s.out_ids for s in self.active) or not may_admit(
                        self.target, self.latency.predict_tail(len(self.active) + 1), self.recent_s)):
                return  # DFTSP: one more decoding sequence would take the steps past the target
            seq = self.waiting.popleft()
            seq.slot, seq.cached = self._take_slot(seq.prompt_ids)
            seq.pos, seq.pending = seq.cached, list(seq.prompt_ids[seq.cached :])
            self.cached_tokens += seq.cached
            seq.gen = torch.Generator().manual_seed(seq.samp.seed)
            seq.stream = self.tok.stream()
            seq.text = StopText(seq.stops, self.tok.decode(seq.prompt_ids[-8:]) if seq.stops else "")
            if seq.samp.repetition_penalty != 1.0:
                seq.seen = torch.unique(torch.tensor(seq.prompt_ids, dtype=torch.long))
            self.active.append(seq)

    def _take_slot(self, ids: list[int]) -> tuple[int, int]:
        """A free slot for a prompt, and how many of its first ids that slot's cache holds already: the
        slot sharing the longest prefix (the latest freed among equals), never the whole prompt (its last
        id is fed for the logits of the first token)."""
        best, shared = len(self.free) - 1, 0
        if self.held is not None:
            for i, slot in enumerate(self.free):
                n = common_prefix(self.held.get(slot, ()), ids, len(ids) - 1)
                if n > shared or (n == shared and i > best):
                    best, shared = i, n
        return self.free.pop(best), shared

    def _plan(self) -> list[tuple[int, int, int]]:
        segments, self._step = [], []
        decoding = self._decoding()
        budget = prompt_budget(self.target, self.latency, len(decoding), self.chunk)
        row = 0
        for seq in self.active:
            if seq.out_ids:
                n = 1
            elif budget > 0:
                n = min(len(seq.pending), budget)
                budget -= n
            else:
                continue
            segments.append((seq.slot, seq.pos, n))
            self._step.append((seq, row, n))
            row += n
        self._step_decodes = len(decoding)  # decode rows (the rest are prompt rows)
        self._t_step = time.perf_counter()
        return segments

    def embed(self, x: torch.Tensor) -> None:
        """Rows of this step's input: embedding rows of the ids each segment feeds."""
        ids = [i for seq, _, n in self._step for i in seq.pending[:n]]
        self.head.embed_into(ids, x[: len(ids)])

    def finish_step(self, x: torch.Tensor) -> None:
        """After the forward pass: logits of the sequences now due a token, sampled, checked, sent."""
        due = []
        for seq, row, n in self._step:
            seq.pos += n
            seq.pending = seq.pending[n:]
            if not seq.pending:
                due.append((seq, row + n - 1))
        # one pass over the head every step, even mid-prompt: its chunks are part of rank 0's block cycle
        rows = [r for _, r in due] or [x.shape[0] - 1]
        logits = self.head.logits_batch(x[torch.tensor(rows)] if len(rows) > 1 else x[rows[0]].unsqueeze(0))
        now = time.perf_counter()
        # every token sampled before any is handed out: the HTTP thread, woken by the first, then finds
        # them all at once instead of taking the GIL back and forth with the sampling (http.HttpFront._post)
        picked = [(seq, sample(logits[j], seq.samp, seq.gen, seq.seen)) for j, (seq, _) in enumerate(due)
                  if not seq.cancelled]
        with self.cond:
            for seq, nxt in picked:
                self._advance(seq, nxt, now)
        rows_run = sum(n for _, _, n in self._step)
        end = time.perf_counter()
        # the whole cycle since the loop asked for this step: the gap a decoding sequence's client sees
        took, decode = end - self._t_ask, self._step_decodes
        self.latency.add(decode, rows_run - decode, took)
        if decode:
            self.recent_s = took if self.recent_s is None else 0.8 * self.recent_s + 0.2 * took
        self.steps += 1
        self.rows_total += rows_run
        if self.step_log is not None:  # times in perf_counter seconds (one clock for every process here);
            # active and waiting: sequences holding a slot and waiting for one after the step
            self.step_log.write(json.dumps(
                {"step": self.steps, "ask": self._t_ask, "start": self._t_step, "forward": now, "end": end,
                 "decode": decode, "prefill": rows_run - decode, "active": len(self.active),
                 "waiting": len(self.waiting), "texts": self._texts, "gc": self.gc_s}) + "\n")
        self._texts, self.gc_s = [], 0.0

    def _advance(self, seq: Sequence, nxt: int, now: float) -> None:
        seq.out_ids.append(nxt)
        seq.t_first = seq.t_first or now
        if seq.seen is not None and not bool((seq.seen == nxt).any()):
            seq.seen = torch.cat([seq.seen, torch.tensor([nxt])])
        eos = nxt in self.tok.eos_ids
        if not eos:
            out = seq.text.add(seq.stream.push(nxt))
            if out:
                self._text(seq, out)
        finish = None
        if eos or seq.text.stopped:
            finish = "stop"
        elif len(seq.out_ids) >= seq.max_new or seq.pos + 1 > self.max_seq:
            finish = "length"
        if finish is None:
            seq.pending = [nxt]
            return
        out = seq.text.add(seq.stream.flush()) + seq.text.finish()
        if out:
            self._text(seq, out)
        seq.emit("done", finish, len(seq.prompt_ids), len(seq.out_ids), seq.cached)
        self._release(seq)

    def _gc_clock(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_t0 = time.perf_counter()
        else:
            self.gc_s += time.perf_counter() - self._gc_t0

    def _text(self, seq: Sequence, out: str) -> None:
        seq.emit("text", out)
        self._texts.append(seq.rid)

    def _release(self, seq: Sequence) -> None:
        """The slot goes back at once; the next step no longer has the sequence."""
        if seq in self.active:
            self.active.remove(seq)
            self.free.append(seq.slot)
            if self.held is not None:  # positions 0..pos-1 of the slot hold these ids' keys and values
                self.held[seq.slot] = (seq.prompt_ids + seq.out_ids)[: seq.pos]


def step_loop(comm, model, batcher: Batcher | None) -> int:
    """The loop every rank runs while serving; rank 0 (the only one with a batcher) decides each step.
    Returns the number of steps run."""
    comm.in_lockstep = True  # from here an error on one rank cannot be agreed on: it ends the job
    ctrl = control_word(model.slots)
    steps = 0
    while True:
        if comm.rank == 0:
            pack(ctrl, batcher.next_step())
        # workers poll while steps follow each other closely, and sleep here between requests
        comm.bcast_idle_(ctrl, BUSY_POLL_S if steps else 0.0)
        segments = unpack(ctrl)
        if segments is None:
            break
        T = int(ctrl[2])
        if comm.rank == 0:
            batcher.embed(model.x)
        comm.bcast_(model.x_np[:T])
        x = model.forward_batch(segments)
        if comm.rank == 0:
            batcher.finish_step(x)
        steps += 1
    comm.in_lockstep = False
    return steps
