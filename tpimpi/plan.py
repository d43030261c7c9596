"""Plan a run on unequal devices: which devices take part, each one's share and memory mode, the allreduce.

    python -m tpimpi.plan --profile cluster.json [--model M] [--dtype float32] [--out plan.json]

Reads a profile (`mpirun -np N python -m tpimpi.profile`), searches devices, shares, memory modes and
allreduce algorithms exactly (tpimpi/planner/search.py), and prints the plan with its predicted TTFT,
seconds per token and per-rank memory, why each device is in or out, and the mpirun line that runs it.
`generate`, `bench` and `convert` take the plan with --plan-file.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

from .config import ModelConfig
from .errors import TpimpiError, UsageError
from .memory import parse_size
from .planner.costmodel import WEIGHT_BYTES, Mode
from .planner.devices import load_profile
from .planner.planfile import resolve_model, write_plan
from .planner.search import ALGOS, UNITS, Candidate, Settings, candidates, greedy, realize, share_table
from .scheduler import IO_MODES
from .shard import plan as split_plan

MiB = 1 << 20


def make_plan(cfg, profile, st: Settings, units: int = UNITS, explain: bool = True, devices_in=None,
              ratios=None, modes=None) -> dict:
    """The plan as the dict the plan file holds, from a profile: searched, or with the devices forced in
    (devices_in: the others are left out), or a configuration given whole (ratios of devices_in, or of
    every device; modes per rank or chosen) whose prediction is wanted."""
    devices, given = profile.devices, ratios is not None
    for d in devices:
        if st.dtype not in d.matvec_Bps:
            raise UsageError(f"the profile has no {st.dtype} figures (profiled: {', '.join(d.matvec_Bps)}); "
                             f"profile again with --dtypes including {st.dtype}")
    chosen = sorted(devices_in) if devices_in is not None else list(range(len(devices)))
    if chosen[0] != 0 or chosen[-1] >= len(devices):
        raise UsageError(f"--devices must include device 0 (the master) and name devices 0..{len(devices) - 1}")
    table = share_table(cfg, devices, st, units) if not given else None
    if ratios is not None:
        if len(ratios) != len(chosen) or (modes is not None and len(modes) != len(chosen)):
            raise UsageError(f"{len(chosen)} devices take part: give as many --ratios and --modes")
        alloc = [0] * len(devices)
        for d, r in zip(chosen, ratios):
            alloc[d] = r
        options = [Candidate(math.nan, tuple(alloc), a) for a in st.algos]
        best = min(options, key=lambda c: realize(cfg, devices, c, st, modes)[2].s_per_token)
        reasons = {}
    else:
        forced = {d: d in chosen for d in range(len(devices))} if devices_in is not None else None
        best, pred, reasons = _best_of_pool(cfg, devices, table, st, units, forced, explain)
    if best is None:
        need = table[0][units].peak_bytes if table else 0
        raise UsageError(f"no plan fits{' the devices asked for' if devices_in is not None else ''}: the master "
                         f"would need {need / MiB:.0f} MiB even with the smallest share, or a device cannot stream "
                         f"one block; use a smaller dtype or more devices")
    members, modes, pred = realize(cfg, devices, best, st, modes)
    g = greedy(cfg, devices, table, st, units) if table else None
    g_pred = realize(cfg, devices, g, st)[2] if g is not None else None
    ratios = [best.units[d] for d in members]
    slices = split_plan(cfg.n_heads, cfg.n_kv_heads, cfg.ffn, ratios)
    hosts = [devices[d].host for d in members]
    counts: dict[str, int] = {}
    for h in hosts:
        counts[h] = counts.get(h, 0) + 1
    mpirun = f"mpirun -np {len(members)}" + (f" --host {','.join(f'{h}:{c}' for h, c in counts.items())}"
                                              if len(counts) > 1 else "")
    ranks = []
    for r, (d, s, m, rp) in enumerate(zip(members, slices, modes, pred.ranks)):
        ranks.append({"rank": r, "device": d, "host": devices[d].host, "ratio": ratios[r], "mode": m.to_dict(),
                      "heads": list(s.q_heads), "kv_heads": list(s.kv_heads), "ffn": list(s.ffn),
                      "predicted_peak_bytes": rp.peak_bytes, "mem_bytes": devices[d].mem_bytes,
                      "memory": rp.memory, "compute_s": rp.compute_s, "io_wait_s": rp.io_wait_s,
                      "allreduce_s": rp.allreduce_s, "read_bytes": rp.read_bytes, "io_hidden": rp.io_hidden,
                      "reason": reasons.get(d, "the master (tokenizer, embedding, head; sees the prompt)" if d == 0 else
                                          "as given" if given else "as searched")})
    return {
        "model": profile.model, "config": cfg.to_dict(), "dtype": st.dtype,
        "allreduce": best.algo, "ranks": ranks, "max_seq": st.max_seq, "chunk": st.chunk, "io": st.io,
        "left_out": [{"device": d, "host": devices[d].host, "reason": reasons.get(d, "")}
                     for d in range(len(devices)) if d not in members],
        "predicted": {"ttft_s": pred.ttft_s, "s_per_token": pred.s_per_token, "prompt_tokens": st.prompt_tokens,
                      "new_tokens": st.new_tokens, "allreduce_s": pred.allreduce_s,
                      "greedy_s_per_token": g_pred.s_per_token if g_pred else None,
                      "equal_shares_s_per_token": _equal(cfg, devices, best.algo, st)},
        "mpirun": mpirun,
        "device_figures": [devices[d].to_dict() for d in members],  # for predictions beside traces
    }


POOL = 6  # optima of the search predicted in full (and 3 for each device forced in or out)


def _best_of_pool(cfg, devices, table, st: Settings, units: int, forced, explain: bool):
    """(best candidate, its prediction, reasons per device): the search's best optima (and the greedy
    heuristic's plan), and with explain each device forced in and out, predicted in full; the plan is the
    best prediction among them."""
    pool = candidates(cfg, devices, table, st, units, forced)[:POOL]
    g = greedy(cfg, devices, table, st, units) if forced is None else None
    if g is not None:  # the heuristic's plan competes too: the plan is never slower than the cross-check
        pool.append(g)
    if explain and forced is None:
        for d in range(1, len(devices)):
            for f in (True, False):
                pool += candidates(cfg, devices, table, st, units, {d: f})[:3]
    preds = {}
    for c in pool:
        if (c.units, c.algo) not in preds:
            preds[(c.units, c.algo)] = (c, realize(cfg, devices, c, st)[2])
    fitting = [(c, p) for c, p in preds.values() if p.fits]
    if not fitting:
        return None, None, {}
    best, pred = min(fitting, key=lambda cp: (cp[1].s_per_token, cp[1].ttft_s))
    reasons = {}
    if explain:
        for d in range(1, len(devices)):
            alt = [p.s_per_token for c, p in fitting if (c.units[d] > 0) != (best.units[d] > 0)]
            other = min(alt) if alt else None
            if best.units[d]:
                reasons[d] = f"{pred.s_per_token:.4g} s/token with it, " + (
                    f"{other:.4g} without" if other else "no plan fits without it")
            else:
                reasons[d] = f"{pred.s_per_token:.4g} s/token without it, " + (
                    f"{other:.4g} with it at its best share" if other else "it cannot hold a share")
    return best, pred, reasons


def _equal(cfg, devices, algo, st: Settings) -> float | None:
    """Every device with an equal share, for comparison (None if that does not fit)."""
    from .planner.costmodel import predict
    from .planner.search import choose_mode

    n = len(devices)
    slices = split_plan(cfg.n_heads, cfg.n_kv_heads, cfg.ffn, [1] * n)
    modes = [choose_mode(cfg, s, r, n, d, st)[0] for r, (d, s) in enumerate(zip(devices, slices))]
    if any(m is None for m in modes):
        return None
    return predict(cfg, list(devices), [1] * n, modes, st.dtype, algo, prompt_tokens=st.prompt_tokens,
                   new_tokens=st.new_tokens, max_seq=st.max_seq, chunk=st.chunk, io=st.io).s_per_token


def describe(plan: dict, cfg) -> str:
    """The plan as a person reads it."""
    p = plan["predicted"]
    n_dev = len(plan["ranks"]) + len(plan["left_out"])
    lines = [f"{cfg.arch}: {cfg.n_layers} layers, hidden {cfg.hidden}, {cfg.n_heads} heads ({cfg.n_kv_heads} KV), "
             f"FFN {cfg.ffn}; {plan['dtype']}, context {plan['max_seq']}, {p['prompt_tokens']}-token prompt",
             f"plan: {len(plan['ranks'])} of {n_dev} devices, allreduce {plan['allreduce']}; predicted TTFT "
             f"{p['ttft_s']:.3f} s, {p['s_per_token']:.4f} s/token"
             + (f" (equal shares on all devices: {p['equal_shares_s_per_token']:.4f}" if p["equal_shares_s_per_token"]
                else " (equal shares on all devices: does not fit")
             + (f"; greedy cross-check: {p['greedy_s_per_token']:.4f})" if p["greedy_s_per_token"] else ")")]
    for r in plan["ranks"]:
        lines.append(
            f"rank {r['rank']} = device {r['device']} ({r['host']}): ratio {r['ratio']:g}, {_heads(r['heads'])}, "
            f"FFN {r['ffn'][1] - r['ffn'][0]}; "
            f"{_mode(r['mode'])}, peak {r['predicted_peak_bytes'] / MiB:.0f} of {r['mem_bytes'] / MiB:.0f} MiB; per "
            f"token compute {r['compute_s'] * 1e3:.1f} ms, I/O wait {r['io_wait_s'] * 1e3:.1f} ms, allreduce "
            f"{r['allreduce_s'] * 1e3:.1f} ms; in: {r['reason']}")
    for d in plan["left_out"]:
        lines.append(f"device {d['device']} ({d['host']}) left out: {d['reason']}")
    lines.append(f"run it with exactly these ranks: {plan['mpirun']} python -m tpimpi.generate "
                 f"--plan-file PLAN --model MODEL ...")
    return "\n".join(lines)


def _heads(span: list[int]) -> str:
    """A rank's query heads as "heads 5-8 (4)", or "no heads" for a rank that takes FFN columns only."""
    h0, h1 = span
    return f"heads {h0}-{h1 - 1} ({h1 - h0})" if h1 > h0 else "no heads"


def _mode(m: dict) -> str:
    if m["kind"] == "window":
        return f"streamed through a window of {m['window']}"
    if m["kind"] == "budget":
        return f"budget {m['budget'] / MiB:.0f} MiB"
    return "resident"


def _split(text: str, option: str) -> list[str]:
    parts = text.split(",")
    try:
        if not all(float(x) > 0 for x in parts):
            raise ValueError
    except ValueError:
        raise UsageError(f"{option} {text!r} is not a comma-separated list of positive numbers") from None
    return parts


def _ints(text: str, option: str) -> list[int]:
    try:
        return sorted({int(x) for x in text.split(",")})
    except ValueError:
        raise UsageError(f"{option} {text!r} is not a comma-separated list of device numbers") from None


def parse_mode(text: str) -> Mode:
    """'resident', 'window:2' or 'budget:600M' -> Mode."""
    kind, _, arg = text.partition(":")
    if kind == "resident" and not arg:
        return Mode("resident")
    if kind == "window" and arg.isdigit() and int(arg) >= 1:
        return Mode("window", window=int(arg))
    if kind == "budget" and arg:
        return Mode("budget", budget=parse_size(arg, "--modes budget"))
    raise UsageError(f"--modes: {text!r} is not resident, window:W or budget:SIZE")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tpimpi.plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", required=True, help="the cluster's profile (tpimpi.profile)")
    p.add_argument("--model", help="store, .gguf, Hugging Face directory or tpimpi.synth shape name "
                   "(default: the default model)")
    p.add_argument("--dtype", choices=list(WEIGHT_BYTES), default="float32", help="storage format to plan for "
                   "(q8_0, q4_0, q4_1: GGUF's blocks, as tpimpi.convert --dtype writes them)")
    p.add_argument("--allreduce", choices=ALGOS, help="plan with this algorithm only (default: the best)")
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompt length the TTFT is predicted for")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--max-seq-len", type=int, default=1024, help="context the KV cache is sized for")
    p.add_argument("--prefill-chunk", type=int, default=256)
    p.add_argument("--io", choices=IO_MODES, default="cache")
    p.add_argument("--devices", help="only these devices of the profile take part, e.g. 0,1,3 (all of them: "
                   "the search then chooses only shares and modes)")
    p.add_argument("--ratios", help="do not search: predict these shares of the devices taking part")
    p.add_argument("--modes", help="with --ratios: each rank's memory mode, e.g. resident,window:2,budget:600M")
    p.add_argument("--out", help="write the plan file here")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    try:
        args = p.parse_args(argv)
        if min(args.prompt_tokens, args.new_tokens, args.max_seq_len, args.prefill_chunk) < 1:
            raise UsageError("--prompt-tokens, --new-tokens, --max-seq-len and --prefill-chunk must be positive")
        t0 = time.perf_counter()
        prof = load_profile(args.profile)
        if args.model is None and prof.config:  # the model the profile measured: its config is in the profile
            cfg, label = ModelConfig.from_dict(prof.config), prof.model
        else:
            cfg, label, _ = resolve_model(args.model)
        max_seq = min(args.max_seq_len, cfg.max_context)
        if args.prompt_tokens + args.new_tokens > max_seq:
            raise UsageError(f"{args.prompt_tokens} prompt and {args.new_tokens} new tokens do not fit a context "
                             f"of {max_seq}")
        st = Settings(args.dtype, args.prompt_tokens, args.new_tokens, max_seq, args.prefill_chunk, args.io,
                      (args.allreduce,) if args.allreduce else ALGOS)
        devices_in = _ints(args.devices, "--devices") if args.devices else None
        ratios = [float(x) for x in _split(args.ratios, "--ratios")] if args.ratios else None
        if args.modes and not ratios:
            raise UsageError("--modes goes with --ratios (a searched plan chooses each rank's mode)")
        modes = [parse_mode(m) for m in args.modes.split(",")] if args.modes else None
        plan = make_plan(cfg, prof, st, devices_in=devices_in, ratios=ratios, modes=modes)
        plan["model"] = label
        plan["profile"] = args.profile
        if args.out:
            write_plan(args.out, plan)
        print(json.dumps(plan, indent=1) if args.json else describe(plan, cfg).replace("PLAN", args.out or "PLAN"),
              flush=True)
        print(f"planned in {time.perf_counter() - t0:.1f} s" + (f" -> {args.out}" if args.out else ""),
              file=sys.stderr)
    except TpimpiError as e:
        print(f"tpimpi: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
