"""Rotary scaling and sliding windows as the checkpoints people run carry them, against transformers.

Every scaled model has original_max_position_embeddings 64 and is run on a 100-token prompt, so the
scaling changes the rotations the prompt sees (the test checks that it does). Logits are compared with
transformers on the same weights within 1e-4, greedy tokens exactly, at 2 ranks (threads).
"""

import json

import numpy as np
import pytest
import torch

import tinymodels as tm
from harness import rel_err, run_store
from threadcomm import ThreadGroup
from tpimpi.config import ModelConfig, RopeScaling
from tpimpi.convert import convert
from tpimpi.errors import ModelError
from tpimpi.layers import inv_frequencies
from tpimpi.sources import open_source

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-4
ORIG = 64  # original_max_position_embeddings of the scaled tiny models
IDS = [(i * 7919 + 13) % tm.VOCAB for i in range(100)]  # a prompt longer than ORIG
SHAPE = dict(hidden=64, n_heads=4, n_kv_heads=2, ffn=80)  # head_dim 16: 8 frequencies, all three llama3 bands
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": ORIG}


def reference(src, n_new=4):
    m = tm.hf_model(src)
    return tm.hf_last_logits(m, IDS), tm.hf_greedy(m, IDS, n_new)


def tpimpi_run(src, tmp_path, world=2, n_new=4, name="s"):
    store = convert(src, tmp_path / name, world, quiet=True)
    return ThreadGroup(world).run(lambda c: run_store(store, c, IDS, n_new, max_seq=128))[0]


def test_llama31_scaling_from_either_config_style_and_from_gguf(tmp_path):
    new_style = tm.make_tiny_hf(tmp_path / "params", seed=2, rope=LLAMA3, **SHAPE)
    old_style = tm.make_tiny_hf(tmp_path / "scaling", seed=2, rope=LLAMA3, rope_style="rope_scaling", **SHAPE)
    assert "rope_scaling" in json.loads((old_style / "config.json").read_text())
    gguf_path = tm.make_tiny_gguf(tmp_path / "l31.gguf", hf_dir=new_style)
    assert "rope_freqs.weight" in open_source(gguf_path).tensors
    ref_logits, ref_tokens = reference(new_style)
    assert rel_err(tm.hf_last_logits(tm.hf_model(old_style), IDS), ref_logits) < 1e-6  # one model, two spellings
    # the scaling matters for this prompt: the same weights without it give other logits
    cfg = json.loads((new_style / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": tm.ROPE_THETA}
    (tmp_path / "unscaled").mkdir()
    (tmp_path / "unscaled" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "unscaled" / "model.safetensors").symlink_to(new_style / "model.safetensors")
    assert rel_err(tm.hf_last_logits(tm.hf_model(tmp_path / "unscaled"), IDS), ref_logits) > 1e-2
    for i, src in enumerate((new_style, old_style, gguf_path)):
        logits, tokens = tpimpi_run(src, tmp_path, name=f"s{i}")
        assert rel_err(logits, ref_logits) < TOL, src
        assert tokens == ref_tokens, src


@pytest.mark.parametrize("rope,max_positions", [
    ({"rope_type": "linear", "factor": 4.0}, 512),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIG}, 4 * ORIG),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIG, "beta_fast": 8.0,
      "attention_factor": 1.3}, 4 * ORIG),
    ({"rope_type": "dynamic", "factor": 4.0}, 128),  # within the context dynamic NTK is the default rope
], ids=["linear", "yarn", "yarn-attention-factor", "dynamic"])
def test_rope_kinds_match_transformers(tmp_path, rope, max_positions):
    src = tm.make_tiny_hf(tmp_path / "hf", arch="qwen2", seed=5, rope=rope, max_positions=max_positions, **SHAPE)
    ref_logits, ref_tokens = reference(src)
    logits, tokens = tpimpi_run(src, tmp_path)
    assert rel_err(logits, ref_logits) < TOL
    assert tokens == ref_tokens


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIG},
    LLAMA3,
], ids=["linear", "yarn", "llama3"])
def test_gguf_rope_settings_mean_what_the_hf_config_means(tmp_path, rope):
    hf = tm.make_tiny_hf(tmp_path / "hf", rope=rope, max_positions=4 * ORIG, **SHAPE)
    gguf_path = tm.make_tiny_gguf(tmp_path / "m.gguf", hf_dir=hf, tokenizer=False)
    from_hf, from_gguf = open_source(hf).config, open_source(gguf_path).config
    assert from_gguf.rope_scaling is not None
    if rope["rope_type"] == "llama3":
        assert from_gguf.rope_scaling.kind == "factors"  # llama.cpp wrote divisors, not the parameters
    else:
        assert from_gguf.rope_scaling == from_hf.rope_scaling
    np.testing.assert_allclose(inv_frequencies(from_gguf), inv_frequencies(from_hf), rtol=1e-6)


def test_rope_freqs_of_llama31_8b_are_the_llama3_scaling_transformers_computes():
    """At Llama 3.1 8B's real settings, the divisors llama.cpp writes give transformers' frequencies."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
    hf_cfg = LlamaConfig(hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072,
                         rope_parameters=dict(rope))
    theirs, scale = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg)
    base = dict(arch="llama", n_layers=1, hidden=4096, n_heads=32, n_kv_heads=8, head_dim=128, ffn=14336,
                vocab=128256, rope_theta=500000.0, norm_eps=1e-5, max_context=131072, tied_embeddings=False)
    factors = tm.llama3_rope_freqs(rope, 500000.0, 128)
    from_params = inv_frequencies(ModelConfig(**base, rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)))
    from_tensor = inv_frequencies(ModelConfig(**base, rope_scaling=RopeScaling("factors", freq_factors=factors)))
    assert scale == 1.0
    np.testing.assert_allclose(from_params.numpy(), theirs.numpy(), rtol=1e-6)
    np.testing.assert_allclose(from_tensor.numpy(), theirs.numpy(), rtol=1e-6)
    assert (factors == 1).sum() > 0 and (factors == 8).sum() > 0 and ((factors > 1) & (factors < 8)).sum() > 0


@pytest.mark.parametrize("arch,window_layers", [("mistral", 0), ("qwen2", 1)])
def test_sliding_window_shorter_than_the_prompt_matches_transformers(tmp_path, arch, window_layers):
    src = tm.make_tiny_hf(tmp_path / arch, arch=arch, seed=6, sliding_window=24, max_window_layers=window_layers,
                          **SHAPE)
    cfg = open_source(src).config
    assert (cfg.sliding_window, cfg.sliding_from) == (24, window_layers)
    ref_logits, ref_tokens = reference(src, n_new=6)
    for world in (1, 3):
        logits, tokens = tpimpi_run(src, tmp_path, world, n_new=6, name=f"s{world}")
        assert rel_err(logits, ref_logits) < TOL
        assert tokens == ref_tokens
    # prefill in chunks smaller and larger than the window sees the same keys
    store = convert(src, tmp_path / "chunks", 1, quiet=True)
    from tpimpi.comm import SerialComm
    from tpimpi.engine import MemoryOptions

    for chunk in (7, 40):
        logits, _ = run_store(store, SerialComm(), IDS, 1, max_seq=128,
                              mem=MemoryOptions(resident=True, prefill_chunk=chunk))
        assert rel_err(logits, ref_logits) < TOL, chunk


# ---- what tpimpi does not implement is refused by name ---------------------------------------------


def _config_dir(tmp_path, **changes):
    """A Hugging Face directory with config.json and no model weights: enough for the settings to be read."""
    cfg = {"architectures": ["LlamaForCausalLM"], "num_attention_heads": 4, "hidden_size": 64,
           "num_hidden_layers": 2, "intermediate_size": 80, "vocab_size": 100, "max_position_embeddings": 256,
           "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    cfg.update(changes)
    d = tmp_path / "cfg"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    from safetensors.torch import save_file

    save_file({"unread": torch.zeros(1)}, d / "model.safetensors")  # a source needs one weight file to open
    return d


@pytest.mark.parametrize("changes,match", [
    (dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0], "long_factor": [2.0]}),
     "rope scaling 'longrope' is not supported"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0, "mystery": 1}), "does not understand: ['mystery']"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0},
          rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4}), "disagree"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    (dict(architectures=["Qwen2ForCausalLM"], use_sliding_window=True, sliding_window=16, max_window_layers=0,
          layer_types=["sliding_attention", "full_attention"]), "sliding layers must be the last"),
], ids=["longrope", "unknown-key", "two-scalings", "partial-rotary", "gelu", "window-layers"])
def test_unimplemented_hf_settings_are_refused(tmp_path, changes, match):
    with pytest.raises(ModelError, match=match.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        open_source(_config_dir(tmp_path, **changes))


def test_unimplemented_gguf_settings_and_stored_frequencies_are_checked(tmp_path):
    import gguf

    hf = tm.make_tiny_hf(tmp_path / "hf", **SHAPE)
    path = tm.make_tiny_gguf(tmp_path / "m.gguf", hf_dir=hf, tokenizer=False)
    meta = tm.read_gguf_metadata(path)
    w = gguf.GGUFWriter(tmp_path / "moe.gguf", "llama")
    for key, (vtype, val, item_type) in meta.items():
        if key not in ("general.architecture", "GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"):
            w.add_key_value(key, val, vtype, sub_type=item_type)
    w.add_expert_count(8)
    w.add_tensor("token_embd.weight", np.zeros((tm.VOCAB, 64), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelError, match=r"settings tpimpi does not implement: \['llama.expert_count'\]"):
        open_source(tmp_path / "moe.gguf")

    # an older checkpoint's stored inverse frequencies are compared with the computed ones, not skipped
    from safetensors.torch import load_file, save_file

    weights = load_file(hf / "model.safetensors")
    inv = inv_frequencies(open_source(hf).config)
    save_file({**weights, "model.layers.0.self_attn.rotary_emb.inv_freq": inv}, hf / "model.safetensors")
    convert(hf, tmp_path / "ok", 1, quiet=True)
    save_file({**weights, "model.layers.0.self_attn.rotary_emb.inv_freq": inv / 2}, hf / "model.safetensors")
    with pytest.raises(ModelError, match="inv_freq differs from the rotary frequencies"):
        convert(hf, tmp_path / "bad", 1, quiet=True)


def test_yarn_extends_the_context_to_factor_times_the_original(tmp_path):
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "rope_theta": 1e6}
    cfg = open_source(_config_dir(tmp_path, architectures=["Qwen2ForCausalLM"], rope_parameters=yarn)).config
    assert cfg.max_context == 1024 and cfg.rope_scaling.attention_factor == pytest.approx(0.1 * np.log(4) + 1)
    llama3 = {**LLAMA3, "rope_theta": 5e5}
    assert open_source(_config_dir(tmp_path, rope_parameters=llama3)).config.max_context == 256


@pytest.mark.parametrize("rope", [
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 128, "mscale": 1.0,
     "mscale_all_dim": 0.5, "beta_fast": 16, "beta_slow": 2},
    {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 512, "truncate": False},
    {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 100, "attention_factor": 0.9},
    {"rope_type": "linear", "factor": 2.5},
    {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
     "original_max_position_embeddings": 300},
], ids=["yarn", "yarn-mscale", "yarn-no-truncate", "yarn-attention-factor", "linear", "llama3"])
def test_frequencies_and_attention_factor_are_transformers(rope, tmp_path):
    """Our rope settings from a config against transformers' rope init functions on the same config."""
    from transformers import Qwen2Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from tpimpi.layers import rope_attention_scale

    params = {**rope, "rope_theta": 1e6}
    hf_cfg = Qwen2Config(hidden_size=256, num_attention_heads=2, max_position_embeddings=1024,
                         rope_parameters=dict(params))
    theirs, their_scale = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf_cfg)
    ours = open_source(_config_dir(tmp_path, architectures=["Qwen2ForCausalLM"], hidden_size=256,
                                   num_attention_heads=2, max_position_embeddings=1024,
                                   rope_parameters=params)).config
    np.testing.assert_allclose(inv_frequencies(ours).numpy(), theirs.numpy(), rtol=1e-6)
    assert rope_attention_scale(ours) == pytest.approx(their_scale, rel=1e-12)
