"""Sharded equals dense: tpimpi's logits and greedy tokens against transformers on the same weights.

N ranks run as N threads (tests/threadcomm.py), so every rank count 1..16 is checked quickly; the MPI
tests repeat the check over the real transport.
"""

import pytest
import torch

from harness import rel_err, run_store
from threadcomm import ThreadGroup
from tpimpi.convert import convert

TOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


def _run(store, world, prompt_ids, n_new=8):
    return ThreadGroup(world).run(lambda c: run_store(store, c, prompt_ids, n_new))[0]


@pytest.mark.parametrize("world,ratios", [(1, None), (2, None), (3, None), (4, None), (5, None), (8, None),
                                          (9, None), (12, None), (16, None), (2, "3,1"), (3, "1,2,4"),
                                          (4, "1,1,1,5"), (8, "2,1,1,1,1,1,1,3")])
def test_tiny_gguf_matches_transformers(tiny_source, tiny_ref, prompt_ids, tmp_path, world, ratios):
    store = convert(tiny_source, tmp_path / "s", world, ratios, quiet=True)
    logits, tokens = _run(store, world, prompt_ids)
    ref_logits, ref_tokens = tiny_ref
    assert rel_err(logits, ref_logits) < TOL
    assert tokens == ref_tokens


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_hf_directory_sources_match_transformers(arch, tmp_path, prompt_ids):
    from tinymodels import hf_greedy, hf_last_logits, hf_model, make_tiny_hf

    src = make_tiny_hf(tmp_path / arch, arch=arch, seed=3, tie=arch != "mistral")
    m = hf_model(src)
    ref_logits, ref_tokens = hf_last_logits(m, prompt_ids), hf_greedy(m, prompt_ids, 6)
    for world in (1, 3):
        logits, tokens = _run(convert(src, tmp_path / f"s{world}", world, quiet=True), world, prompt_ids, 6)
        assert rel_err(logits, ref_logits) < TOL
        assert tokens == ref_tokens


def test_hf_bfloat16_checkpoint_is_read_exactly(tmp_path, prompt_ids):
    from tinymodels import hf_last_logits, hf_model, make_tiny_hf

    src = make_tiny_hf(tmp_path / "bf", seed=4, dtype=torch.bfloat16)
    m = hf_model(src)  # float32 model of the bfloat16 weights
    logits, _ = _run(convert(src, tmp_path / "s", 2, quiet=True), 2, prompt_ids, 1)
    assert rel_err(logits, hf_last_logits(m, prompt_ids)) < TOL


@pytest.mark.slow
def test_default_model_matches_transformers(default_hf, model_cache, monkeypatch, prompt_ids):
    from tinymodels import hf_greedy, hf_last_logits
    from tpimpi.models import prepare

    ref_logits, ref_tokens = hf_last_logits(default_hf, prompt_ids), hf_greedy(default_hf, prompt_ids, 8)
    monkeypatch.setenv("TPIMPI_CACHE", str(model_cache))  # the stores the command line makes, shared
    for world in (1, 3):
        store = prepare(None, world, quiet=True)
        logits, tokens = _run(store, world, prompt_ids)
        assert rel_err(logits, ref_logits) < TOL
        assert tokens == ref_tokens
