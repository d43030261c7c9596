"""The planner: the exact search against brute force, its choices on unequal clusters, and the plan file."""

import argparse
import itertools
import json
import math

import numpy as np
import pytest

from tpimpi import comm as comm_mod
from tpimpi.errors import UsageError
from tpimpi.plan import describe, make_plan
from tpimpi.planner.devices import Device, Profile, load_profile
from tpimpi.planner.planfile import apply_to_args, load_plan, write_plan
from tpimpi.planner.search import (
    INF,
    Settings,
    brute_force,
    comm_seconds,
    cost_row,
    greedy,
    head_seconds,
    minmax_dp,
    search,
    share_table,
)
from tpimpi.synth import shape_config

CFG = shape_config("smollm2-135m", layers=4)
BIG = shape_config("llama2-7b", layers=4)  # layers outweigh the output head: shares matter
ST = Settings(max_seq=256, new_tokens=4, prompt_tokens=8)



def dev(speed=1.0, mem=64 << 30, lat=1e-4, bw=1e8, host="h"):
    return Device(host, {"float32": 4e9 * speed}, {"float32": 5e10 * speed}, 2e-4 / speed, 1e-4 / speed, mem,
                  5e8, 4e9, lat, bw)


def test_minmax_dp_matches_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(150):
        n, units = int(rng.integers(1, 4)), int(rng.integers(1, 7))
        c = rng.random((n, units + 1)) * 10
        c[:, 0] = 0.0
        c[0, 0] = INF
        c[rng.random(c.shape) < 0.2] = INF  # shares that do not fit
        c[1:, 0] = 0.0
        best = min(minmax_dp(c, k, units)[0] for k in range(1, n + 1))
        assert best == brute_force(c, units)
        for k in range(1, n + 1):
            obj, alloc = minmax_dp(c, k, units)
            if alloc:
                assert sum(alloc) == units and sum(u > 0 for u in alloc) == k
                assert obj == max(c[d][u] for d, u in enumerate(alloc) if u)


def test_search_matches_brute_force_over_devices_shares_links_and_algorithms():
    units = 6
    # links where the slowest latency and the lowest bandwidth belong to different devices
    devices = [dev(1.0), dev(0.5, lat=2e-3, bw=1e8), dev(0.2, lat=1e-4, bw=1e7), dev(1.0, lat=5e-4, bw=5e7)]
    table = share_table(CFG, devices, ST, units)
    best = search(CFG, devices, table, ST, units)
    brute = INF
    for alloc in itertools.product(range(units + 1), repeat=len(devices)):
        if sum(alloc) != units or alloc[0] == 0:
            continue
        members = [d for d, u in enumerate(alloc) if u]
        lat = max([devices[d].link_latency_s for d in members[1:]], default=0.0)
        bw = min([devices[d].link_Bps for d in members[1:]], default=math.inf)
        for algo in ST.algos:
            A = comm_seconds(CFG, algo, len(members), lat, bw) + head_seconds(CFG, devices[0], ST)
            brute = min(brute, max(cost_row(table[d], A)[alloc[d]] for d in members))
    assert best.objective == pytest.approx(brute, rel=1e-12)
    g = greedy(CFG, devices, table, ST, units)
    assert g.objective >= best.objective - 1e-12  # the heuristic never beats the exact search
    forced = search(CFG, devices, table, ST, units, {d: True for d in range(4)})  # all in: the mixed link
    assert forced is not None and all(forced.units)


def test_a_slower_device_gets_a_smaller_share_and_beats_equal_shares():
    prof = Profile((dev(1.0), dev(1.0), dev(1 / 3)))
    plan = make_plan(BIG, prof, ST, explain=False)
    ratios = [r["ratio"] for r in plan["ranks"]]
    assert len(ratios) == 3 and ratios[2] < ratios[1] and ratios[2] < ratios[0]
    p = plan["predicted"]
    assert p["equal_shares_s_per_token"] / p["s_per_token"] >= 1.3


def test_a_very_slow_device_is_left_out_and_says_why():
    prof = Profile((dev(1.0), dev(1.0), dev(0.01)))
    plan = make_plan(CFG, prof, ST)
    assert [r["device"] for r in plan["ranks"]] == [0, 1]
    (out,) = plan["left_out"]
    assert out["device"] == 2 and "without it" in out["reason"]
    with_it = float(out["reason"].split(", ")[1].split()[0])
    assert with_it > plan["predicted"]["s_per_token"]
    assert "mpirun -np 2" in describe(plan, CFG)


def test_devices_short_of_memory_stream_within_their_memory():
    mem = 1536 << 20  # the 4 layers (3.2 GB) and the head (0.5 GB) fit neither device, nor both resident
    plan = make_plan(BIG, Profile((dev(1.0, mem=mem), dev(1.0, mem=mem))), ST, explain=False)
    assert [r["mode"]["kind"] for r in plan["ranks"]] == ["budget", "budget"]
    for r in plan["ranks"]:
        assert r["predicted_peak_bytes"] <= 0.85 * mem


def test_plan_file_round_trip_and_refusals(tmp_path):
    prof = Profile((dev(1.0), dev(0.5)), "smollm2-135m")
    plan = dict(make_plan(CFG, prof, ST, explain=False), model="smollm2-135m")
    path = str(tmp_path / "plan.json")
    write_plan(path, plan)
    p = load_plan(path)
    assert p.world == 2 and p.ratios == tuple(float(r["ratio"]) for r in plan["ranks"])
    assert [m.to_dict() for m in p.modes] == [r["mode"] for r in plan["ranks"]]
    assert p.dtype == "float32" and p.allreduce == plan["allreduce"] and p.predicted == plan["predicted"]
    p.check(2, CFG)
    with pytest.raises(UsageError, match="is for 2 ranks .* launched with 3; launch it as the plan says: mpirun -np 2"):
        p.check(3)
    with pytest.raises(UsageError, match="was made for 'smollm2-135m'"):
        p.check(2, shape_config("smollm2-135m", layers=3))
    bad = tmp_path / "bad.json"
    for text, msg in (("{", "is not JSON"), ('{"format": "other"}', "not a tpimpi-plan file"),
                      (json.dumps(dict(plan, format="tpimpi-plan", version=1, ranks=[{"ratio": 1}])), "malformed")):
        bad.write_text(text)
        with pytest.raises(UsageError, match=msg):
            load_plan(str(bad))
    with pytest.raises(UsageError, match="cannot read"):
        load_plan(str(tmp_path / "missing.json"))


def test_plan_file_sets_the_run_and_refuses_options_it_decides(tmp_path):
    plan = make_plan(CFG, Profile((dev(1.0),)), ST, explain=False)
    path = str(tmp_path / "plan.json")
    write_plan(path, plan)
    args = argparse.Namespace(plan_file=path, ratios=None, resident=False, window=None, mem_budget=None,
                              dtype="bfloat16", allreduce="ring", max_seq_len=None, threads=None)
    p = apply_to_args(comm_mod.SerialComm(), args)
    assert (args.ratios, args.dtype, args.allreduce, args.max_seq_len) == (None, "float32", plan["allreduce"], 256)
    assert args.threads == 1  # the thread count the device was profiled with
    assert p.memory_options(0).resident
    args = argparse.Namespace(plan_file=path, ratios="1", resident=True, window=None, mem_budget=None)
    with pytest.raises(UsageError, match="drop --ratios, --resident"):
        apply_to_args(comm_mod.SerialComm(), args)


def test_profile_file_is_checked(tmp_path):
    prof = Profile((dev(1.0), dev(0.5, host="b")), "m")
    path = tmp_path / "c.json"
    path.write_text(prof.to_json())
    back = load_profile(path)
    assert back.devices == prof.devices and back.hosts == {"h": [0], "b": [1]}
    d = json.loads(prof.to_json())
    d["devices"][1]["disk_direct_Bps"] = -1
    path.write_text(json.dumps(d))
    with pytest.raises(UsageError, match="positive"):
        load_profile(path)


def test_a_store_split_otherwise_is_refused(tiny_source, tmp_path):
    from tpimpi.convert import convert
    from tpimpi.planner.planfile import check_store
    from tpimpi.store import load_manifest

    store = convert(tiny_source, tmp_path / "s2", 2, ratios="1,1", quiet=True)
    cfg = load_manifest(store)["config"]
    for ratios, ok in (([1, 1], True), ([30, 30], True), ([40, 20], False)):
        plan = make_plan(cfg, Profile((dev(1.0), dev(1.0))), Settings(max_seq=64), explain=False, ratios=ratios)
        write_plan(str(tmp_path / "p.json"), plan)
        p = load_plan(str(tmp_path / "p.json"))
        if ok:
            check_store(p, str(store))
        else:
            with pytest.raises(UsageError, match="split it with: python -m tpimpi.convert SOURCE --plan-file"):
                check_store(p, str(store))
    with pytest.raises(UsageError, match="is for 2 ranks"):
        check_store(load_plan(write_one(tmp_path, cfg)), str(convert(tiny_source, tmp_path / "s1", 1, quiet=True)))


def write_one(tmp_path, cfg) -> str:
    path = str(tmp_path / "p2.json")
    write_plan(path, make_plan(cfg, Profile((dev(1.0), dev(1.0))), Settings(max_seq=64), explain=False, ratios=[1, 1]))
    return path


def test_report_puts_the_prediction_beside_the_measurement():
    from tpimpi.report import plan_table

    row = {"system": "tpimpi", "label": "x", "ranks": 2, "ratios": [2.0, 1.0], "s_per_token": 0.5, "ttft_s": 1.0,
           "predicted": {"s_per_token": 0.6, "ttft_s": 0.9}, "predicted_bytes": [100 << 20, 90 << 20],
           "peak_rss_bytes": [110 << 20, 90 << 20], "plan_modes": [{"kind": "resident"}, {"kind": "window", "window": 2}]}
    table = plan_table([row, {"system": "tpimpi", "s_per_token": 1.0}])
    assert table.count("\n") == 2  # header, rule, one run: the run without a plan is not in it
    assert "| x | 2 | 2,1 | resident,window:2 | 0.6000 | 0.5000 | +20% | 0.900 | 1.000 | 100 / 110 | -9% |" in table


def test_describe_names_a_rank_without_heads():
    """Kept in by hand, a very slow device gets FFN columns but no query heads; the plan says so
    (it printed an empty range, "heads 9-8 (0)")."""
    plan = make_plan(CFG, Profile((dev(1.0), dev(1.0), dev(0.01))), ST, devices_in=[0, 1, 2])
    text = describe(plan, CFG)
    spans = [r["heads"] for r in plan["ranks"]]
    assert any(h1 == h0 for h0, h1 in spans), spans  # the case under test arises
    assert text.count("no heads") == sum(h1 == h0 for h0, h1 in spans)
    for h0, h1 in spans:
        if h1 > h0:
            assert f"heads {h0}-{h1 - 1} ({h1 - h0})" in text
