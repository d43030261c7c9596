"""Model sources the converter reads: a GGUF file or a Hugging Face directory (config.json + safetensors).

Both yield tensors in Hugging Face's layout ([out_features, in_features]), one layer at a time, so the
converter never holds the whole model twice: float32 numpy arrays, or for GGUF's Q8_0, Q4_0 and Q4_1
tensors the file's own blocks as a QTensor (tpimpi/quant/formats.py), never dequantized here.
`tensor_type(key, layer)` tells the converter each tensor's stored type, for --dtype auto.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .config import ModelConfig, RopeScaling, rope_scaling_from_hf, scaled_context, yarn_mscale
from .errors import ModelError
from .quant import formats as qf

# Per-layer tensor keys, in Hugging Face's names under model.layers.N.
LAYER_KEYS = {
    "attn_norm": "input_layernorm.weight",
    "q": "self_attn.q_proj.weight",
    "k": "self_attn.k_proj.weight",
    "v": "self_attn.v_proj.weight",
    "o": "self_attn.o_proj.weight",
    "bq": "self_attn.q_proj.bias",
    "bk": "self_attn.k_proj.bias",
    "bv": "self_attn.v_proj.bias",
    "ffn_norm": "post_attention_layernorm.weight",
    "gate": "mlp.gate_proj.weight",
    "up": "mlp.up_proj.weight",
    "down": "mlp.down_proj.weight",
}
GGUF_LAYER_KEYS = {
    "attn_norm": "attn_norm.weight",
    "q": "attn_q.weight",
    "k": "attn_k.weight",
    "v": "attn_v.weight",
    "o": "attn_output.weight",
    "bq": "attn_q.bias",
    "bk": "attn_k.bias",
    "bv": "attn_v.bias",
    "ffn_norm": "ffn_norm.weight",
    "gate": "ffn_gate.weight",
    "up": "ffn_up.weight",
    "down": "ffn_down.weight",
}
BIAS_KEYS = ("bq", "bk", "bv")
# {arch}.* metadata keys of a GGUF file that tpimpi reads (or that change nothing it computes); any other
# is refused, so that no setting of the file is silently dropped
GGUF_ARCH_KEYS = {
    "block_count", "context_length", "embedding_length", "feed_forward_length", "vocab_size",
    "attention.head_count", "attention.head_count_kv", "attention.layer_norm_rms_epsilon",
    "attention.key_length", "attention.value_length", "attention.sliding_window",
    "rope.dimension_count", "rope.freq_base", "rope.scaling.type", "rope.scaling.factor",
    "rope.scaling.original_context_length", "rope.scaling.attn_factor", "rope.scaling.yarn_beta_fast",
    "rope.scaling.yarn_beta_slow",
    "rope.scaling.finetuned",  # informational: whether the model was fine-tuned at the scaled length
}
GGUF_ZERO_KEYS = {"expert_count", "expert_used_count"}  # some converters write them as 0 for dense models


def open_source(path: str | os.PathLike):
    """A GGUFSource or HFSource for `path`, chosen by what is there."""
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        return GGUFSource(p)
    if p.is_dir() and (p / "config.json").is_file():
        return HFSource(p)
    if not p.exists():
        raise ModelError(f"model path {str(p)!r} does not exist")
    raise ModelError(f"{str(p)!r} is neither a .gguf file nor a directory with config.json")


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of Q/K rows (pairs interleaved per head) back to Hugging Face's halves."""
    out_dim = w.shape[0]
    # [heads, head_dim/2, 2, in] -> [heads, 2, head_dim/2, in]
    return w.reshape(n_heads, out_dim // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFSource:
    """A llama-architecture GGUF file; tensors are dequantized on demand with the `gguf` package."""

    def __init__(self, path: Path):
        import gguf

        self.path = Path(path)
        try:
            self.reader = gguf.GGUFReader(str(self.path))
        except (OSError, ValueError, KeyError, IndexError) as e:
            raise ModelError(f"cannot read GGUF file {str(self.path)!r}: {e}") from None
        self.tensors = {t.name: t for t in self.reader.tensors}
        self._used: set[str] = set()
        self.config = self._config()

    def _field(self, key: str, default=None):
        f = self.reader.fields.get(key)
        if f is None:
            if default is None:
                raise ModelError(f"GGUF file {str(self.path)!r} lacks metadata key {key!r}")
            return default
        return f.contents()

    def _config(self) -> ModelConfig:
        arch = self._field("general.architecture")
        if arch not in ("llama", "qwen2"):
            raise ModelError(f"GGUF architecture {arch!r} is not supported (supported: llama, qwen2)")
        unknown = sorted(k for k in self.reader.fields if k.startswith(f"{arch}.") and
                         k[len(arch) + 1 :] not in GGUF_ARCH_KEYS and
                         not (k[len(arch) + 1 :] in GGUF_ZERO_KEYS and self._field(k) == 0))
        if unknown:
            raise ModelError(f"GGUF file {str(self.path)!r} has settings tpimpi does not implement: {unknown}")
        n_heads = int(self._field(f"{arch}.attention.head_count"))
        hidden = int(self._field(f"{arch}.embedding_length"))
        head_dim = int(self._field(f"{arch}.attention.key_length", hidden // n_heads))
        for key in ("attention.value_length", "rope.dimension_count"):
            if int(self._field(f"{arch}.{key}", head_dim)) != head_dim:
                raise ModelError(f"GGUF file {str(self.path)!r}: {arch}.{key} = {self._field(f'{arch}.{key}')} "
                                 f"differs from head_dim {head_dim}; partial rotary embeddings and unequal key and "
                                 f"value sizes are not supported")
        window = int(self._field(f"{arch}.attention.sliding_window", 0))
        if window and arch != "llama":
            raise ModelError(f"GGUF file {str(self.path)!r}: a sliding window on {arch} is not supported")
        vocab = int(self.tensors["token_embd.weight"].shape[-1])
        rope = self._rope_scaling(arch, head_dim)
        return ModelConfig(
            arch=arch,
            n_layers=int(self._field(f"{arch}.block_count")),
            hidden=hidden,
            n_heads=n_heads,
            n_kv_heads=int(self._field(f"{arch}.attention.head_count_kv", n_heads)),
            head_dim=head_dim,
            ffn=int(self._field(f"{arch}.feed_forward_length")),
            vocab=vocab,
            rope_theta=float(self._field(f"{arch}.rope.freq_base", 10000.0)),
            norm_eps=float(self._field(f"{arch}.attention.layer_norm_rms_epsilon")),
            max_context=scaled_context(int(self._field(f"{arch}.context_length")), rope),
            tied_embeddings="output.weight" not in self.tensors,
            attn_bias="blk.0.attn_q.bias" in self.tensors,
            rope_scaling=rope,
            sliding_window=window,
        )

    def _rope_scaling(self, arch: str, head_dim: int) -> RopeScaling | None:
        """From {arch}.rope.scaling.* and the rope_freqs tensor (Llama 3.1/3.2: llama3 scaling, written by
        llama.cpp's converter as per-frequency divisors), with llama.cpp's meaning of each key."""
        kind = self._field(f"{arch}.rope.scaling.type", "none")
        factor = float(self._field(f"{arch}.rope.scaling.factor", 1.0))
        if "rope_freqs.weight" in self.tensors:
            if kind != "none" and not (kind == "linear" and factor == 1.0):
                raise ModelError(f"GGUF file {str(self.path)!r}: rope scaling {kind!r} together with a rope_freqs "
                                 f"tensor is not supported")
            factors = self._tensor("rope_freqs.weight").reshape(-1)
            if factors.size != head_dim // 2:
                raise ModelError(f"GGUF file {str(self.path)!r}: rope_freqs has {factors.size} values, "
                                 f"head_dim {head_dim} needs {head_dim // 2}")
            return RopeScaling("factors", freq_factors=tuple(factors.tolist()))
        if kind == "none" or (kind == "linear" and factor == 1.0):
            return None
        if kind == "linear":
            return RopeScaling("linear", factor)
        if kind == "yarn":
            # llama.cpp multiplies YaRN's 0.1 ln(factor) + 1 by attn_factor (default 1)
            att = float(self._field(f"{arch}.rope.scaling.attn_factor", 1.0)) * yarn_mscale(factor)
            orig = int(self._field(f"{arch}.rope.scaling.original_context_length", 0)) or None
            if orig is None:
                raise ModelError(f"GGUF file {str(self.path)!r}: yarn rope scaling lacks "
                                 f"{arch}.rope.scaling.original_context_length")
            return RopeScaling("yarn", factor, original_max_position=orig,
                               beta_fast=float(self._field(f"{arch}.rope.scaling.yarn_beta_fast", 32.0)),
                               beta_slow=float(self._field(f"{arch}.rope.scaling.yarn_beta_slow", 1.0)),
                               attention_factor=att)
        raise ModelError(f"GGUF file {str(self.path)!r}: rope scaling {kind!r} is not supported "
                         f"(supported: none, linear, yarn, and llama3's rope_freqs)")

    def _tensor(self, name: str):
        """A tensor as float32 [out, in] (or [n]), or a QTensor of the file's own blocks for Q8_0/Q4_0/Q4_1."""
        from gguf.quants import dequantize

        t = self.tensors.get(name)
        if t is None:
            raise ModelError(f"GGUF file {str(self.path)!r} lacks tensor {name!r}")
        self._used.add(name)
        # GGUF lists dims fastest-first; numpy's view is [rows, cols] = Hugging Face's [out, in].
        shape = tuple(int(d) for d in reversed(t.shape))
        kind = t.tensor_type.name
        if qf.KEPT.get(kind) in qf.QUANTS and len(shape) == 2:
            return qf.QTensor(qf.KEPT[kind], np.array(t.data).reshape(shape[0], -1), shape)
        try:
            a = dequantize(t.data, t.tensor_type)
        except (NotImplementedError, ValueError, KeyError):
            raise ModelError(qf.unsupported_message(kind, name, str(self.path))) from None
        return np.ascontiguousarray(a.reshape(shape), dtype=np.float32)

    def tensor_type(self, key: str, layer: int | None = None) -> tuple[str, str]:
        """(GGUF tensor name, its type name) of a layer key ("q", "down", ...) or of "embed"/"head"."""
        name = {"embed": "token_embd.weight", "head": "output.weight"}.get(key) if layer is None \
            else f"blk.{layer}.{GGUF_LAYER_KEYS[key]}"
        return name, self.tensors[name].tensor_type.name

    def layer(self, i: int) -> dict:
        cfg = self.config
        keys = [k for k in GGUF_LAYER_KEYS if cfg.attn_bias or k not in BIAS_KEYS]
        out = {k: self._tensor(f"blk.{i}.{GGUF_LAYER_KEYS[k]}") for k in keys}
        if cfg.arch == "llama":  # llama.cpp permutes llama's Q/K rows (whole rows: quantized ones too)
            for key, n in (("q", cfg.n_heads), ("k", cfg.n_kv_heads)):
                t = out[key]
                out[key] = t.permute_rows(lambda d: unpermute_qk(d, n)) if isinstance(t, qf.QTensor) \
                    else unpermute_qk(t, n)
        return out

    def embed(self) -> np.ndarray:
        return self._tensor("token_embd.weight")

    def final_norm(self) -> np.ndarray:
        return self._tensor("output_norm.weight")

    def head(self) -> np.ndarray | None:
        return None if self.config.tied_embeddings else self._tensor("output.weight")

    def unused(self) -> list[str]:
        """Tensors of the file the conversion did not take (should be none)."""
        return sorted(set(self.tensors) - self._used)

    def tokenizer_files(self) -> dict[str, str]:
        from .tokenizer import tokenizer_files_from_gguf

        return tokenizer_files_from_gguf(self.path)

    def identity(self) -> dict:
        st = self.path.stat()
        return {"path": str(self.path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


class HFSource:
    """A Hugging Face model directory of the Llama, Mistral or Qwen2 family, read tensor by tensor."""

    ARCH_OF = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            hf = json.loads((self.path / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot read {str(self.path / 'config.json')!r}: {e}") from None
        self.config = self._config(hf)
        self._index = self._weight_index()
        self._used: set[str] = set()
        self._handles: dict[str, object] = {}

    def _config(self, hf: dict) -> ModelConfig:
        archs = hf.get("architectures") or []
        arch = next((self.ARCH_OF[a] for a in archs if a in self.ARCH_OF), None)
        if arch is None:
            raise ModelError(f"{str(self.path)!r}: architectures {archs} not supported "
                             f"(supported: {', '.join(self.ARCH_OF)})")
        try:
            n_heads = int(hf["num_attention_heads"])
            hidden = int(hf["hidden_size"])
            self._refuse_unsupported(hf, arch)
            window, sliding_from = self._sliding_window(hf, arch)
            rope = {k: v for e in (hf.get("rope_scaling"), hf.get("rope_parameters")) if isinstance(e, dict)
                    for k, v in e.items()}  # rope_theta inside an entry wins over the top-level one
            rope_scaling = self._rope_scaling(hf)
            return ModelConfig(
                arch=arch,
                n_layers=int(hf["num_hidden_layers"]),
                hidden=hidden,
                n_heads=n_heads,
                n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
                head_dim=int(hf.get("head_dim") or hidden // n_heads),
                ffn=int(hf["intermediate_size"]),
                vocab=int(hf["vocab_size"]),
                rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
                norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                max_context=scaled_context(int(hf.get("max_position_embeddings", 4096)), rope_scaling),
                tied_embeddings=bool(hf.get("tie_word_embeddings", False)),
                attn_bias=arch == "qwen2" or bool(hf.get("attention_bias", False)),
                rope_scaling=rope_scaling,
                sliding_window=window,
                sliding_from=sliding_from,
            )
        except KeyError as e:
            raise ModelError(f"{str(self.path / 'config.json')!r} lacks {e.args[0]!r}") from None
        except ModelError as e:
            raise ModelError(f"{str(self.path / 'config.json')!r}: {e}") from None

    @staticmethod
    def _rope_scaling(hf: dict):
        """transformers 4 writes `rope_scaling` (theta beside it), transformers 5 `rope_parameters` (theta
        inside); either may carry the scaling. When both are there they must agree."""
        old, new = hf.get("rope_scaling"), hf.get("rope_parameters")
        mpe, orig = int(hf.get("max_position_embeddings", 4096)), hf.get("original_max_position_embeddings")
        a, b = rope_scaling_from_hf(old, mpe, orig), rope_scaling_from_hf(new, mpe, orig)
        if old and new and a != b:
            raise ModelError(f"rope_scaling {old} and rope_parameters {new} disagree")
        return a or b

    @staticmethod
    def _refuse_unsupported(hf: dict, arch: str) -> None:
        """Settings that would change what the model computes and that tpimpi does not implement."""
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ModelError(f"hidden_act {act!r} is not supported (only silu)")
        if hf.get("mlp_bias"):
            raise ModelError("mlp_bias is not supported")
        if float(hf.get("partial_rotary_factor") or 1.0) != 1.0:
            raise ModelError(f"partial_rotary_factor {hf['partial_rotary_factor']} is not supported")
        if hf.get("quantization_config"):
            raise ModelError("quantized checkpoints (quantization_config) are not supported; use the "
                             "unquantized weights or a GGUF file")

    @staticmethod
    def _sliding_window(hf: dict, arch: str) -> tuple[int, int]:
        """(window, first layer with it): Mistral's on every layer; Qwen2's, when use_sliding_window, on
        layers from max_window_layers on (transformers' layer_types, which a saved config may list)."""
        n = int(hf["num_hidden_layers"])
        window = int(hf.get("sliding_window", 4096) or 0)  # transformers' default when the key is absent
        if arch == "llama" or (arch == "qwen2" and not hf.get("use_sliding_window")):
            window = 0
        first = int(hf.get("max_window_layers", 28)) if arch == "qwen2" else 0
        first = min(first, n) if window else 0
        types = hf.get("layer_types")
        if types is not None:
            if len(types) != n or set(types) - {"full_attention", "sliding_attention"}:
                raise ModelError(f"layer_types {types} is not one of full_attention/sliding_attention per layer")
            if window and "full_attention" in types:
                first = max(i for i, t in enumerate(types) if t == "full_attention") + 1
            want = ["full_attention"] * first + ["sliding_attention" if window else "full_attention"] * (n - first)
            if types != want:
                raise ModelError(f"layer_types {types} (sliding window {window or None}) is not supported: the "
                                 f"sliding layers must be the last ones")
        return window, first

    def _weight_index(self) -> dict[str, str]:
        from safetensors import safe_open

        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise ModelError(f"{str(self.path)!r} has no *.safetensors weight files")
        index = {}
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    index[k] = str(f)
        return index

    def _tensor(self, name: str) -> np.ndarray:
        from safetensors import safe_open

        f = self._index.get(name)
        if f is None:
            raise ModelError(f"{str(self.path)!r} lacks tensor {name!r}")
        self._used.add(name)
        with safe_open(f, framework="pt") as h:
            return h.get_tensor(name).float().numpy()

    def tensor_type(self, key: str, layer: int | None = None) -> tuple[str, str]:
        """(tensor name, its safetensors dtype: F32, BF16 or F16) of a layer key or of "embed"/"head"."""
        from safetensors import safe_open

        name = {"embed": "model.embed_tokens.weight", "head": "lm_head.weight"}.get(key) if layer is None \
            else f"model.layers.{layer}.{LAYER_KEYS[key]}"
        with safe_open(self._index[name], framework="np") as h:
            kind = h.get_slice(name).get_dtype()
        return name, kind

    def layer(self, i: int) -> dict[str, np.ndarray]:
        keys = [k for k in LAYER_KEYS if self.config.attn_bias or k not in BIAS_KEYS]
        return {k: self._tensor(f"model.layers.{i}.{LAYER_KEYS[k]}") for k in keys}

    def embed(self) -> np.ndarray:
        return self._tensor("model.embed_tokens.weight")

    def final_norm(self) -> np.ndarray:
        return self._tensor("model.norm.weight")

    def head(self) -> np.ndarray | None:
        if self.config.tied_embeddings:
            self._used.add("lm_head.weight")  # some checkpoints store the tied copy too
            return None
        return self._tensor("lm_head.weight")

    def unused(self) -> list[str]:
        """Tensors of the checkpoint the conversion did not take (should be none). Rotary inverse
        frequencies that older checkpoints store are checked against the ones tpimpi computes."""
        from .layers import inv_frequencies

        left = sorted(set(self._index) - self._used)
        ours = inv_frequencies(self.config).numpy()
        for k in [k for k in left if k.endswith("rotary_emb.inv_freq")]:
            theirs = self._tensor(k).reshape(-1)
            if theirs.shape != ours.shape or not np.allclose(theirs, ours, rtol=1e-5, atol=0):
                raise ModelError(f"{str(self.path)!r}: {k} differs from the rotary frequencies config.json gives")
            left.remove(k)
        return left

    def tokenizer_files(self) -> dict[str, str]:
        from .tokenizer import tokenizer_files_from_hf_dir

        return tokenizer_files_from_hf_dir(self.path)

    def identity(self) -> dict:
        files = sorted(self._index.values())
        return {"path": str(self.path.resolve()),
                "bytes": sum(os.path.getsize(f) for f in set(files)),
                "mtime_ns": max(os.stat(f).st_mtime_ns for f in set(files))}
