"""Where the slow per-token gaps come from: a client's inter-token gaps joined with the server's steps.

    python -m tpimpi.serve.tail --steps steps.jsonl --raw raw.jsonl [--over-ms 56]

steps.jsonl is `tpimpi.serve --step-log`, raw.jsonl `tpimpi.serve.bench --raw`; both hold perf_counter
times, one clock for every process on the machine. Each chunk a client received is matched with the
step that produced it (the step log names the responses each step handed text to). A gap between two
chunks is then: the server's cycle between those two steps (one step, or several when a token gave no
text), plus the change in delivery delay (step handed over -> client read it: the HTTP thread, the
socket and the client's own loop). Gaps over the threshold (default: the client-side p99) are counted
by cause: garbage collection, more than one step, a step that prefilled prompt rows, a slow delivery,
time between steps, or a slow decode step.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

from .bench import percentile


def load(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def gaps(steps: list[dict], reqs: list[dict]) -> list[dict]:
    """Every client gap with its server side: the steps of both chunks, the server's cycle between them,
    the delivery delays, and the later step's prompt rows, decode rows and phases. A request's k-th chunk
    is the k-th text its id got in the step log's "texts"."""
    steps = sorted(steps, key=lambda s: s["end"])
    of_id: dict[str, list[int]] = {}
    for i, s in enumerate(steps):
        for rid in s["texts"]:
            of_id.setdefault(rid, []).append(i)
    out = []
    for r in reqs:
        idx = of_id.get(r["id"], [])
        if len(idx) != len(r["times"]):  # the log does not cover this request
            continue
        for (ta, tb), (a, b) in zip(itertools.pairwise(r["times"]), itertools.pairwise(idx)):
            if b == a:  # two chunks from one step (the last token's text and the held-back rest)
                continue
            sb = steps[b]
            out.append({"gap": tb - ta, "server": sb["end"] - steps[a]["end"], "steps": b - a,
                        "lag_a": ta - steps[a]["end"], "lag_b": tb - sb["end"], "prefill": sb["prefill"],
                        "decode": sb["decode"], "forward": sb["forward"] - sb["start"],
                        "between": sb["start"] - steps[b - 1]["end"], "emit": sb["end"] - sb["forward"],
                        "gc": sum(s.get("gc", 0.0) for s in steps[a + 1 : b + 1])})
    return out


def cause(g: dict, over: float) -> str:
    """Why a gap is over `over` seconds, first matching: the garbage collector ran for a quarter of it,
    several steps, a prompt chunk in the step, the delivery (the client read it late), time between steps
    (sampling, scheduling, the GIL), a slow step."""
    if g["gc"] > 0.25 * g["server"]:
        return "garbage collection"
    if g["steps"] > 1:
        return "several steps (a token without text)"
    if g["prefill"]:
        return "step with prompt rows"
    if g["server"] <= over:
        return "delivery (HTTP thread, socket, client)"
    if g["between"] > 0.25 * g["server"]:
        return "time between steps (sampling, scheduling, GIL)"
    return "slow decode step"


def report(steps: list[dict], reqs: list[dict], over_ms: float | None = None) -> str:
    gs = gaps(steps, reqs)
    if not gs:
        return "no gaps matched a step"
    client = [g["gap"] for g in gs]
    over = over_ms / 1e3 if over_ms else percentile(client, 99)
    def ms(v: float) -> str:
        return f"{v * 1e3:.1f}"

    server, lag = [g["server"] for g in gs], [g["lag_b"] for g in gs]
    lines = [f"{len(gs)} gaps from {len(reqs)} requests over {len(steps)} steps",
             (f"client gap p50 {ms(percentile(client, 50))} p99 {ms(percentile(client, 99))} ms; server cycle "
              f"p50 {ms(percentile(server, 50))} p99 {ms(percentile(server, 99))} ms; delivery delay p50 "
              f"{ms(percentile(lag, 50))} p99 {ms(percentile(lag, 99))} ms")]
    decode_only = [s for s in steps if s["decode"] and not s["prefill"]]
    with_prefill = [s for s in steps if s["decode"] and s["prefill"]]
    for name, ss in (("decode-only steps", decode_only), ("decode steps with prompt rows", with_prefill)):
        if ss:
            fw = [s["forward"] - s["start"] for s in ss]
            lines.append(f"{name}: {len(ss)}, forward p50 {ms(percentile(fw, 50))} p99 {ms(percentile(fw, 99))} ms, "
                         f"rows p50 {percentile([s['decode'] + s['prefill'] for s in ss], 50)}")
    slow = [g for g in gs if g["gap"] > over]
    lines.append(f"gaps over {ms(over)} ms: {len(slow)} ({100 * len(slow) / len(gs):.1f}%)")
    counts: dict[str, list[dict]] = {}
    for g in slow:
        counts.setdefault(cause(g, over), []).append(g)
    for c, gl in sorted(counts.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"  {c}: {len(gl)}; server cycle p50 {ms(percentile([g['server'] for g in gl], 50))} ms, "
                     f"delivery change p50 {ms(percentile([g['lag_b'] - g['lag_a'] for g in gl], 50))} ms, "
                     f"prompt rows p50 {percentile([g['prefill'] for g in gl], 50)}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tpimpi.serve.tail", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", required=True, help="the server's --step-log file")
    p.add_argument("--raw", required=True, help="the bench client's --raw file")
    p.add_argument("--label", help="only the raw requests with this label")
    p.add_argument("--concurrency", type=int, help="only the raw requests with this concurrency")
    p.add_argument("--over-ms", type=float, help="count the gaps over this (default: the client-side p99)")
    args = p.parse_args(argv)
    reqs = [r for r in load(args.raw) if (args.label is None or r.get("label") == args.label)
            and (args.concurrency is None or r.get("concurrency") == args.concurrency)]
    if not reqs:
        print("tpimpi.serve.tail: error: no requests in --raw match", file=sys.stderr)
        return 2
    first, last = min(r["t0"] for r in reqs), max(t for r in reqs for t in r["times"][-1:])
    steps = [s for s in load(args.steps) if first <= s["end"] <= last]  # the steps of these requests' run
    print(report(steps, reqs, args.over_ms))
    return 0


if __name__ == "__main__":
    sys.exit(main())
