"""tpimpi.eval: perplexity against transformers' on the same weights and token ids, at several rank counts
and memory modes; KL divergence and top-1 agreement of a store against itself and a perturbed one."""

from __future__ import annotations

import math

import pytest
import tinymodels as tm
import torch
from threadcomm import ThreadGroup

from tpimpi import eval as ev
from tpimpi.convert import convert
from tpimpi.engine import Engine, MemoryOptions
from tpimpi.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
CTX = 24


@pytest.fixture(scope="module")
def qtiny(tmp_path_factory):
    """A tiny model whose widths are whole quantization groups (hidden 64, FFN 96)."""
    return tm.make_tiny_hf(tmp_path_factory.mktemp("evalhf") / "llama", seed=5, n_layers=2, hidden=64, n_heads=2,
                           n_kv_heads=1, ffn=96, tie=True)


@pytest.fixture(scope="module")
def text_ids(qtiny):
    return ev.text_ids(Tokenizer.load(qtiny), ev.builtin_text(), 60)


def hf_perplexity(model, ids: list[int], ctx: int) -> float:
    """exp of the mean negative log-likelihood over windows of ctx, as tpimpi.eval scores them."""
    nll, n = 0.0, 0
    with torch.no_grad():
        for a, b in ev.windows(len(ids), ctx):
            logits = model(input_ids=torch.tensor([ids[a:b]]), use_cache=False).logits[0].double()  # [T, V]
            lp = torch.log_softmax(logits, -1)[:-1]
            nll -= float(lp.gather(1, torch.tensor(ids[a + 1 : b])[:, None]).sum())
            n += b - a - 1
    return math.exp(nll / n)


def evaluate(path, world: int, ids, ref_path=None, mem=MemoryOptions(resident=True), ctx=CTX) -> dict:
    def body(c):
        eng = Engine(c, path, max_seq=ctx, mem=mem).load()
        ref = Engine(c, ref_path, max_seq=ctx, mem=mem).load() if ref_path else None
        out = ev.evaluate(eng, ids if c.rank == 0 else None, ctx, ref)
        eng.close()
        if ref:
            ref.close()
        return out

    return ThreadGroup(world).run(body)[0]


def test_builtin_text_is_real_prose_split_in_two_halves():
    ev_text, cal = ev.builtin_text("eval"), ev.builtin_text("calibration")
    assert len(ev_text) > 100_000 and len(cal) > 100_000
    assert ev_text[:2000] not in cal and cal[-2000:] not in ev_text  # two different slices of the prose
    assert "statement" in ev_text and ev.builtin_text() == ev_text


def test_windows_cover_every_token_once():
    assert ev.windows(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert ev.windows(9, 4) == [(0, 4), (4, 8)]  # a last window of one token scores nothing


@pytest.mark.parametrize("world,mem", [(1, MemoryOptions(resident=True)), (2, MemoryOptions(window=2)),
                                       (3, MemoryOptions(resident=True, prefill_chunk=7))])
def test_perplexity_equals_transformers(qtiny, text_ids, tmp_path, world, mem):
    path = convert(qtiny, tmp_path / "s", world, quiet=True)
    got = evaluate(path, world, text_ids, mem=mem)
    want = hf_perplexity(tm.hf_model(qtiny), text_ids, CTX)
    assert got["tokens_scored"] == len(text_ids) - len(ev.windows(len(text_ids), CTX))
    assert abs(got["perplexity"] / want - 1) < 1e-5, (got["perplexity"], want)


def test_a_store_against_itself_and_against_a_perturbed_one(qtiny, text_ids, tmp_path):
    f32 = convert(qtiny, tmp_path / "f32", 2, quiet=True)
    q4 = convert(qtiny, tmp_path / "q4", 2, dtype="q4_0", quiet=True)
    same = evaluate(f32, 2, text_ids, ref_path=f32)
    assert same["kl_divergence"] == 0 and same["top1_agreement"] == 1
    assert same["reference_perplexity"] == same["perplexity"]
    other = evaluate(q4, 2, text_ids, ref_path=f32)
    assert other["kl_divergence"] > 1e-5
    assert other["reference_perplexity"] == pytest.approx(same["perplexity"], rel=1e-12)
    assert other["perplexity"] != same["perplexity"]


@pytest.mark.slow
def test_default_model_perplexity_equals_transformers(tmp_path, default_hf):
    src = tm.default_gguf_path()
    path = convert(src, tmp_path / "s", 1, dtype="auto", quiet=True)
    ids = ev.text_ids(Tokenizer.load(path), ev.builtin_text(), 48)
    got = evaluate(path, 1, ids, ctx=48)["perplexity"]
    want = hf_perplexity(default_hf, ids, 48)
    assert abs(got / want - 1) < 1e-4, (got, want)


def test_cli_refuses_bad_input_with_one_message(capsys, tmp_path):
    assert ev.main(["--text", str(tmp_path / "missing.txt"), "--model", str(tmp_path / "none.gguf")]) == 2
    assert "tpimpi: error:" in capsys.readouterr().err
    assert ev.main(["--max-tokens", "1"]) == 2
    assert "--max-tokens" in capsys.readouterr().err
