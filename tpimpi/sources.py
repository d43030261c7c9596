"""Model sources the converter reads: a GGUF file or a Hugging Face directory (config.json + safetensors).

Both yield float32 numpy arrays in Hugging Face's layout ([out_features, in_features]), one layer at a
time, so the converter never holds the whole model twice.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .config import ModelConfig, rope_scaling_from_hf
from .errors import ModelError

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
        self.config = self._config()
        self._used: set[str] = set()

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
        n_heads = int(self._field(f"{arch}.attention.head_count"))
        hidden = int(self._field(f"{arch}.embedding_length"))
        head_dim = int(self._field(f"{arch}.attention.key_length", hidden // n_heads))
        vocab = int(self.tensors["token_embd.weight"].shape[-1])
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
            max_context=int(self._field(f"{arch}.context_length")),
            tied_embeddings="output.weight" not in self.tensors,
            attn_bias="blk.0.attn_q.bias" in self.tensors,
        )

    def _tensor(self, name: str) -> np.ndarray:
        from gguf.quants import dequantize

        t = self.tensors.get(name)
        if t is None:
            raise ModelError(f"GGUF file {str(self.path)!r} lacks tensor {name!r}")
        self._used.add(name)
        a = dequantize(t.data, t.tensor_type)
        # GGUF lists dims fastest-first; numpy's view is [rows, cols] = Hugging Face's [out, in].
        return np.ascontiguousarray(a.reshape(tuple(int(d) for d in reversed(t.shape))), dtype=np.float32)

    def layer(self, i: int) -> dict[str, np.ndarray]:
        cfg = self.config
        keys = [k for k in GGUF_LAYER_KEYS if cfg.attn_bias or k not in BIAS_KEYS]
        out = {k: self._tensor(f"blk.{i}.{GGUF_LAYER_KEYS[k]}") for k in keys}
        if cfg.arch == "llama":  # llama.cpp permutes llama's Q/K rows; qwen2's are stored as in HF
            out["q"] = unpermute_qk(out["q"], cfg.n_heads)
            out["k"] = unpermute_qk(out["k"], cfg.n_kv_heads)
        return out

    def embed(self) -> np.ndarray:
        return self._tensor("token_embd.weight")

    def final_norm(self) -> np.ndarray:
        return self._tensor("output_norm.weight")

    def head(self) -> np.ndarray | None:
        return None if self.config.tied_embeddings else self._tensor("output.weight")

    def unused(self) -> list[str]:
        """Tensors of the file the conversion did not take (should be none)."""
        return sorted(set(self.tensors) - self._used - {"rope_freqs.weight"})

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
            return ModelConfig(
                arch=arch,
                n_layers=int(hf["num_hidden_layers"]),
                hidden=hidden,
                n_heads=n_heads,
                n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
                head_dim=int(hf.get("head_dim") or hidden // n_heads),
                ffn=int(hf["intermediate_size"]),
                vocab=int(hf["vocab_size"]),
                rope_theta=float(hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0))),
                norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                max_context=int(hf.get("max_position_embeddings", 4096)),
                tied_embeddings=bool(hf.get("tie_word_embeddings", False)),
                attn_bias=arch == "qwen2" or bool(hf.get("attention_bias", False)),
                rope_scaling=rope_scaling_from_hf(hf.get("rope_scaling")),
            )
        except KeyError as e:
            raise ModelError(f"{str(self.path / 'config.json')!r} lacks {e.args[0]!r}") from None

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
        return sorted(k for k in set(self._index) - self._used if not k.endswith("rotary_emb.inv_freq"))

    def tokenizer_files(self) -> dict[str, str]:
        from .tokenizer import tokenizer_files_from_hf_dir

        return tokenizer_files_from_hf_dir(self.path)

    def identity(self) -> dict:
        files = sorted(self._index.values())
        return {"path": str(self.path.resolve()),
                "bytes": sum(os.path.getsize(f) for f in set(files)),
                "mtime_ns": max(os.stat(f).st_mtime_ns for f in set(files))}
