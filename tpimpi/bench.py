"""Benchmark generation: tpimpi at the launched rank count, or a baseline in one process.

    mpirun -np 4 python -m tpimpi.bench --new-tokens 32 --repeat 5
    python -m tpimpi.bench --baseline transformers --new-tokens 32 --repeat 5
    python -m tpimpi.bench --baseline accelerate --new-tokens 32 --repeat 5
    python -m tpimpi.bench --baseline llama.cpp --new-tokens 32 --repeat 5   (pip install llama-cpp-python)

Each run warms up, then generates --repeat times with greedy decoding and a fixed number of new tokens
(end-of-sequence does not stop it, so every system does the same work), and appends one JSON line with
medians and the configuration to --out (default: $TPIMPI_CACHE/results/bench.jsonl, outside the
repository). Rank 0 prints a one-line summary.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from . import __version__
from . import comm as comm_mod
from .errors import TpimpiError, UsageError
from .resources import MemoryOptions
from . import trace
from .generate import add_memory_args, trace_attrs
from .planner.planfile import apply_to_args, check_store
from .sampling import SamplingConfig
from .shard import parse_ratios

DEFAULT_PROMPT = "Explain in a few sentences why the sky is blue."
RESULTS = "results/bench.jsonl"  # under the cache directory, outside the repository: see default_out()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tpimpi.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="store, .gguf or Hugging Face directory (default: the default model)")
    p.add_argument("--baseline", choices=["transformers", "accelerate", "llama.cpp"],
                   help="run a baseline in one process instead: transformers in memory, Accelerate disk offload, or "
                   "llama.cpp on the same GGUF (through llama-cpp-python, an optional install)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--allreduce", choices=comm_mod.ALLREDUCE_ALGOS, default="star")
    p.add_argument("--link-latency-ms", type=float, default=0.0, help="emulate a network link: latency per message")
    p.add_argument("--link-bandwidth-mbps", type=float, default=0.0, help="emulate a network link: bandwidth")
    p.add_argument("--threads", type=int, help="threads per rank (default: cores / local ranks)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="storage dtype when a source has to be converted (default float32)")
    p.add_argument("--ratios", help="relative share of each rank, e.g. 0.36,0.64 (when converting)")
    p.add_argument("--plan-file", help="run as this plan says (tpimpi.plan); the prediction is recorded beside")
    p.add_argument("--max-seq-len", type=int, help="context for the KV cache (default 1024, or the plan's)")
    p.add_argument("--disk", action="store_true", help="first measure the raw O_DIRECT read bandwidth of the "
                   "rank files, for the ratio of the bandwidth decode achieves")
    p.add_argument("--label", default="", help="free text stored with the result")
    p.add_argument("--trace", metavar="FILE.h5", help="record per-token events of the measured runs (tpimpi.trace)")
    add_memory_args(p)
    p.add_argument("--out", help="JSON-lines file the result is appended to (default: $TPIMPI_CACHE/"
                   f"{RESULTS}, i.e. ~/.cache/tpimpi/{RESULTS}; the jobs/ scripts that publish figures name "
                   "data/results/... explicitly)")
    return p


def default_out() -> Path:
    """Where results go unless --out says: beside the cache, never into the checkout's committed results."""
    from .models import cache_root

    return cache_root() / RESULTS


def summarize(runs: list[dict]) -> dict:
    """Medians over repetitions of TTFT and per-token decode latency (with its p90)."""
    gaps = [b - a for r in runs for a, b in zip(r["token_times_s"], r["token_times_s"][1:])]
    gaps.sort()
    med = statistics.median(r["decode_s_per_token"] for r in runs)
    return {
        "ttft_s": statistics.median(r["ttft_s"] for r in runs),
        "s_per_token": med,
        "s_per_token_p90": gaps[min(len(gaps) - 1, int(0.9 * len(gaps)))] if gaps else None,
        "tokens_per_s": 1.0 / med,
        "repeat": len(runs),
    }


def cpu_model() -> str:
    """The processor's name and its widest vector extension, from /proc/cpuinfo (Linux)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    fields = [line.split(":", 1) for line in info.splitlines() if ":" in line]
    name = next((v.strip() for k, v in fields if k.strip() in ("model name", "Model")), "")
    flags = set(next((v.split() for k, v in fields if k.strip() in ("flags", "Features")), []))
    vector = next((f for f in ("avx512f", "avx2", "sve", "asimd", "neon") if f in flags), "")
    return f"{name} ({vector})" if vector else name


def machine() -> dict:
    import numpy
    import torch
    from threadpoolctl import threadpool_info

    blas = [f"{p['internal_api']} {p['version']}" for p in threadpool_info() if p["user_api"] == "blas"]
    return {"host": platform.node(), "machine": platform.machine(), "cpu": cpu_model(),
            "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "blas": ", ".join(blas), **comm_mod.versions(), "tpimpi": __version__}


def raw_read_seconds(store, chunk: int = 64 << 20) -> float:
    """Seconds to read this rank's whole weight file sequentially with O_DIRECT (no page cache)."""
    from .scheduler import aligned_buffer

    mm, _ = aligned_buffer(chunk)
    fd = os.open(store.path, os.O_RDONLY | os.O_DIRECT)
    size, off = os.fstat(fd).st_size, 0
    t = time.perf_counter()
    while off < size:
        got = os.preadv(fd, [memoryview(mm)], off)
        if got <= 0:
            break
        off += got
    os.close(fd)
    return time.perf_counter() - t


def bench_tpimpi(comm, args) -> dict | None:
    from .engine import Engine, collective, prepare_store
    from .resources import set_threads

    plan = apply_to_args(comm, args)
    comm.link = comm_mod.Link.from_cli(args.link_latency_ms, args.link_bandwidth_mbps)
    args.max_seq_len = args.max_seq_len or 1024
    mem = MemoryOptions.from_args(args) if plan is None else plan.memory_options(comm.rank, args.io, args.compute)
    threads = set_threads(args.threads, "blas" if mem.compute == "float32" else "torch")
    ratios = parse_ratios(args.ratios, comm.size)
    path = prepare_store(comm, args.model, ratios if args.ratios else None, args.dtype)
    if plan is not None:
        collective(comm, check_store, plan, path)
    eng = Engine(comm, path, allreduce=args.allreduce, mem=mem, max_seq=args.max_seq_len)
    disk = None
    if args.disk:
        comm.barrier()
        secs = comm.gather_ints([int(raw_read_seconds(eng.store) * 1e6)])
        total = sum(comm.gather_ints([eng.store.path.stat().st_size]), [])
        disk = sum(total) / (max(s[0] for s in secs) / 1e6)  # all ranks reading at once: bytes/s together
    eng.load()
    ids = collective(comm, lambda: eng.encode_prompt(args.prompt) if comm.rank == 0 else None)
    runs, tracer = [], None
    for i in range(args.warmup + args.repeat):
        if i == args.warmup and args.trace:
            tracer = trace.attach(eng, comm)
        r = eng.generate(ids, SamplingConfig(), args.new_tokens, stop_at_eos=False)
        if i >= args.warmup:
            runs.append(r)
        if comm.rank == 0:
            print(f"  run {i + 1}/{args.warmup + args.repeat}: {r['decode_s_per_token']:.4f} s/token"
                  + (" (warm-up)" if i < args.warmup else ""), file=sys.stderr, flush=True)
    if tracer is not None:
        trace.write(comm, tracer, args.trace, dict(trace_attrs(eng, args.model, plan), repeat=args.repeat))
    eng.close()
    if comm.rank != 0:
        return None
    last, summary = runs[-1], summarize(runs)
    out = {"system": "tpimpi", "ranks": comm.size, "ratios": list(ratios), "allreduce": args.allreduce,
           "link_latency_ms": args.link_latency_ms, "link_bandwidth_mbps": args.link_bandwidth_mbps,
           "threads": threads, "dtype": eng.store.dtype, "memory": last["memory"], "window": last["window"],
           "streamed_blocks": last["streamed_blocks"], "n_blocks": last["n_blocks"], "io": mem.io,
           "compute": mem.compute, "prompt_tokens": len(ids), "peak_rss_bytes": last["peak_rss_bytes"],
           "mem_limit_bytes": last["mem_limit_bytes"], "cgroup_peak_bytes": last["cgroup_peak_bytes"],
           "predicted_peak_bytes": last["predicted_peak_bytes"], "predicted_bytes": last["predicted_bytes"],
           "per_token": last["per_token"], **summary}
    if plan is not None:
        out.update(plan_file=plan.path, predicted=plan.predicted, plan_devices=list(plan.devices),
                   plan_modes=[m.to_dict() for m in plan.modes])
    # every rank reads its share each token: the bandwidth decode achieves, all ranks together
    read_per_token = sum(last["bytes_read"]) / len(last["token_ids"])
    out["decode_read_Bps"] = read_per_token / summary["s_per_token"]
    if disk:
        out["raw_read_Bps"] = disk
        out["read_ratio"] = out["decode_read_Bps"] / disk
    return out


def bench_baseline(args) -> dict:
    """Hugging Face transformers in one process, same weights, prompt ids and cores: everything in
    memory ("transformers"), or every weight offloaded to disk and loaded per module with Accelerate
    ("accelerate", the TPI-LLM paper's main baseline). The weights are loaded whole first (a GGUF
    goes through transformers' dequantization), so the peak RSS reported is VmHWM counted from after
    the load (Linux lets it be reset); the load's peak is recorded beside it."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM

    from .resources import peak_rss, reset_peak_rss, set_threads
    from .models import default_model_path, prepare
    from .tokenizer import Tokenizer

    set_threads(args.threads, "torch")
    src = Path(args.model) if args.model else default_model_path()
    tok = Tokenizer.load(prepare(str(src), 1, (1.0,)))
    ids = tok.encode(tok.render_chat(args.prompt) if tok.has_chat_template else args.prompt)
    kw = {"gguf_file": src.name} if src.suffix == ".gguf" else {}
    model = AutoModelForCausalLM.from_pretrained(str(src.parent if kw else src), dtype=torch.float32, **kw).eval()
    offload = None
    if args.baseline == "accelerate":
        import gc

        from accelerate import disk_offload

        offload = tempfile.TemporaryDirectory(prefix="tpimpi-offload-")
        model = disk_offload(model, offload.name, execution_device=torch.device("cpu"))
        gc.collect()
    load_peak = peak_rss()
    reset_peak_rss()  # from here VmHWM is generation's peak, every transient within a forward pass included
    runs = []
    for i in range(args.warmup + args.repeat):
        with torch.inference_mode():
            t0 = time.perf_counter()
            times = []
            out = model(input_ids=torch.tensor([ids]), use_cache=True)
            for _ in range(args.new_tokens):
                nxt = int(out.logits[0, -1].argmax())
                times.append(time.perf_counter() - t0)
                if len(times) == args.new_tokens:
                    break
                out = model(input_ids=torch.tensor([[nxt]]), past_key_values=out.past_key_values, use_cache=True)
        if i >= args.warmup:
            n = len(times)
            runs.append({"ttft_s": times[0], "decode_s_per_token": (times[-1] - times[0]) / (n - 1),
                         "token_times_s": times})
    peak = peak_rss()
    if offload is not None:
        offload.cleanup()
    return {"system": args.baseline, "ranks": 1, "threads": torch.get_num_threads(), "prompt_tokens": len(ids),
            "peak_rss_bytes": [peak], "load_peak_rss_bytes": load_peak, **summarize(runs)}


def prompt_ids(args, src: Path) -> list[int]:
    """The prompt's token ids as tpimpi encodes them (chat template applied), for a baseline."""
    from .models import prepare
    from .tokenizer import Tokenizer

    tok = Tokenizer.load(prepare(str(src), 1, (1.0,)))
    return tok.encode(tok.render_chat(args.prompt) if tok.has_chat_template else args.prompt)


def load_llama_cpp(path: Path, n_ctx: int, threads: int, logits_all: bool = False):
    """llama-cpp-python's Llama on a GGUF file (UsageError when the package or the file is missing)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise UsageError("the llama.cpp baseline needs llama-cpp-python: pip install llama-cpp-python "
                         "(it builds llama.cpp from source, about 6 minutes)") from None
    if path.suffix != ".gguf" or not path.is_file():
        raise UsageError(f"the llama.cpp baseline runs a .gguf file; {str(path)!r} is not one")
    return Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                 logits_all=logits_all, verbose=False)


def bench_llama_cpp(args) -> dict:
    """llama.cpp on the same GGUF, prompt ids, threads and number of new tokens: greedy (temperature 0),
    end-of-sequence not stopping it, timed from the call to each token it yields."""
    from .resources import peak_rss, reset_peak_rss, set_threads
    from .models import default_model_path

    threads = set_threads(args.threads, "torch")
    src = Path(args.model) if args.model else default_model_path()
    n_ctx = args.max_seq_len or 1024  # the context tpimpi's runs get (bench_tpimpi)
    llm = load_llama_cpp(src, n_ctx, threads)  # refused before any conversion if it cannot run
    ids = prompt_ids(args, src)
    if len(ids) + args.new_tokens > n_ctx:
        raise UsageError(f"{len(ids)} prompt tokens and {args.new_tokens} new ones do not fit a context of {n_ctx}: "
                         "raise --max-seq-len")
    load_peak = peak_rss()
    reset_peak_rss()
    runs = []
    for i in range(args.warmup + args.repeat):
        times, t0 = [], time.perf_counter()
        for _ in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            times.append(time.perf_counter() - t0)
            if len(times) == args.new_tokens:
                break
        if i >= args.warmup:
            runs.append({"ttft_s": times[0], "decode_s_per_token": (times[-1] - times[0]) / (len(times) - 1),
                         "token_times_s": times})
    import llama_cpp

    return {"system": "llama.cpp", "llama_cpp_python": llama_cpp.__version__, "ranks": 1, "threads": threads,
            "prompt_tokens": len(ids), "peak_rss_bytes": [peak_rss()], "load_peak_rss_bytes": load_peak,
            **summarize(runs)}


def record(result: dict, args, out: str) -> None:
    result.update(model=args.model or "default", new_tokens=args.new_tokens, label=args.label,
                  time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  command=" ".join(sys.argv), machine=machine())
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        f.write(json.dumps(result) + "\n")
    print(f"{result['system']} ranks={result['ranks']}: TTFT {result['ttft_s']:.3f} s, "
          f"{result['s_per_token']:.4f} s/token (p90 {result['s_per_token_p90']:.4f}), "
          f"{result['tokens_per_s']:.1f} tokens/s, peak RSS {max(result['peak_rss_bytes']) / 2**20:.0f} MiB"
          + (f", decode reads {result['decode_read_Bps'] / 1e9:.2f} GB/s" if result.get("decode_read_Bps") else "")
          + (f" = {result['read_ratio']:.2f} x raw {result['raw_read_Bps'] / 1e9:.2f} GB/s" if "read_ratio" in result
             else "") + f" -> {out}", flush=True)


def main(argv=None) -> int:
    comm = comm_mod.world()
    try:
        args = build_parser().parse_args(argv)
        if args.new_tokens < 2 or args.repeat < 1 or args.warmup < 0:
            raise UsageError("--new-tokens must be at least 2, --repeat at least 1, --warmup at least 0")
        if args.baseline:
            if comm.size > 1:
                raise UsageError("a baseline runs in one process: start it without mpirun")
            result = bench_llama_cpp(args) if args.baseline == "llama.cpp" else bench_baseline(args)
        else:
            result = bench_tpimpi(comm, args)
        if comm.rank == 0:
            record(result, args, args.out or str(default_out()))
    except TpimpiError as e:
        if comm.rank == 0:
            print(f"tpimpi.bench: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
