"""Load a running server with C concurrent streaming clients and record throughput and latency.

    python -m tpimpi.serve.bench --url http://127.0.0.1:8000 --concurrency 8 --out data/results/serve.jsonl

The clients take C x --requests chat completions (greedy, --max-tokens each) from one shared list, each
sending the next as soon as its last has ended, and time every streamed chunk: C requests stay in flight
until the list runs out. (Each client with a fixed list of its own, as before 2026-12-03, measured how far
the lists' answer lengths differ as much as the server: on the default model 8 such clients ended between
4.1 and 11.2 s into an 11.2 s run, fewer than 8 in flight for 40% of it.) Recorded: aggregate tokens/s over the run and while all clients were in flight,
TTFT and per-token latency (gaps between a client's consecutive tokens) at p50 and p99. jobs/bench_serve.sh runs the sweep.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis briefly.",
           "List three primary colours.", "What is 17 times 3?", "Give me a tip for learning to cook.",
           "Why do cats purr?", "Name a famous bridge.", "Describe a rainy day in one sentence.",
           "What does a compiler do?", "Suggest a name for a goldfish.", "How far is the Moon?",
           "Tell me a fun fact about octopuses.", "What is the boiling point of water?",
           "Translate 'good morning' into Spanish.", "What is a prime number?"]


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100), nearest rank; None for no values."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


async def one_request(session, url: str, headers: dict, prompt: str, max_tokens: int) -> dict:
    """One streamed chat completion: its send time, the arrival time of every chunk with text, its usage."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    t0, times, usage, rid = time.perf_counter(), [], None, None
    async with session.post(url + "/v1/chat/completions", json=body, headers=headers) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {await resp.text()}")
        async for line in resp.content:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                raise RuntimeError(ev["error"]["message"])
            rid = rid or ev.get("id")
            if ev.get("usage"):
                usage = ev["usage"]
            if ev["choices"] and ev["choices"][0].get("delta", {}).get("content"):
                times.append(time.perf_counter())
    return {"id": rid, "t0": t0, "times": times, "tokens": usage["completion_tokens"] if usage else len(times)}


async def run_load(url: str, concurrency: int, requests: int, max_tokens: int,
                   key: str | None) -> tuple[str, list[dict]]:
    """(the served model's name, every request's timings)."""
    import aiohttp

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        todo = collections.deque(range(concurrency * requests))  # request i asks PROMPTS[i % len(PROMPTS)]

        async def client(c: int) -> list[dict]:
            done = []
            while todo:
                i = todo.popleft()
                done.append({"client": c, "request": i,
                             **await one_request(session, url, headers, PROMPTS[i % len(PROMPTS)], max_tokens)})
            return done

        async with session.get(url + "/v1/models", headers=headers) as resp:
            model = (await resp.json())["data"][0]["id"]
        await one_request(session, url, headers, "Hello", 2)  # warm-up: first-call costs are not load
        results = await asyncio.gather(*(client(c) for c in range(concurrency)))
    return model, [r for rs in results for r in rs]


def steady_tokens_per_s(reqs: list[dict]) -> float | None:
    """Tokens/s while every client had a request in flight: from the last client's first request sent to
    the first client's last token (the ramp, when the clients' first prompts arrive together, and the tail,
    when some clients are done, left out). Counted in chunks with text, scaled by the run's tokens per
    chunk. None when no such span exists."""
    clients: dict = {}
    for r in reqs:
        if r["times"]:
            t0, t1 = clients.get(r.get("client", 0), (r["t0"], r["times"][-1]))
            clients[r.get("client", 0)] = (min(t0, r["t0"]), max(t1, r["times"][-1]))
    if not clients:
        return None
    start, end = max(t0 for t0, _ in clients.values()), min(t1 for _, t1 in clients.values())
    chunks = sum(len(r["times"]) for r in reqs)
    inside = sum(start <= t <= end for r in reqs for t in r["times"])
    if end <= start or not inside:
        return None
    return inside * sum(r["tokens"] for r in reqs) / chunks / (end - start)


def summarize(reqs: list[dict]) -> dict:
    """Aggregate tokens/s (every completion token, over the run's wall time from the first request sent to
    the last token; and while every client had a request in flight, `steady_tokens_per_s`), TTFT and
    per-token gaps at p50 and p99."""
    start = min(r["t0"] for r in reqs)
    end = max(r["times"][-1] for r in reqs if r["times"])
    ttft = [r["times"][0] - r["t0"] for r in reqs if r["times"]]
    gaps = [b - a for r in reqs for a, b in zip(r["times"], r["times"][1:])]
    tokens = sum(r["tokens"] for r in reqs)
    return {"requests": len(reqs), "completion_tokens": tokens, "wall_s": end - start,
            "tokens_per_s": tokens / (end - start), "steady_tokens_per_s": steady_tokens_per_s(reqs),
            "ttft_p50_s": percentile(ttft, 50),
            "ttft_p99_s": percentile(ttft, 99), "token_p50_s": percentile(gaps, 50),
            "token_p99_s": percentile(gaps, 99), "token_mean_s": statistics.fmean(gaps) if gaps else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tpimpi.serve.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key")
    p.add_argument("--concurrency", type=int, default=1, help="clients sending at the same time")
    p.add_argument("--requests", type=int, default=4, help="requests per client: C x this many, taken from one "
                   "list by whichever client is free")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--ranks", type=int, required=True, help="the server's rank count (recorded)")
    p.add_argument("--label", default="", help="recorded with the result (e.g. the server's options)")
    p.add_argument("--max-token-latency-ms", type=float, help="the server's target, if any (recorded)")
    p.add_argument("--out", default="data/results/serve.jsonl")
    p.add_argument("--raw", metavar="FILE", help="also append every request's send and chunk arrival times "
                   "(perf_counter seconds, the server's --step-log clock) to FILE, one JSON line each")
    args = p.parse_args(argv)
    if args.concurrency < 1 or args.requests < 1 or args.max_tokens < 1:
        print("tpimpi.serve.bench: error: --concurrency, --requests and --max-tokens must be at least 1",
              file=sys.stderr)
        return 2
    model, reqs = asyncio.run(run_load(args.url, args.concurrency, args.requests, args.max_tokens, args.api_key))
    from ..bench import machine

    result = {"system": "serve", "model": model, "ranks": args.ranks, "concurrency": args.concurrency, "label": args.label,
              "max_tokens": args.max_tokens, "max_token_latency_ms": args.max_token_latency_ms, "load": "shared list",
              **summarize(reqs), "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(sys.argv), "machine": machine()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    if args.raw:
        with open(args.raw, "a") as f:
            f.writelines(json.dumps({"concurrency": args.concurrency, "label": args.label, **r}) + "\n" for r in reqs)
    with open(args.out, "a") as f:
        f.write(json.dumps(result) + "\n")
    steady = result["steady_tokens_per_s"]
    print(f"serve ranks={args.ranks} clients={args.concurrency}: {result['tokens_per_s']:.1f} tokens/s"
          f"{f' ({steady:.1f} with all in flight)' if steady else ''}, TTFT p50 "
          f"{result['ttft_p50_s'] * 1e3:.0f} ms p99 {result['ttft_p99_s'] * 1e3:.0f} ms, per token p50 "
          f"{result['token_p50_s'] * 1e3:.1f} ms p99 {result['token_p99_s'] * 1e3:.1f} ms -> {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
