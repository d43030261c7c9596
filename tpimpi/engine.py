"""The engine every rank runs: load a store, and generate with rank 0 deciding each step.

Rank 0 tokenizes, embeds, applies the final norm and output head, samples and prints. Every rank
runs the same loop over its slice of every layer; rank 0 broadcasts a control word each step
(run T positions from pos, or stop) and the hidden states to start from.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch

from . import native
from .errors import TpimpiError, UsageError
from .head import Head
from .model import RankModel
from .models import prepare
from .resources import (DEFAULT_MAX_SEQ, MemoryOptions, cgroup_figures, memory_plan, peak_rss, reset_peak_rss,
                        threads_in_use)
from .sampling import SamplingConfig, StopText, sample
from .scheduler import BlockScheduler
from .stage import open_rank_store

CMD_STOP, CMD_RUN = 0, 1


def collective(comm, fn, *a):
    """Run fn on this rank; if it fails on any rank, every rank raises the same error. Any exception counts,
    not only tpimpi's own: a bug that raised on one rank alone would otherwise leave the others waiting in
    the next collective call."""
    try:
        out, err = fn(*a), None
    except TpimpiError as e:
        out, err = None, str(e)
    except Exception as e:  # noqa: BLE001 (every rank must learn of it)
        out, err = None, f"{type(e).__name__}: {e} (unexpected: a bug in tpimpi, or in a library it calls)"
    comm.agree(err)
    return out


def prepare_store(comm, model: str | None, ratios=None, dtype: str | None = None) -> str:
    """Collective: the store to run, found or converted by rank 0 while the others wait without spinning
    (ratios and dtype: how to convert a source; None: the defaults)."""
    path = collective(comm, lambda: str(prepare(model, comm.size, ratios, dtype)) if comm.rank == 0 else "")
    comm.barrier()
    reset_peak_rss()  # a first run converts in a child process; nothing before this is part of running the model
    return comm.bcast_bytes(path.encode()).decode()


class Engine:
    """A loaded model on every rank, ready to answer prompts one after another."""

    def __init__(self, comm, path: str, *, max_seq=None, allreduce="star", verify="auto",
                 mem: MemoryOptions = MemoryOptions(), slots: int = 1):
        self.comm, self.mem, self.allreduce, self.path, self.slots = comm, mem, allreduce, str(path), slots
        # every rank opens and checks its own weight file
        self.store = st = collective(comm, lambda: open_rank_store(self.path, comm.rank, comm.size, verify))
        self.cfg = cfg = st.cfg
        self.max_seq = max_seq or min(cfg.max_context, DEFAULT_MAX_SEQ)
        if self.max_seq > cfg.max_context:
            raise UsageError(f"--max-seq-len {self.max_seq} exceeds the model's context of {cfg.max_context}")
        self.specs, self.plan = collective(comm, memory_plan, cfg, st.slice, comm.rank, comm.size, st.dtype,
                                            self.max_seq, mem, st.data_start, slots)

    def load(self) -> "Engine":
        """Read the resident blocks, start the window reader, and (rank 0) load tokenizer and head."""
        comm, st, plan = self.comm, self.store, self.plan
        self.blocks = collective(comm, lambda: BlockScheduler(st, self.specs, set(plan.resident), plan.window,
                                                               self.mem.io, self.mem.compute))
        self.tok, self.head = collective(comm, lambda: self._load_master() if comm.rank == 0 else (None, None))
        self.model = RankModel(self.cfg, st.slice, self.blocks, comm, self.max_seq, self.allreduce,
                               self.mem.prefill_chunk, self.slots)
        return self

    def close(self) -> None:
        """Stop the reader thread and close the weight file."""
        self.blocks.close()
        self.store.close()

    def auto_choices(self) -> list[dict] | None:
        """With --allreduce auto: the algorithm the start-up measurement chose for each message size."""
        table = getattr(self.comm, "_auto", None) if self.allreduce == "auto" else None  # comm.setup's table
        return [{"up_to_floats": n, "algorithm": a} for n, a in table] if table else None

    def _load_master(self):
        from .tokenizer import Tokenizer

        tok = Tokenizer.load(self.path)
        if tok.vocab_size > self.cfg.vocab:
            raise TpimpiError(f"the tokenizer has {tok.vocab_size} tokens but the model only {self.cfg.vocab} rows")
        return tok, Head(self.store, self.blocks, range(2 * self.cfg.n_layers, len(self.specs)), tok.vocab_size)

    def encode_prompt(self, text: str, raw: bool = False, system: str | None = None) -> list[int]:
        """Rank 0: the prompt's token ids (chat template applied unless raw), checked against the context."""
        tok = self.tok
        if tok.has_chat_template and not raw:
            messages = ([{"role": "system", "content": system}] if system is not None else [])
            ids = tok.encode_chat([*messages, {"role": "user", "content": text}])
        else:
            ids = tok.encode(text)
        if not ids:
            raise UsageError("the prompt encodes to no tokens")
        if len(ids) >= self.max_seq:
            raise UsageError(f"the prompt is {len(ids)} tokens; --max-seq-len {self.max_seq} leaves no room to "
                             f"generate (raise --max-seq-len, up to the model's {self.cfg.max_context}, "
                             f"or shorten the prompt)")
        return ids

    def generate(self, prompt_ids, samp: SamplingConfig, max_new: int, stream: bool = False,
                 stop_at_eos: bool = True, start_pos: int = 0, stop: tuple[str, ...] = ()) -> dict:
        """All ranks: one generation. Rank 0 gets the result and per-rank figures; others get {}."""
        comm, model, blocks = self.comm, self.model, self.blocks
        model.t_comm = model.t_forward = blocks.io_wait_s = 0.0
        read0 = blocks.total_bytes_read
        result = decode_loop(comm, model, self.head, self.tok, prompt_ids, samp, max_new, self.max_seq, stream,
                             stop_at_eos, start_pos, stop)
        times = (blocks.io_wait_s, model.t_comm, model.t_forward - blocks.io_wait_s - model.t_comm)
        mine = [peak_rss(), blocks.total_bytes_read - read0, *(int(t * 1e6) for t in times), *cgroup_figures(),
                self.plan.total]
        rss, read, io_us, comm_us, compute_us, limit, cg_peak, predicted = zip(*comm.gather_ints(mine))
        if comm.rank == 0:
            n = max(1, len(result["token_ids"]))
            result.update(
                peak_rss_bytes=list(rss), predicted_peak_bytes=self.plan.total, predicted_bytes=list(predicted),
                bytes_read=list(read),
                mem_limit_bytes=[v or None for v in limit], cgroup_peak_bytes=[v or None for v in cg_peak],
                io_wait_s=[t / 1e6 for t in io_us], allreduce_s=[t / 1e6 for t in comm_us],
                compute_s=[t / 1e6 for t in compute_us],
                per_token={"io_wait_s": max(io_us) / 1e6 / n, "allreduce_s": max(comm_us) / 1e6 / n,
                           "compute_s": max(compute_us) / 1e6 / n, "bytes_read": max(read) // n},
                ranks=comm.size, allreduce=self.allreduce, allreduce_auto=self.auto_choices(),
                store=self.path, threads=threads_in_use(), float32_kernel=native.kernel_name(),
                memory=self.plan.describe(), window=self.plan.window if self.plan.streamed else None,
                streamed_blocks=self.plan.streamed, n_blocks=self.plan.n_blocks)
        return result


def decode_loop(comm, model, head, tok, prompt_ids, samp, max_new, max_seq, stream=True, stop_at_eos=True,
                start_pos=0, stop=()) -> dict:
    """The loop every rank runs. Rank 0 decides; the others follow its control word.

    Rank 0 feeds prompt_ids[start_pos:] at positions start_pos.. (the KV cache already holds the ones
    before: a conversation's earlier turns), then generates until max_new tokens, an end-of-turn token,
    a stop string or the end of the context. Its result says which ("stop_reason") and how many
    positions the cache now holds ("positions").
    """
    comm.in_lockstep = True  # from here an error on one rank cannot be agreed on: it ends the job
    ctrl = np.zeros(3, dtype=np.int64)  # [command, T, pos]
    gen = torch.Generator().manual_seed(samp.seed)
    out_ids, pending, pos = [], list((prompt_ids or [])[start_pos:]), start_pos
    reason = None
    if comm.rank == 0:
        penalize = samp.repetition_penalty != 1.0
        seen = torch.unique(torch.tensor(prompt_ids, dtype=torch.long)) if penalize else None  # [n] ids so far
        decoder = tok.stream() if stream or stop else None  # else the text is decoded once, at the end
        text = StopText(tuple(stop), tok.decode(prompt_ids[-8:]) if stop else "")
        out = sys.stdout if stream else None
    t0 = time.perf_counter()
    t_first = t_last = None
    times = []  # seconds from the start to each generated token
    while True:
        if comm.rank == 0:
            if stop_at_eos and out_ids and out_ids[-1] in tok.eos_ids:
                reason = "eos"
            elif text.stopped:
                reason = "stop_string"
            elif len(out_ids) >= max_new:
                reason = "length"
            elif pos + len(pending) > max_seq:
                reason = "context_full"
            ctrl[:] = (CMD_STOP if reason else CMD_RUN, min(len(pending), model.chunk), pos)
        comm.bcast_(ctrl)
        if ctrl[0] == CMD_STOP:
            break
        T, pos = int(ctrl[1]), int(ctrl[2])
        if comm.rank == 0:
            head.embed_into(pending[:T], model.x[:T])
        comm.bcast_(model.x_np[:T])
        x = model.forward(T, pos)
        pos += T
        if comm.rank == 0:
            # logits after every pass, even mid-prompt: the head's chunks are part of rank 0's block cycle
            logits = head.logits(x[T - 1])
            pending = pending[T:]
            if pending:  # more of the prompt to feed before the first token
                continue
            nxt = sample(logits, samp, gen, seen)
            out_ids.append(nxt)
            if penalize and not bool((seen == nxt).any()):
                seen = torch.cat([seen, torch.tensor([nxt])])
            pending = [nxt]
            t_last = time.perf_counter()
            t_first = t_first or t_last
            times.append(t_last - t0)
            if decoder is not None and nxt not in tok.eos_ids:
                shown = text.add(decoder.push(nxt))
                if out is not None and shown:
                    out.write(shown)
                    out.flush()
    comm.in_lockstep = False
    if comm.rank != 0:
        return {}
    if decoder is None:  # neither streamed nor checked for stop strings: decoded once
        shown = text.add(tok.decode([i for i in out_ids if i not in tok.eos_ids]))
    else:
        shown = text.add(decoder.flush())
    shown += text.finish()
    if out is not None:
        # the answer ends its line, so what is printed after it (statistics, the next prompt) starts a new one
        out.write(shown + ("" if text.text.endswith("\n") else "\n"))
        out.flush()
    n = len(out_ids)
    return {
        "text": text.text,
        "token_ids": out_ids,
        "prompt_tokens": len(prompt_ids),
        "stop_reason": reason,
        "positions": pos,
        "ttft_s": (t_first - t0) if t_first else None,
        "decode_tokens_per_s": (n - 1) / (t_last - t_first) if n > 1 and t_last > t_first else None,
        "decode_s_per_token": (t_last - t_first) / (n - 1) if n > 1 else None,
        "token_times_s": times,
    }
