"""tpimpi.report on hand-written result rows: which run counts, the window table's numbers, the plots."""

import json
import sys

import pytest

from tpimpi import report

MiB = 1 << 20
PNG = b"\x89PNG\r\n\x1a\n"
RESIDENT_TEXT = "71 blocks all resident; predicted peak 863 MiB (base 240, weights 513 MiB)"


def streamed_text(window, resident=0, n=71):
    return (f"{n} blocks {resident} resident, {n - resident} streamed through a window of {window}; "
            f"predicted peak 363 MiB (base 240, weights 20 MiB)")


def row(s_per_token, time, memory, ranks=2, rss_mib=(300, 280), pred_mib=330, io="cache", new=None, **kw):
    """A tpimpi bench row; new=(window, streamed, n_blocks) adds the fields bench writes since it records
    them (older rows have only the `memory` text)."""
    r = {"system": "tpimpi", "model": "default", "ranks": ranks, "dtype": "float32", "compute": "float32",
         "io": io, "memory": memory, "label": kw.pop("label", ""), "time": time, "s_per_token": s_per_token,
         "s_per_token_p90": s_per_token, "tokens_per_s": 1 / s_per_token, "ttft_s": 0.1,
         "peak_rss_bytes": [m * MiB for m in rss_mib], "predicted_peak_bytes": pred_mib * MiB, **kw}
    if new is not None:
        r.update(window=new[0], streamed_blocks=new[1], n_blocks=new[2])
    return r


# default model, 2 ranks: the latest resident run is written first, the stale one after it; at W=4 rank 1
# has the larger peak
ROWS = [
    row(0.050, "2026-11-22T07:00:00+00:00", RESIDENT_TEXT, new=(None, 0, 71), rss_mib=(600, 500), pred_mib=630),
    row(0.040, "2026-11-22T06:00:00+00:00", RESIDENT_TEXT, rss_mib=(700, 500)),             # old style, stale
    row(0.060, "2026-11-22T06:10:00+00:00", streamed_text(2)),                               # old style, stale
    row(0.100, "2026-11-22T07:10:00+00:00", streamed_text(2), new=(2, 71, 71), pred_mib=330),
    row(0.075, "2026-11-22T07:20:00+00:00", streamed_text(4), new=(4, 71, 71), rss_mib=(320, 350), pred_mib=315),
    row(0.200, "2026-11-22T07:30:00+00:00", streamed_text(2), io="direct"),                  # cold cache, old style
    row(0.090, "2026-11-22T07:40:00+00:00", streamed_text(2, resident=35), new=(2, 36, 71)),  # a budget: no W
    row(0.300, "2026-11-22T07:50:00+00:00", streamed_text(8), ranks=4, rss_mib=(250, 240, 240, 240), pred_mib=200),
    {"system": "transformers", "model": "default", "ranks": 1, "s_per_token": 0.07, "s_per_token_p90": 0.08,
     "tokens_per_s": 14.0, "ttft_s": 0.2, "peak_rss_bytes": [900 * MiB], "label": "",
     "time": "2026-11-22T05:00:00+00:00", "memory": streamed_text(2)},
]


def table(md: str) -> list[dict]:
    """The rows of a Markdown table as dicts keyed by its header."""
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    return [dict(zip(cells[0], c)) for c in cells[2:]]


def test_memory_mode_from_fields_or_from_the_plan_text():
    assert report.memory_mode({"memory": RESIDENT_TEXT}) == (None, 0, 71)
    assert report.memory_mode({"memory": streamed_text(16)}) == (16, 71, 71)
    assert report.memory_mode({"memory": streamed_text(2, resident=35)}) == (2, 36, 71)
    assert report.memory_mode({"memory": streamed_text(2), "window": 8, "streamed_blocks": 71, "n_blocks": 71}) == (
        8, 71, 71)  # the fields win over the text
    assert report.memory_mode({"label": "before bench described the plan"}) is None
    assert [report.window_point(r) for r in ROWS[:8]] == ["resident", "resident", 2, 2, 4, 2, None, 8]


def test_latest_goes_by_time_not_by_file_order():
    rows = [{"k": 1, "v": "new", "time": "2026-11-22T07:00:00+00:00"},
            {"k": 1, "v": "old", "time": "2026-11-22T06:00:00+00:00"},
            {"k": 2, "v": "first"}, {"k": 2, "v": "second"}]
    got = report.latest(rows, lambda r: (r["k"],))
    assert {k: r["v"] for k, r in got.items()} == {(1,): "new", (2,): "second"}


def test_window_sweep_groups_by_io_and_shares_the_resident_run():
    sweep = report.window_sweep(ROWS)
    assert list(sweep) == [("default", 2, "float32", "float32"), ("default", 4, "float32", "float32")]
    res, lines = sweep[("default", 2, "float32", "float32")]
    assert res["s_per_token"] == 0.050
    assert {io: {w: r["s_per_token"] for w, r in by_w.items()} for io, by_w in lines.items()} == {
        "cache": {2: 0.100, 4: 0.075}, "direct": {2: 0.200}}
    assert sweep[("default", 4, "float32", "float32")][0] is None


def test_window_table_numbers_and_ratios():
    got = [(r["ranks"], r["io"], r["W"], r["s/token"], r["vs resident"], r["peak RSS MiB (max rank)"],
            r["predicted MiB"], r["prediction error"]) for r in table(report.window_table(report.window_sweep(ROWS)))]
    assert got == [
        ("2", "cache", "2", "0.1000", "2.00 x", "300", "330", "+10.0 %"),
        ("2", "cache", "4", "0.0750", "1.50 x", "350", "315", "-10.0 %"),
        ("2", "direct", "2", "0.2000", "4.00 x", "300", "330", "+10.0 %"),
        ("2", "cache", "resident", "0.0500", "1.00 x", "600", "630", "+5.0 %"),
        ("4", "cache", "8", "0.3000", "", "250", "200", "-20.0 %"),
    ]
    assert report.window_table(report.window_sweep(ROWS[-1:])) == ""


def test_generation_table_takes_medians_over_the_runs_of_each_configuration():
    rows = [r for r in table(report.generation_table(ROWS)) if r["system"] == "tpimpi" and r["ranks"] == "2"]
    got = sorted((r["runs"], r["s/token (p90)"], r["peak RSS MiB (max rank)"], r["vs transformers"]) for r in rows)
    assert got == [  # resident (2 runs), W=2 (2 runs), W=4, W=2 cold, budget: one line each
        ("1", "0.0750 (0.0750)", "350", "1.07 x"), ("1", "0.0900 (0.0900)", "300", "1.29 x"),
        ("1", "0.2000 (0.2000)", "300", "2.86 x"), ("2", "0.0450 (0.0450)", "700", "0.64 x"),
        ("2", "0.0800 (0.0800)", "300", "1.14 x")]


def write_results(tmp_path):
    paths = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    paths[0].write_text("\n".join(json.dumps(r) for r in ROWS[:4]) + "\n\nnot json\n")
    paths[1].write_text("\n".join(json.dumps(r) for r in ROWS[4:]) + "\n")
    return [str(p) for p in paths]


def test_main_writes_the_report_and_valid_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "report"
    assert report.main(write_results(tmp_path) + ["--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "## Latency and memory against the window" in md
    window_rows = table(md.split("## Latency and memory against the window")[1])
    assert [(r["W"], r["vs resident"]) for r in window_rows][:4] == [
        ("2", "2.00 x"), ("4", "1.50 x"), ("2", "4.00 x"), ("resident", "1.00 x")]
    for name in ("latency_vs_ranks", "memory_vs_ranks", "latency_vs_window", "memory_vs_window"):
        data = (out / f"{name}.png").read_bytes()
        assert data[:8] == PNG and len(data) > 10_000, name
        assert f"![{name}.png]({name}.png)" in md
    assert not (out / "allreduce_vs_size.png").exists()  # no allreduce rows


def test_tables_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    out = tmp_path / "report"
    assert report.main(write_results(tmp_path) + ["--out", str(out)]) == 0
    assert "| default | 2 | float32 | direct | 2 | 0.2000 | 4.00 x |" in (out / "report.md").read_text()
    assert not list(out.glob("*.png"))


def test_allreduce_table_and_plot_keep_the_latest_run(tmp_path):
    pytest.importorskip("matplotlib")
    t0, t1 = "2026-11-22T05:00:00+00:00", "2026-11-22T06:00:00+00:00"
    runs = [{"system": "allreduce", "algo": algo, "ranks": 2, "elems": e, "link_latency_ms": lat, "median_s": s,
             "time": t} for algo, e, lat, s, t in [("star", 576, 0.0, 9e-6, t1), ("star", 576, 0.0, 5e-6, t0),
                                                   ("ring", 576, 0.0, 2e-5, t1), ("ring", 1024, 1.0, 2e-3, t1)]]
    # a namespaced-cluster row (real TCP, no emulated latency) is its own link, not "emulated 0.0 ms"
    runs.append({"system": "allreduce", "algo": "star", "ranks": 2, "elems": 576, "link_latency_ms": 0.0,
                 "median_s": 2.2e-3, "time": t1, "transport": "netns-tcp", "hosts": 2, "delay_ms": "1",
                 "rate_mbps": "300"})
    emulated0, emulated1 = "one host, emulated link 0.0 ms", "one host, emulated link 1.0 ms"
    assert table(report.allreduce_table(runs)) == [
        {"ranks": "2", "floats": "576", "link": "2 hosts, real TCP, 1 ms/hop, 300 Mbit/s", "algorithm": "star",
         "median us": "2200.0"},
        {"ranks": "2", "floats": "576", "link": emulated0, "algorithm": "ring", "median us": "20.0"},
        {"ranks": "2", "floats": "576", "link": emulated0, "algorithm": "star", "median us": "9.0"},
        {"ranks": "2", "floats": "1024", "link": emulated1, "algorithm": "ring", "median us": "2000.0"}]
    assert report.plots(runs, tmp_path) == ["allreduce_vs_size.png"]
    assert (tmp_path / "allreduce_vs_size.png").read_bytes()[:8] == PNG
