"""Model configuration: one frozen dataclass built from a GGUF header, a Hugging Face config or a manifest."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import ModelError

ARCHS = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class RopeScaling:
    """Frequency scaling of rotary embeddings ("linear" or Llama 3.1's "llama3")."""

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and constants of a decoder-only transformer of the Llama family."""

    arch: str
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    rope_theta: float
    norm_eps: float
    max_context: int
    tied_embeddings: bool
    attn_bias: bool = False
    rope_scaling: RopeScaling | None = None

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ModelError(f"architecture {self.arch!r} is not supported (supported: {', '.join(ARCHS)})")
        for name in ("n_layers", "hidden", "n_heads", "n_kv_heads", "head_dim", "ffn", "vocab"):
            if getattr(self, name) <= 0:
                raise ModelError(f"model config has {name} = {getattr(self, name)}; it must be positive")
        if self.n_heads % self.n_kv_heads:
            raise ModelError(f"{self.n_heads} attention heads are not a multiple of {self.n_kv_heads} KV heads")
        if self.head_dim % 2:
            raise ModelError(f"head_dim {self.head_dim} is odd; rotary embeddings need it even")

    @property
    def group(self) -> int:
        """Query heads that share one KV head."""
        return self.n_heads // self.n_kv_heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        try:
            d = dict(d)
            rs = d.pop("rope_scaling", None)
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = set(d) - known
            if unknown:
                raise ModelError(f"unknown model config keys: {sorted(unknown)}")
            return cls(**d, rope_scaling=RopeScaling(**rs) if rs else None)
        except TypeError as e:
            raise ModelError(f"model config is malformed: {e}") from None


def rope_scaling_from_hf(rs: dict | None) -> RopeScaling | None:
    """Translate a Hugging Face `rope_scaling` entry; refuse kinds this runtime does not implement."""
    if not rs:
        return None
    kind = rs.get("rope_type", rs.get("type"))
    if kind in (None, "default"):
        return None
    if kind == "linear":
        return RopeScaling("linear", float(rs["factor"]))
    if kind == "llama3":
        return RopeScaling(
            "llama3",
            float(rs["factor"]),
            float(rs.get("low_freq_factor", 1.0)),
            float(rs.get("high_freq_factor", 4.0)),
            int(rs.get("original_max_position_embeddings", 8192)),
        )
    raise ModelError(f"rope scaling {kind!r} is not supported (supported: linear, llama3)")
