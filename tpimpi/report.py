"""Turn benchmark results (JSON lines under data/results/) into Markdown tables and PNG plots.

    python -m tpimpi.report [data/results/*.jsonl] [--out data/results/report]
    python -m tpimpi.report --timeline run.h5 [--steps 2]     # a trace of generate/bench --trace

Writes report.md (one table per kind of run, with ratios to the baselines measured in the same
files) and, when matplotlib is installed, latency_vs_ranks.png and memory_vs_ranks.png (one line per
model and memory mode), latency_vs_window.png and memory_vs_window.png (the window sweep, beside the
resident run of the same model, ranks and dtype), allreduce_vs_size.png and serve_vs_concurrency.png
(tpimpi.serve.bench's sweep). The generation table gives medians over every run of a configuration
(repeated rounds on a noisy machine); the sweeps and plots take the latest run (by its `time`) of each point.
Runs made with --plan-file get a table of the plan's predicted s/token, TTFT and peak memory beside the
measured ones. --timeline draws a trace (tpimpi.trace): one row per rank, and the cost model's timeline
of the same run when it had a plan.
"""

from __future__ import annotations

import argparse
import glob
import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Callable

MiB = 1 << 20
RESIDENT = "resident"  # the window sweep's point for a run that streams no block
# the plan's description, for rows written before bench recorded window and block counts:
# "71 blocks all resident; ..." or "71 blocks 0 resident, 71 streamed through a window of 2; ..."
_PLAN = re.compile(r"(\d+) blocks (?:all resident|(\d+) resident, (\d+) streamed through a window of (\d+))")


def load(paths: list[str]) -> list[dict]:
    rows = []
    for p in paths:
        for n, line in enumerate(Path(p).read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    print(f"tpimpi.report: skipping {p}:{n}: not JSON", file=sys.stderr)
    return rows


def latest(rows: list[dict], key: Callable[[dict], tuple]) -> dict[tuple, dict]:
    """The newest row for each key(row): the greatest `time` (ISO 8601 in UTC, as bench writes it, so
    the strings sort by time); on a tie, or when neither has a time, the later row in the files."""
    best: dict[tuple, dict] = {}
    for r in rows:
        k = key(r)
        if k not in best or r.get("time", "") >= best[k].get("time", ""):
            best[k] = r
    return best


def _key(r: dict) -> tuple:
    return (r.get("model", "default"), r["system"], r.get("label", ""), r.get("ranks", 1))


def _generation_key(r: dict) -> tuple:
    return (*_key(r), r.get("io", ""), str(memory_mode(r) or ""), str(r.get("ratios", "")))


def generation_table(rows: list[dict]) -> str:
    """One line per configuration (model, system, label, ranks, io, memory plan, ratios): medians over its
    runs, so repeated rounds of a benchmark on a noisy machine give one figure each; decode latency
    relative to each baseline's median."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if "s_per_token" in r:
            groups[_generation_key(r)].append(r)
    med = {k: {f: statistics.median(r[f] for r in g) for f in ("s_per_token", "s_per_token_p90", "ttft_s",
                                                                 "tokens_per_s")} for k, g in groups.items()}
    base = {(k[0], k[1]): m["s_per_token"] for k, m in med.items() if k[1] in ("transformers", "accelerate")}
    out = ["| model | system | label | ranks | runs | TTFT s | s/token (p90) | tokens/s | peak RSS MiB (max rank) "
           "| vs transformers | vs accelerate |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for k in sorted(groups, key=lambda k: (k[0], k[1] != "transformers", k[1] != "accelerate", k[2], k[3], k[4:])):
        m, g = med[k], groups[k]
        ratios = [f"{m['s_per_token'] / base[(k[0], b)]:.2f} x" if (k[0], b) in base else "" for b in
                  ("transformers", "accelerate")]
        peak = max(max(r["peak_rss_bytes"]) for r in g) / MiB
        out.append(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {len(g)} | {m['ttft_s']:.3f} | {m['s_per_token']:.4f} "
                   f"({m['s_per_token_p90']:.4f}) | {m['tokens_per_s']:.1f} | {peak:.0f} | {ratios[0]} | {ratios[1]} |")
    return "\n".join(out)


def _link(r: dict) -> str:
    """Where an allreduce row was measured: real TCP between namespaced hosts (jobs/bench_cluster.sh), or
    one host with tpimpi's emulated link latency."""
    if r.get("transport"):
        return f"{r.get('hosts', r['ranks'])} hosts, real TCP, {r.get('delay_ms', 0)} ms/hop, {r.get('rate_mbps', '-')} Mbit/s"
    return f"one host, emulated link {r.get('link_latency_ms', 0)} ms"


def _allreduce_key(r: dict) -> tuple:
    return (r["algo"], r["ranks"], _link(r), r["elems"])


def allreduce_table(rows: list[dict]) -> str:
    """Latest run per (algorithm, ranks, link, message size)."""
    ar = latest([r for r in rows if r.get("system") == "allreduce"], _allreduce_key)
    if not ar:
        return ""
    out = ["| ranks | floats | link | algorithm | median us |", "|---|---|---|---|---|"]
    for r in sorted(ar.values(), key=lambda r: (r["ranks"], r["elems"], _link(r), r["algo"])):
        out.append(f"| {r['ranks']} | {r['elems']} | {_link(r)} | {r['algo']} | {r['median_s'] * 1e6:.1f} |")
    return "\n".join(out)


def memory_mode(r: dict) -> tuple[int | None, int, int] | None:
    """(window, streamed blocks, blocks) of a tpimpi row, rank 0's plan: from the row's fields, or for
    rows written before bench recorded them, parsed from its `memory` text; None when neither says."""
    if "streamed_blocks" in r:
        return r.get("window"), r["streamed_blocks"], r.get("n_blocks")
    m = _PLAN.search(r.get("memory", ""))
    if m is None:
        return None
    n, resident, streamed, window = m.groups()
    return (None, 0, int(n)) if resident is None else (int(window), int(streamed), int(n))


def window_point(r: dict) -> int | str | None:
    """The window sweep's x for a row: W when it streams every block, RESIDENT when it streams none,
    None otherwise (a memory budget: some blocks resident, the rest streamed; or no plan recorded)."""
    mode = memory_mode(r)
    if mode is None:
        return None
    window, streamed, n = mode
    if window is None and streamed == 0:
        return RESIDENT
    return window if window is not None and streamed == n else None


def mode_label(r: dict) -> str:
    """The memory mode, for plot legends: resident, window W, or budget (window W), and the I/O mode
    when it is not the page cache."""
    mode = memory_mode(r)
    if mode is None:
        return r.get("label", "") or "memory mode not recorded"
    window, streamed, n = mode
    text = RESIDENT if streamed == 0 else f"window {window}" if streamed == n else f"budget (window {window})"
    return text if streamed == 0 or r.get("io", "cache") == "cache" else f"{text}, io {r['io']}"


def _sweep_key(r: dict) -> tuple:
    return (r.get("model", "default"), r.get("ranks", 1), r.get("compute", ""), r.get("dtype", ""))


def window_sweep(rows: list[dict]) -> dict[tuple, tuple[dict | None, dict[str, dict[int, dict]]]]:
    """The window sweep: {(model, ranks, compute, dtype): (resident row or None, {io: {W: row}})}, the
    latest tpimpi row at each point; only keys with at least one window run. The resident reference
    ignores io: a resident run reads no block while decoding, so cold-cache lines share it."""
    tp = [r for r in rows if r.get("system") == "tpimpi" and "s_per_token" in r]
    res = latest([r for r in tp if window_point(r) == RESIDENT], _sweep_key)
    runs = latest([r for r in tp if isinstance(window_point(r), int)],
                  lambda r: (*_sweep_key(r), r.get("io", "cache"), window_point(r)))
    lines: dict[tuple, dict[str, dict[int, dict]]] = defaultdict(lambda: defaultdict(dict))
    for (*k, io, w), r in runs.items():
        lines[tuple(k)][io][w] = r
    return {k: (res.get(k), dict(v)) for k, v in sorted(lines.items())}


def _dtype(dtype: str, compute: str) -> str:
    return dtype if compute in ("", dtype) else f"{dtype} ({compute} products)"


def window_table(sweep: dict) -> str:
    """One line per window run, then the resident run, for each model, ranks and dtype."""
    if not sweep:
        return ""
    out = ["| model | ranks | dtype | io | W | s/token | vs resident | peak RSS MiB (max rank) | predicted MiB "
           "| prediction error |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (model, n, compute, dtype), (res, lines) in sweep.items():
        runs = [(w, r) for io in sorted(lines) for w, r in sorted(lines[io].items())]
        for w, r in runs + ([(RESIDENT, res)] if res else []):
            rss, pred = max(r["peak_rss_bytes"]), r.get("predicted_peak_bytes")
            ratio = f"{r['s_per_token'] / res['s_per_token']:.2f} x" if res else ""
            err = f"{(pred - rss) / rss * 100:+.1f} %" if pred else ""
            out.append(f"| {Path(model).name} | {n} | {_dtype(dtype, compute)} | {r.get('io', 'cache')} | {w} "
                       f"| {r['s_per_token']:.4f} | {ratio} | {rss / MiB:.0f} | "
                       f"{f'{pred / MiB:.0f}' if pred else ''} | {err} |")
    return "\n".join(out)


def _serve_key(r: dict) -> tuple:
    """(model and the CPU it ran on, ranks, label, clients): runs on another CPU are another line, never the
    newer run of the same point, and a ratio to one client is taken on the same CPU."""
    cpu = r.get("machine", {}).get("cpu")
    return (_model_family(r) + (f" ({cpu})" if cpu else ""), r["ranks"], r.get("label", ""), r["concurrency"])


def serve_table(rows: list[dict]) -> str:
    """Latest run per (model, ranks, label, clients) of tpimpi.serve.bench: aggregate throughput beside the
    same server's single client, TTFT and per-token latency at p50 and p99."""
    sv = latest([r for r in rows if r.get("system") == "serve"], _serve_key)
    if not sv:
        return ""
    out = ["| model | ranks | label | clients | tokens/s | vs 1 client | all in flight: tokens/s, vs 1 client "
           "| TTFT p50 / p99 ms | per token p50 / p99 ms | vs 1 client (p50) | target ms |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for k in sorted(sv, key=lambda k: (k[0], k[1], k[2] != "batch", k[2], k[3])):
        r, one = sv[k], sv.get((k[0], k[1], "batch", 1))
        vs = f"{r['tokens_per_s'] / one['tokens_per_s']:.2f} x" if one else ""
        vs_lat = f"{r['token_p50_s'] / one['token_p50_s']:.2f} x" if one and one["token_p50_s"] else ""
        steady = r.get("steady_tokens_per_s")  # runs before it was recorded have none
        if steady:
            base = one.get("steady_tokens_per_s") if one else None
            steady = f"{steady:.1f}" + (f", {steady / base:.2f} x" if base else "")
        out.append(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {r['tokens_per_s']:.1f} | {vs} | {steady or ''} | "
                   f"{r['ttft_p50_s'] * 1e3:.0f} / {r['ttft_p99_s'] * 1e3:.0f} | "
                   f"{r['token_p50_s'] * 1e3:.1f} / {r['token_p99_s'] * 1e3:.1f} | {vs_lat} | "
                   f"{r.get('max_token_latency_ms') or ''} |")
    return "\n".join(out)


def _serve_plot(plt, rows: list[dict]) -> list:
    """Does batching pay, and at what cost to each client? For the CPU of the newest serving run (a ratio
    from another machine is not a result; the table keeps every CPU's rows): aggregate tokens/s and each
    client's per-token p50, as multiples of the same server's single client, against concurrent clients,
    one line per served configuration (model, ranks). The baselines: perfect batching (clients x one
    client's rate, and one client's latency), and issue 11's targets at 8 clients (4x the throughput,
    at most 2x the latency). Runs under a latency target and the p99s are in the serving table."""
    sv = latest([r for r in rows if r.get("system") == "serve" and r.get("label", "batch") == "batch"], _serve_key)
    if not sv:
        return []
    cpu = max(sv.values(), key=lambda r: r.get("time", "")).get("machine", {}).get("cpu")
    sv = {k: r for k, r in sv.items() if r.get("machine", {}).get("cpu") == cpu and (*k[:3], 1) in sv}
    if not sv:
        return []
    fig, (ax_t, ax_l) = plt.subplots(1, 2, figsize=(11, 4.2))
    lines = sorted({k[:3] for k in sv})
    clients = sorted({k[3] for k in sv})
    for i, line in enumerate(lines):
        colour = plt.get_cmap("tab10")(i % 10)
        xs = [c for c in clients if (*line, c) in sv]
        one = sv[(*line, 1)]
        label = f"{line[0].removesuffix(f' ({cpu})')}, {line[1]} rank{'s' if line[1] > 1 else ''}"
        ax_t.plot(xs, [sv[(*line, c)]["tokens_per_s"] / one["tokens_per_s"] for c in xs], marker="o", color=colour,
                  label=label)
        ax_l.plot(xs, [sv[(*line, c)]["token_p50_s"] / one["token_p50_s"] for c in xs], marker="o", color=colour,
                  label=label)
    ax_t.plot(clients, clients, ls=":", color="grey", lw=1, label="perfect batching")
    ax_l.axhline(1, ls=":", color="grey", lw=1, label="one client alone")
    ax_t.plot([8], [4], marker="*", ms=12, ls="", color="black", label="target at 8 clients (at least)")
    ax_l.plot([8], [2], marker="*", ms=12, ls="", color="black", label="target at 8 clients (at most)")
    labels = [str(c) for c in clients]
    _log_axes(ax_t, clients, labels, xlabel="concurrent clients", ylabel="aggregate tokens/s, x one client's",
              title="Throughput")
    _log_axes(ax_l, clients, labels, xlabel="concurrent clients", ylabel="per-token latency p50, x one client's",
              title="Each client's latency")
    ax_t.legend(fontsize=7, loc="upper left")
    ax_l.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"tpimpi.serve: continuous batching ({cpu})" if cpu else "tpimpi.serve: continuous batching")
    return [("serve_vs_concurrency.png", fig)]


def plots(rows: list[dict], out: Path) -> list[str]:
    """Write the PNG plots into out; return their file names (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("tpimpi.report: matplotlib is not installed; tables only", file=sys.stderr)
        return []
    made = []
    for draw, data in ((_ranks_plots, rows), (_window_plots, window_sweep(rows)), (_allreduce_plot, rows),
                       (_serve_plot, rows)):
        for name, fig in draw(plt, data):
            fig.tight_layout()
            fig.savefig(out / name, dpi=120)
            plt.close(fig)
            made.append(name)
    return made


def _model_family(r: dict) -> str:
    """The model's name without a store's "-n<ranks>" suffix: a store is split for one rank count, and
    jobs/bench_streaming.sh names the stores of one model <name>-n1, <name>-n2, ..."""
    name, suffix = Path(r.get("model", "default")).name, f"-n{r.get('ranks', 1)}"
    return name[:-len(suffix)] if name.endswith(suffix) else name


BASELINES = {"transformers": "transformers, in memory", "accelerate": "Accelerate, disk offload"}


def _ranks_plots(plt, rows: list[dict]) -> list:
    """Two plots of the generation benchmark (jobs/bench_generate.sh), each answering one question for the
    model the baselines ran on: how decode latency, and how the largest rank's peak memory, change with
    the number of ranks, tpimpi's float32 store resident and under a memory budget, beside transformers
    and Accelerate (one process each: horizontal lines). Medians over every run of a point, as in the
    generation table; other models, dtypes and windows are in the tables."""
    base_rows = [r for r in rows if r.get("system") in BASELINES and "s_per_token" in r]
    if not base_rows:
        return []
    model = statistics.mode(r.get("model", "default") for r in base_rows)
    cpu = statistics.mode(r.get("machine", {}).get("cpu") for r in base_rows)  # one CPU: ratios do not travel
    base_rows = [r for r in base_rows if r.get("machine", {}).get("cpu") == cpu]
    series: dict[str, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.get("system") != "tpimpi" or "s_per_token" not in r or r.get("model", "default") != model \
                or r.get("plan") is not None or "predicted" in r or r.get("link_latency_ms") \
                or r.get("machine", {}).get("cpu") != cpu \
                or r.get("dtype", "float32") != "float32" or r.get("compute", "float32") != "float32" \
                or r.get("ratios") not in (None, [1.0] * r.get("ranks", 1)) or r.get("io", "cache") != "cache":
            continue
        mode = memory_mode(r)
        if mode is None:
            continue
        kind = RESIDENT if mode[1] == 0 else "memory budget" if mode[1] < mode[2] else None
        if kind:
            series[f"tpimpi, {kind}"][r.get("ranks", 1)].append(r)
    made = []
    for name, value, ylabel, title in (
            ("latency_vs_ranks", lambda r: r["s_per_token"] * 1e3, "decode latency, ms/token (median)",
             f"Decode latency against ranks ({Path(model).name} model)\n{cpu}"),
            ("memory_vs_ranks", lambda r: max(r["peak_rss_bytes"]) / MiB, "peak RSS of the largest rank, MiB",
             f"Peak memory per device against ranks ({Path(model).name} model)\n{cpu}")):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        ns = sorted({n for by_n in series.values() for n in by_n} | {1})
        for i, (label, by_n) in enumerate(sorted(series.items())):
            x = sorted(by_n)
            ax.plot(x, [statistics.median(value(r) for r in by_n[n]) for n in x], marker="os"[i % 2],
                    color=("tab:blue", "tab:green")[i % 2], label=label)
        for (system, label), ls in zip(BASELINES.items(), ("--", ":")):
            got = [value(r) for r in base_rows if r["system"] == system and r.get("model", "default") == model]
            if got:
                ax.axhline(statistics.median(got), color=("tab:red", "tab:purple")[ls == ":"], ls=ls, label=label)
        _log_axes(ax, ns, [str(n) for n in ns], xlabel="ranks (MPI processes on one machine)", ylabel=ylabel,
                  title=title)
        ax.legend(fontsize=8)
        made.append((f"{name}.png", fig))
    return made


def _window_plots(plt, sweep: dict) -> list:
    """Decode latency and peak RSS against W, one colour per (model, ranks, dtype); the resident run is
    the rightmost point; memory: predicted dashed. Only sweeps (two windows or more) through the page
    cache, so that each plot answers what a window costs against resident: single points and other I/O
    modes are in the window table."""
    sweep = {k: (res, {"cache": lines["cache"]}) for k, (res, lines) in sweep.items() if len(lines.get("cache", {})) > 1}
    if not sweep:
        return []
    from matplotlib.lines import Line2D

    ws = sorted({w for _, lines in sweep.values() for by_w in lines.values() for w in by_w})
    x_res = 2 * ws[-1]  # the resident run's x: one step right of the largest window, on the log axis
    (lat_fig, lat), (mem_fig, mem) = (plt.subplots(figsize=(8.5, 4.8)) for _ in range(2))
    for i, ((model, n, compute, dtype), (res, lines)) in enumerate(sweep.items()):
        c = plt.get_cmap("tab10")(i % 10)
        name = f"{Path(model).name}, {n} rank{'s' if n > 1 else ''}, {_dtype(dtype, compute)}"
        for io, by_w in sorted(lines.items()):
            x = sorted(by_w)
            kw = dict(color=c, marker="o", ls="-", label=name) if io == "cache" else dict(
                color=c, marker="s", mfc="none", ls="-.", label=f"{name}, io {io}")
            lat.plot(x, [by_w[w]["s_per_token"] * 1e3 for w in x], **kw)
            mem.plot(x, [max(by_w[w]["peak_rss_bytes"]) / MiB for w in x], **kw)
            pred = [w for w in x if by_w[w].get("predicted_peak_bytes")]
            mem.plot(pred, [by_w[w]["predicted_peak_bytes"] / MiB for w in pred], color=c, ls="--", lw=1, marker="x")
        if res:
            lat.axhline(res["s_per_token"] * 1e3, color=c, ls="--", lw=0.8, alpha=0.6)
            lat.plot([x_res], [res["s_per_token"] * 1e3], color=c, marker="*", ms=11, ls="none")
            mem.plot([x_res], [max(res["peak_rss_bytes"]) / MiB], color=c, marker="*", ms=11, ls="none")
            if res.get("predicted_peak_bytes"):
                mem.plot([x_res], [res["predicted_peak_bytes"] / MiB], color=c, marker="x", ms=8, ls="none")
    key = dict(color="0.3", ls="none")
    extra = {lat: [Line2D([], [], marker="*", ms=11, **key, label="resident (dashed: its level)")],
             mem: [Line2D([], [], marker="*", ms=11, **key, label="resident"),
                   Line2D([], [], color="0.3", ls="--", lw=1, marker="x", label="predicted peak, rank 0")]}
    for ax, ylabel, title in ((lat, "decode latency, ms/token", "Decode latency against the window W"),
                              (mem, "peak RSS, MiB (solid: largest rank)", "Peak memory against the window W")):
        _log_axes(ax, ws + [x_res], [str(w) for w in ws] + [RESIDENT],
                  xlabel="window W (weight blocks held per rank)", ylabel=ylabel, title=title)
        handles, _ = ax.get_legend_handles_labels()
        ax.legend(handles=handles + extra[ax], fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return [("latency_vs_window.png", lat_fig), ("memory_vs_window.png", mem_fig)]


def _log_axes(ax, xticks: list, xlabels: list[str], **labels) -> None:
    """Both axes logarithmic (x in powers of 2, ticks only where there are points), numbers in plain
    notation: the plots compare ratios (twice the ranks, half the memory)."""
    from matplotlib.ticker import FuncFormatter, NullLocator

    ax.set_xscale("log", base=2)
    ax.set_xticks(xticks, xlabels)
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    # between the powers of ten: every tick when the axis spans less than a decade, else the 2s, 3s and 5s
    def minor(v, _):
        lo, hi = ax.get_ylim()
        return f"{v:g}" if hi / lo < 10 or f"{v:.0e}"[0] in "235" else ""

    ax.yaxis.set_minor_formatter(FuncFormatter(minor))
    ax.tick_params(axis="y", which="both", labelsize=8)
    ax.set(**labels)
    ax.grid(True, which="both", alpha=0.3)


def _allreduce_plot(plt, rows: list[dict]) -> list:
    """Does the star beat MPI's own Allreduce and the ring? Median latency against message size at the
    largest rank count measured, one panel per link (real TCP between namespaced hosts, or one host with
    an emulated latency), one line per algorithm, MPI's Allreduce (the baseline) in black. Smaller rank
    counts are in the allreduce table."""
    ar = latest([r for r in rows if r.get("system") == "allreduce"], _allreduce_key)
    if not ar:
        return []
    n = max(k[1] for k in ar)
    ar = {k: r for k, r in ar.items() if k[1] == n}
    algos, links = sorted({k[0] for k in ar}), sorted({k[2] for k in ar}, key=lambda l: (not l[0].isdigit(), l))
    others = iter(plt.get_cmap("tab10").colors)
    colour = {a: "black" if a == "mpi" else next(others) for a in algos}
    fig, axes = plt.subplots(1, len(links), figsize=(3.8 * len(links) + 1.8, 4.2), squeeze=False)
    for ax, link in zip(axes[0], links):
        sizes = sorted({k[3] for k in ar if k[2] == link})
        for algo in algos:
            x = [e for e in sizes if (algo, n, link, e) in ar]
            ax.plot(x, [ar[(algo, n, link, e)]["median_s"] * 1e3 for e in x], color=colour[algo], marker="o",
                    ls="--" if algo == "mpi" else "-", label="MPI Allreduce (baseline)" if algo == "mpi" else algo)
        _log_axes(ax, sizes, [str(e) for e in sizes], xlabel="floats per allreduce", ylabel="median latency, ms",
                  title=link.replace(", real TCP", "\nreal TCP"))
        ax.tick_params(axis="x", labelrotation=45, labelsize=8)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(f"Allreduce latency against message size, {n} ranks")
    return [("allreduce_vs_size.png", fig)]


def plan_table(rows: list[dict]) -> str:
    """Predicted beside measured for every run that followed a plan file (the latest of each label)."""
    runs = latest([r for r in rows if r.get("predicted")], lambda r: (r.get("model"), r.get("label", "")))
    if not runs:
        return ""
    out = ["| label | ranks | ratios | modes | predicted s/token | measured | error | predicted TTFT s | measured "
           "| peak MiB predicted / measured (worst rank) | error |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(runs.values(), key=lambda r: r.get("label", "")):
        p = r["predicted"]
        err = p["s_per_token"] / r["s_per_token"] - 1
        mem = [(a / b - 1, a, b) for a, b in zip(r["predicted_bytes"], r["peak_rss_bytes"])]
        worst = max(mem, key=lambda m: abs(m[0]))
        modes = ",".join(m["kind"] + (f":{m['window']}" if m["kind"] == "window" else "") for m in r["plan_modes"])
        out.append(f"| {r.get('label', '')} | {r['ranks']} | {','.join(f'{x:g}' for x in r['ratios'])} | {modes} | "
                   f"{p['s_per_token']:.4f} | {r['s_per_token']:.4f} | {err:+.0%} | {p['ttft_s']:.3f} | "
                   f"{r['ttft_s']:.3f} | {worst[1] / MiB:.0f} / {worst[2] / MiB:.0f} | {worst[0]:+.0%} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tpimpi.report", description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="*", help="JSON-lines files (default: data/results/*.jsonl)")
    p.add_argument("--out", default="data/results/report", help="directory for report.md and the plots")
    p.add_argument("--timeline", metavar="FILE.h5", help="draw this trace (generate/bench --trace) as a timeline, "
                   "one row per rank, beside the cost model's prediction when the run had --plan-file")
    p.add_argument("--steps", type=int, default=2, help="with --timeline: how many of the last steps to draw")
    args = p.parse_args(argv)
    if args.timeline:
        from .trace import draw_timeline

        Path(args.out).mkdir(parents=True, exist_ok=True)
        png = Path(args.out) / (Path(args.timeline).stem + "_timeline.png")
        print(draw_timeline(args.timeline, str(png), args.steps) + f" -> {png}")
        return 0
    paths = args.results or sorted(glob.glob("data/results/*.jsonl"))
    if not paths:
        print("tpimpi.report: error: no results files (run tpimpi.bench first)", file=sys.stderr)
        return 2
    rows = load(paths)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = ["# tpimpi benchmark report", "", f"From: {', '.join(paths)}", "", "## Generation", "",
             generation_table(rows)]
    if wt := window_table(window_sweep(rows)):
        parts += ["", "## Latency and memory against the window", "",
                  "Runs that stream every block through W buffers, then the resident run of the same model, ranks "
                  "and dtype (vs resident: s/token over its s/token). Peak RSS is the largest rank's; predicted is "
                  "rank 0's plan; prediction error is (predicted - measured) / measured.", "", wt]
    if pt := plan_table(rows):
        parts += ["", "## Planner: predicted against measured", "",
                  "Runs with --plan-file (bench records the plan's prediction beside the measurement); error is "
                  "(predicted - measured) / measured; peak: the rank with the largest error.", "", pt]
    if ar := allreduce_table(rows):
        parts += ["", "## Allreduce", "", ar]
    if st := serve_table(rows):
        parts += ["", "## Serving", "", "tpimpi.serve under concurrent streaming clients (tpimpi.serve.bench): "
                  "aggregate completion tokens/s and per-token latency, each against the same server's single "
                  "client; target rows ran with --max-token-latency-ms.", "", st]
    made = plots(rows, out)
    parts += [""] + [f"![{m}]({m})" for m in made]
    (out / "report.md").write_text("\n".join(parts) + "\n")
    print(f"wrote {out / 'report.md'}" + (f" and {', '.join(made)}" if made else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
