"""Turn benchmark results (JSON lines under data/results/) into Markdown tables and PNG plots.

    python -m tpimpi.report [data/results/*.jsonl] [--out data/results/report]

Writes report.md (one table per kind of run, with ratios to the baselines measured in the same
files) and, when matplotlib is installed, latency_vs_ranks.png, memory_vs_ranks.png and
allreduce_vs_size.png.
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

MiB = 1 << 20


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


def _key(r: dict) -> tuple:
    return (r.get("model", "default"), r["system"], r.get("label", ""), r.get("ranks", 1))


def generation_table(rows: list[dict]) -> str:
    """Latest run per (model, system, label, ranks), with decode latency relative to each baseline."""
    latest = {}
    for r in rows:
        if "s_per_token" in r:
            latest[_key(r)] = r
    base = {(k[0], k[1]): r["s_per_token"] for k, r in latest.items() if k[1] in ("transformers", "accelerate")}
    out = ["| model | system | label | ranks | TTFT s | s/token (p90) | tokens/s | peak RSS MiB (max rank) "
           "| vs transformers | vs accelerate |", "|---|---|---|---|---|---|---|---|---|---|"]
    for k in sorted(latest, key=lambda k: (k[0], k[1] != "transformers", k[1] != "accelerate", k[2], k[3])):
        r = latest[k]
        ratios = [f"{r['s_per_token'] / base[(k[0], b)]:.2f} x" if (k[0], b) in base else "" for b in
                  ("transformers", "accelerate")]
        out.append(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {r['ttft_s']:.3f} | {r['s_per_token']:.4f} "
                   f"({r['s_per_token_p90']:.4f}) | {r['tokens_per_s']:.1f} | {max(r['peak_rss_bytes']) / MiB:.0f} "
                   f"| {ratios[0]} | {ratios[1]} |")
    return "\n".join(out)


def allreduce_table(rows: list[dict]) -> str:
    ar = [r for r in rows if r.get("system") == "allreduce"]
    if not ar:
        return ""
    out = ["| ranks | floats | link latency ms | algorithm | median us |", "|---|---|---|---|---|"]
    for r in sorted(ar, key=lambda r: (r["ranks"], r["elems"], r.get("link_latency_ms", 0), r["algo"])):
        out.append(f"| {r['ranks']} | {r['elems']} | {r.get('link_latency_ms', 0)} | {r['algo']} | "
                   f"{r['median_s'] * 1e6:.1f} |")
    return "\n".join(out)


def plots(rows: list[dict], out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("tpimpi.report: matplotlib is not installed; tables only", file=sys.stderr)
        return []
    made = []
    series = defaultdict(list)
    for r in rows:
        if r.get("system") == "tpimpi" and "s_per_token" in r:
            series[(r.get("model", "default"), r.get("label", ""))].append(r)
    if series:
        for name, field, ylabel in (("latency_vs_ranks", "s_per_token", "decode latency, s/token"),
                                    ("memory_vs_ranks", "peak_rss_bytes", "peak RSS of the largest rank, MiB")):
            fig, ax = plt.subplots(figsize=(6, 4))
            for (model, label), rs in sorted(series.items()):
                by_n = defaultdict(list)
                for r in rs:
                    v = max(r[field]) / MiB if field == "peak_rss_bytes" else r[field]
                    by_n[r["ranks"]].append(v)
                ns = sorted(by_n)
                ax.plot(ns, [statistics.median(by_n[n]) for n in ns], marker="o", label=f"{model} {label}".strip())
            ax.set_xlabel("ranks")
            ax.set_ylabel(ylabel)
            ax.legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(out / f"{name}.png", dpi=120)
            plt.close(fig)
            made.append(f"{name}.png")
    ar = [r for r in rows if r.get("system") == "allreduce"]
    if ar:
        fig, ax = plt.subplots(figsize=(6, 4))
        groups = defaultdict(list)
        for r in ar:
            groups[(r["algo"], r["ranks"], r.get("link_latency_ms", 0))].append(r)
        for (algo, n, lat), rs in sorted(groups.items()):
            rs.sort(key=lambda r: r["elems"])
            ax.plot([r["elems"] for r in rs], [r["median_s"] * 1e3 for r in rs], marker="o",
                    label=f"{algo}, {n} ranks, link {lat} ms")
        ax.set_xscale("log")
        ax.set_xlabel("floats per allreduce")
        ax.set_ylabel("median latency, ms")
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / "allreduce_vs_size.png", dpi=120)
        plt.close(fig)
        made.append("allreduce_vs_size.png")
    return made


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tpimpi.report", description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="*", help="JSON-lines files (default: data/results/*.jsonl)")
    p.add_argument("--out", default="data/results/report", help="directory for report.md and the plots")
    args = p.parse_args(argv)
    paths = args.results or sorted(glob.glob("data/results/*.jsonl"))
    if not paths:
        print("tpimpi.report: error: no results files (run tpimpi.bench first)", file=sys.stderr)
        return 2
    rows = load(paths)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = ["# tpimpi benchmark report", "", f"From: {', '.join(paths)}", "", "## Generation", "",
             generation_table(rows)]
    if ar := allreduce_table(rows):
        parts += ["", "## Allreduce", "", ar]
    made = plots(rows, out)
    parts += [""] + [f"![{m}]({m})" for m in made]
    (out / "report.md").write_text("\n".join(parts) + "\n")
    print(f"wrote {out / 'report.md'}" + (f" and {', '.join(made)}" if made else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
