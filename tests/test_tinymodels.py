"""The fixtures in tinymodels.py are right: a tiny GGUF means the same model as the HF directory it
came from, the tiny models build for every family, and the real default model answers sensibly."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import tinymodels as tm

# "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n..." style ids, long enough for RoPE to matter
IDS = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 2, 198, 1, 4093, 198]


def rel_err(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(x - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize(
    "shape",
    [
        dict(tie=True),  # the defaults: 9 heads sharing 3 KV heads, head_dim 8
        dict(tie=False, n_layers=3, hidden=64, n_heads=4, n_kv_heads=2, ffn=80),
    ],
    ids=["tied-9q3kv", "untied-4q2kv"],
)
def test_gguf_means_the_same_model_as_its_hf_dir(tmp_path, shape):
    hf_dir = tm.make_tiny_hf(tmp_path / "hf", seed=3, **shape)
    gguf_path = tm.make_tiny_gguf(tmp_path / "tiny.gguf", hf_dir=hf_dir)

    ref, from_gguf = tm.hf_model(hf_dir), tm.hf_model(gguf_path)
    cfg = from_gguf.config
    assert cfg.tie_word_embeddings == shape["tie"]  # transformers infers it from output.weight's absence
    assert cfg.num_key_value_heads == ref.config.num_key_value_heads
    assert cfg.head_dim == ref.config.head_dim
    assert cfg.rope_parameters["rope_theta"] == tm.ROPE_THETA
    assert cfg.rms_norm_eps == pytest.approx(tm.RMS_EPS, rel=1e-6)  # stored as float32

    expected = tm.hf_last_logits(ref, IDS)
    got = tm.hf_last_logits(from_gguf, IDS)
    assert expected.shape == got.shape == (tm.VOCAB,) and expected.dtype == np.float32
    assert rel_err(got, expected) <= 1e-5
    assert tm.hf_greedy(from_gguf, IDS, 5) == tm.hf_greedy(ref, IDS, 5)


def test_gguf_layout_follows_llama_cpp(tmp_path):
    hf_dir = tm.make_tiny_hf(tmp_path / "hf", tie=False)
    gguf_path = tm.make_tiny_gguf(tmp_path / "tiny.gguf", hf_dir=hf_dir)
    written = tm.read_gguf_metadata(gguf_path)
    default = tm.read_gguf_metadata(tm.default_gguf_path())

    tokenizer_keys = {k for k in default if k.startswith("tokenizer.")}
    assert {"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.chat_template"} <= tokenizer_keys
    assert {k: written[k] for k in tokenizer_keys} == {k: default[k] for k in tokenizer_keys}
    values = {k: v[1] for k, v in written.items()}
    assert values["general.architecture"] == "llama"
    assert values["llama.block_count"] == 2
    assert values["llama.embedding_length"] == 72
    assert values["llama.feed_forward_length"] == 100
    assert values["llama.attention.head_count"] == 9
    assert values["llama.attention.head_count_kv"] == 3
    assert values["llama.rope.dimension_count"] == 8
    assert values["llama.rope.freq_base"] == tm.ROPE_THETA
    assert values["llama.context_length"] == tm.MAX_POSITIONS
    assert values["llama.vocab_size"] == tm.VOCAB


def test_qk_permutation_is_llama_cpps_and_transformers_undoes_it():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    n_head, n_kv, head_dim, hidden = 9, 3, 8, 72
    k = np.arange(n_kv * head_dim * hidden, dtype=np.float32).reshape(n_kv * head_dim, hidden)
    permuted = tm._permute_qk(k, n_head, n_kv)
    # within each head: rows 0..3 (first rotate-half) go to even rows, rows 4..7 to odd rows
    np.testing.assert_array_equal(permuted[0:8:2], k[0:4])
    np.testing.assert_array_equal(permuted[1:8:2], k[4:8])
    np.testing.assert_array_equal(permuted[8:16:2], k[8:12])
    undone = LlamaTensorProcessor()._reverse_permute_weights(permuted, n_head, n_kv)
    np.testing.assert_array_equal(undone, k)


def test_make_tiny_gguf_refuses_other_families(tmp_path):
    hf_dir = tm.make_tiny_hf(tmp_path / "hf", arch="qwen2")
    with pytest.raises(ValueError, match="qwen2"):
        tm.make_tiny_gguf(tmp_path / "tiny.gguf", hf_dir=hf_dir)


@pytest.mark.parametrize("arch", tm.ARCHS)
def test_every_family_builds_and_gives_finite_logits(tmp_path, arch):
    hf_dir = tm.make_tiny_hf(tmp_path / arch, arch=arch)
    assert (hf_dir / "tokenizer.json").is_file() and (hf_dir / "tokenizer_config.json").is_file()
    weights = load_file(hf_dir / "model.safetensors")
    assert "lm_head.weight" not in weights  # tied by default
    norm = weights["model.layers.0.input_layernorm.weight"]
    assert norm.std() > 0.05 and abs(float(norm.mean()) - 1.0) < 0.2
    biases = [name for name in weights if name.endswith(".bias")]
    if arch == "qwen2":
        assert sorted(b.rsplit(".", 2)[1] for b in biases if ".layers.0." in b) == ["k_proj", "q_proj", "v_proj"]
        assert all(weights[b].abs().min() > 0 for b in biases)
    else:
        assert biases == []

    model = tm.hf_model(hf_dir)
    assert model.config.model_type == arch and model.dtype == torch.float32
    logits = tm.hf_last_logits(model, IDS)
    assert logits.shape == (tm.VOCAB,) and np.isfinite(logits).all()
    assert logits.std() > 0.1  # random weights, not a degenerate model
    tokens = tm.hf_greedy(model, IDS, 4)
    assert len(tokens) == 4 and all(0 <= t < tm.VOCAB for t in tokens)


def test_seed_decides_the_weights(tmp_path):
    a = load_file(tm.make_tiny_hf(tmp_path / "a", arch="qwen2", seed=7, tie=False) / "model.safetensors")
    b = load_file(tm.make_tiny_hf(tmp_path / "b", arch="qwen2", seed=7, tie=False) / "model.safetensors")
    c = load_file(tm.make_tiny_hf(tmp_path / "c", arch="qwen2", seed=8, tie=False) / "model.safetensors")
    assert a.keys() == b.keys() == c.keys() and "lm_head.weight" in a
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(torch.equal(a[k], c[k]) for k in a)


def test_bfloat16_holds_the_rounded_float32_weights(tmp_path):
    full = load_file(tm.make_tiny_hf(tmp_path / "f32", seed=5) / "model.safetensors")
    half_dir = tm.make_tiny_hf(tmp_path / "bf16", seed=5, dtype=torch.bfloat16)
    half = load_file(half_dir / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in half.values())
    assert all(torch.equal(half[k], full[k].to(torch.bfloat16)) for k in full)
    assert '"dtype": "bfloat16"' in (half_dir / "config.json").read_text()


def test_tiny_dir_tokenizer_is_the_default_models(tmp_path):
    hf_dir = tm.make_tiny_hf(tmp_path / "hf")
    ours, default = tm.hf_tokenizer(hf_dir), tm.hf_tokenizer(tm.default_gguf_path())
    messages = [{"role": "user", "content": "What is the capital of France? Ünïcode, tabs\tand  spaces."}]
    rendered = default.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert ours.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == rendered
    assert ours(rendered).input_ids == default(rendered).input_ids
    assert ours.eos_token_id == default.eos_token_id == tm.EOS_ID


@pytest.mark.slow
def test_default_model_knows_the_capital_of_france(default_hf):
    path = tm.default_gguf_path()
    tokenizer, model = tm.hf_tokenizer(path), default_hf
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt).input_ids
    tokens = tm.hf_greedy(model, ids, 12)
    assert len(tokens) == 12
    assert "Paris" in tokenizer.decode(tokens)


@pytest.mark.parametrize("style", ["rope_parameters", "rope_scaling"])
def test_rope_scaling_is_written_as_transformers_and_llama_cpp_write_it(tmp_path, style):
    import json

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}
    hf_dir = tm.make_tiny_hf(tmp_path / "hf", rope=rope, rope_style=style, hidden=64, n_heads=4, n_kv_heads=2)
    cfg = json.loads((hf_dir / "config.json").read_text())
    if style == "rope_scaling":  # Llama 3.1's own config.json: theta beside the scaling entry
        assert "rope_parameters" not in cfg and cfg["rope_theta"] == tm.ROPE_THETA
        assert cfg["rope_scaling"] == rope
    else:
        assert cfg["rope_parameters"] == {**rope, "rope_theta": tm.ROPE_THETA}
    from transformers import AutoConfig

    loaded = AutoConfig.from_pretrained(hf_dir).rope_parameters
    assert {k: loaded[k] for k in rope} == rope
    gguf_path = tm.make_tiny_gguf(tmp_path / "t.gguf", hf_dir=hf_dir, tokenizer=False)
    meta = tm.read_gguf_metadata(gguf_path)
    assert not any(k.startswith("tokenizer.") for k in meta)
    assert not any(k.startswith("llama.rope.scaling") for k in meta)  # llama3 goes in a tensor, not keys
    import gguf

    factors = {t.name: t for t in gguf.GGUFReader(gguf_path).tensors}["rope_freqs.weight"].data
    np.testing.assert_array_equal(factors, tm.llama3_rope_freqs(rope, tm.ROPE_THETA, 16))
    assert factors[0] == 1.0 and factors[-1] == 8.0
