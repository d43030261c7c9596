"""tpimpi.quantize: the knapsack against brute force, sensitivities measured from a kept hidden state equal
to a full pass, the mixed store it writes against transformers on the same (dequantized) weights, and the
message for a budget below the smallest store."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import tinymodels as tm
import torch
from harness import rel_err, run_store
from threadcomm import ThreadGroup

from tpimpi import quantize as qz
from tpimpi import store
from tpimpi.engine import MemoryOptions
from tpimpi.quant import formats as qf
from tpimpi.sources import open_source

pytestmark = pytest.mark.usefixtures("one_thread")
WIDTHS = ["bfloat16", "q8_0", "q4_0"]


@pytest.fixture(scope="module")
def qtiny(tmp_path_factory):
    """A tiny untied model whose widths are whole quantization groups."""
    return tm.make_tiny_hf(tmp_path_factory.mktemp("qzhf") / "llama", seed=7, n_layers=2, hidden=64, n_heads=2,
                           n_kv_heads=1, ffn=96, tie=False)


def brute_force(sizes, costs, budget):
    best = None
    for pick in itertools.product(*(range(len(s)) for s in sizes)):
        if sum(s[j] for s, j in zip(sizes, pick)) <= budget:
            c = sum(c[j] for c, j in zip(costs, pick))
            best = c if best is None or c < best else best
    return best


def test_knapsack_is_exact_against_brute_force():
    rng = np.random.default_rng(0)
    for case in range(40):
        n, k = int(rng.integers(1, 6)), int(rng.integers(1, 4))
        sizes = rng.integers(0, 12, (n, k)).tolist()
        costs = rng.random((n, k)).round(3).tolist()
        for budget in range(0, sum(max(s) for s in sizes) + 2):
            want = brute_force(sizes, costs, budget)
            pick = qz.knapsack(sizes, costs, budget)
            if want is None:
                assert pick is None, (sizes, budget)
                continue
            assert sum(s[j] for s, j in zip(sizes, pick)) <= budget
            assert sum(c[j] for c, j in zip(costs, pick)) == pytest.approx(want), (case, sizes, costs, budget)


def test_sensitivity_from_a_kept_hidden_state_equals_a_full_pass(qtiny):
    src = open_source(qtiny)
    cal = qz.Calibrator(src, qz.calibration_ids(src, 20))
    views = cal.model.blocks.views
    for b in range(4):
        assert cal.sensitivity(b, "float32") == 0.0  # the float block itself: the reference, exactly
    swapped = list(views)
    swapped[3] = cal.block(3, "q4_0")
    whole = cal._run(0, cal._embed(cal.embed_raw, "float32"), swapped)
    part = cal._run(3, cal.inputs[3].clone(), swapped)
    assert rel_err(part.numpy(), whole.numpy()) < 1e-6
    s = {f: cal.sensitivity(3, f) for f in WIDTHS}
    assert 0 < s["bfloat16"] < s["q8_0"] < s["q4_0"]
    assert cal.sensitivity(qz.EMBED, "q4_0") > 0


def _dequantized_hf(qtiny, fmts: store.Formats):
    """transformers on the tiny model with every weight as the store holds it (dequantized or rounded)."""
    model = tm.hf_model(qtiny)

    def as_stored(w: torch.Tensor, fmt: str) -> torch.Tensor:
        a = qf.as_format(w.detach().numpy().astype(np.float32), fmt)
        if isinstance(a, qf.QTensor):
            return torch.from_numpy(qf.dequantize(a))
        return torch.from_numpy(a).to(getattr(torch, fmt)).float()

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("model.layers."):
                i = int(name.split(".")[2])
                fmt = fmts.blocks[2 * i + (0 if ".self_attn." in name or "input_layernorm" in name else 1)]
                fmt = store.Formats.norm_format(fmt) if p.ndim == 1 else fmt
            elif name == "model.norm.weight":
                fmt = fmts.final_norm
            else:
                fmt = fmts.head if name.startswith("lm_head") else fmts.embed
            p.copy_(as_stored(p, fmt))
    return model


def test_quantize_writes_a_mixed_store_that_runs_like_its_dequantized_reference(qtiny, tmp_path, prompt_ids,
                                                                                  monkeypatch, capsys):
    monkeypatch.setenv("TPIMPI_CACHE", str(tmp_path / "cache"))
    cfg = open_source(qtiny).config
    items = [*range(2 * cfg.n_layers), qz.EMBED]
    lo = sum(qz.item_bytes(cfg, "q4_0", it) for it in items)
    hi = sum(qz.item_bytes(cfg, "bfloat16", it) for it in items)
    budget = (lo + hi) // 2
    out = tmp_path / "mixed"
    argv = [str(qtiny), "--budget", str(budget), "--widths", ",".join(WIDTHS), "--calibration-tokens", "20",
            "--ranks", "2", "--out", str(out), "--unit", "1"]
    assert qz.main(argv + ["--plan"]) == 0
    planned = capsys.readouterr().out
    assert "layers.1.mlp" in planned and "embedding+head" in planned and not out.exists()
    assert qz.main(argv) == 0  # the sensitivities now come from the cache
    assert capsys.readouterr().out.splitlines()[-1].split(":")[1] == planned.splitlines()[-1].split(":")[1]
    m = store.load_manifest(out)
    fmts = store.Formats.parse(m["dtype"], cfg)
    assert len({*fmts.blocks, fmts.embed}) > 1, m["dtype"]  # the budget forces a mix
    assert sum(qz.item_bytes(cfg, f, b) for b, f in enumerate(fmts.blocks)) + \
        qz.item_bytes(cfg, fmts.embed, qz.EMBED) <= budget
    ref = _dequantized_hf(qtiny, fmts)
    want, want_tokens = tm.hf_last_logits(ref, prompt_ids), tm.hf_greedy(ref, prompt_ids, 4)
    mem = MemoryOptions(window=2)
    logits, tokens = ThreadGroup(2).run(lambda c: run_store(out, c, prompt_ids, 4, mem=mem))[0]
    assert rel_err(logits, want) < 1e-4
    assert tokens == want_tokens


def test_a_budget_below_the_smallest_store_says_how_small_it_can_go(qtiny, capsys):
    cfg = open_source(qtiny).config
    least = sum(qz.item_bytes(cfg, "q4_0", it) for it in [*range(2 * cfg.n_layers), qz.EMBED])
    assert qz.main([str(qtiny), "--budget", str(least - 1), "--widths", "bf16,q4_0", "--plan"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tpimpi: error:") and f"{least} B" in err
    assert qz.main([str(qtiny), "--budget", "1M", "--widths", "q5,q4"]) == 2
    assert "--widths" in capsys.readouterr().err


def test_convert_refuses_a_per_block_spec_that_does_not_fit_the_model(qtiny, tmp_path):
    from tpimpi.convert import convert
    from tpimpi.errors import UsageError

    with pytest.raises(UsageError, match="gives 3 block formats for 2 layers"):
        convert(qtiny, tmp_path / "s", 1, dtype="blocks=q8_0*3;embed=q8_0", quiet=True)
    assert not (tmp_path / "s").exists()
