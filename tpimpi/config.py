"""Model configuration: one frozen dataclass built from a GGUF header, a Hugging Face config or a manifest."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .errors import ModelError

ARCHS = ("llama", "mistral", "qwen2")


def _plain(v):
    """A numpy scalar as the Python number it holds; anything else unchanged."""
    return v.item() if hasattr(v, "item") and not isinstance(v, (int, float)) else v


ROPE_KINDS = ("linear", "llama3", "yarn", "dynamic", "factors")


@dataclass(frozen=True)
class RopeScaling:
    """How rotary frequencies are scaled, with the meaning transformers' rope init functions give them.

    linear: every inverse frequency / factor. llama3 (Llama 3.1/3.2): low frequencies / factor, high ones
    kept, a blend in between (low/high_freq_factor, original_max_position). yarn: NTK-by-parts blend
    between / factor and unscaled (beta_fast, beta_slow, truncate) and cos/sin times attention_factor
    (0 = 0.1 ln(factor) + 1). dynamic (NTK): the base grows only past max_position_embeddings, which is
    the model's context, so within the context tpimpi runs the frequencies are the default ones.
    factors: inverse frequencies / freq_factors, as a GGUF's rope_freqs tensor gives them."""

    kind: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float = 0.0  # yarn only; 0: derived from factor
    truncate: bool = True
    freq_factors: tuple[float, ...] = ()  # [head_dim/2], kind "factors" only

    def __post_init__(self) -> None:
        if self.kind not in ROPE_KINDS:
            raise ModelError(f"rope scaling {self.kind!r} is not supported (supported: {', '.join(ROPE_KINDS)})")
        if not (math.isfinite(self.factor) and self.factor > 0):
            raise ModelError(f"rope scaling factor {self.factor} must be a positive number")
        if self.kind == "llama3" and not self.high_freq_factor > self.low_freq_factor > 0:
            raise ModelError(f"llama3 rope scaling needs high_freq_factor > low_freq_factor > 0, got "
                             f"{self.high_freq_factor} and {self.low_freq_factor}")
        factors = tuple(self.freq_factors)
        if (self.kind == "factors") != bool(factors):
            raise ModelError("rope frequency factors go with rope scaling kind 'factors' only")
        if not all(isinstance(f, (int, float)) and not isinstance(f, bool) and math.isfinite(f) and f > 0
                   for f in map(_plain, factors)):
            raise ModelError("rope frequency factors must all be positive numbers")
        object.__setattr__(self, "freq_factors", tuple(float(f) for f in factors))


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
    sliding_window: int = 0  # 0: none; else a query sees the last sliding_window positions (itself included)
    sliding_from: int = 0  # the first layer that uses the window (Qwen2's max_window_layers)

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
        rs = self.rope_scaling
        if rs is not None and rs.kind == "factors" and len(rs.freq_factors) != self.head_dim // 2:
            raise ModelError(f"{len(rs.freq_factors)} rope frequency factors for head_dim {self.head_dim}; "
                             f"there must be head_dim/2 = {self.head_dim // 2}")
        if self.sliding_window < 0 or not 0 <= self.sliding_from <= self.n_layers:
            raise ModelError(f"sliding window {self.sliding_window} from layer {self.sliding_from} is invalid "
                             f"for {self.n_layers} layers")

    def window(self, layer: int) -> int:
        """Positions a query of `layer` sees (itself included); 0 for all before it."""
        return self.sliding_window if layer >= self.sliding_from else 0

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
        except (TypeError, ValueError) as e:
            raise ModelError(f"model config is malformed: {e}") from None


# keys of a Hugging Face rope_scaling / rope_parameters entry, per kind (transformers' validators)
_HF_ROPE_KEYS = {
    "default": set(),
    "linear": {"factor"},
    "dynamic": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
    "yarn": {"factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
             "mscale", "mscale_all_dim", "truncate"},
}
_HF_ROPE_COMMON = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}


def rope_scaling_from_hf(rs: dict | None, max_position: int, original_max_position: int | None = None
                         ) -> RopeScaling | None:
    """Translate a Hugging Face `rope_scaling` or `rope_parameters` entry; refuse kinds and keys this
    runtime does not implement, by name. `original_max_position` is a top-level
    original_max_position_embeddings, which transformers prefers over the entry's own."""
    if not rs:
        return None
    if not isinstance(rs, dict):
        raise ModelError(f"rope scaling {rs!r} is not an object")
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind not in _HF_ROPE_KEYS:
        raise ModelError(f"rope scaling {kind!r} is not supported (supported: {', '.join(_HF_ROPE_KEYS)})")
    unknown = set(rs) - _HF_ROPE_KEYS[kind] - _HF_ROPE_COMMON
    if unknown:
        raise ModelError(f"rope scaling {kind!r} has keys tpimpi does not understand: {sorted(unknown)}")
    if float(rs.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ModelError(f"partial rotary embeddings (partial_rotary_factor {rs['partial_rotary_factor']}) "
                         f"are not supported")
    if kind == "default":
        return None
    if rs.get("factor") is None:
        raise ModelError(f"rope scaling {kind!r} lacks its factor")
    factor = float(rs["factor"])
    orig = int(original_max_position or rs.get("original_max_position_embeddings") or max_position)
    if kind in ("linear", "dynamic"):
        return RopeScaling(kind, factor)
    if kind == "llama3":
        return RopeScaling("llama3", factor, float(rs["low_freq_factor"]), float(rs["high_freq_factor"]), orig)
    att = rs.get("attention_factor")
    if att is None:  # transformers: from mscale and mscale_all_dim when both are set, else from factor
        m, m_all = rs.get("mscale"), rs.get("mscale_all_dim")
        att = yarn_mscale(factor, m) / yarn_mscale(factor, m_all) if m and m_all else yarn_mscale(factor)
    return RopeScaling("yarn", factor, original_max_position=orig, beta_fast=float(rs.get("beta_fast") or 32),
                       beta_slow=float(rs.get("beta_slow") or 1), attention_factor=float(att),
                       truncate=bool(rs.get("truncate", True)))


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 0.1 * mscale * ln(factor) + 1 (1 for factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def scaled_context(max_position: int, rs: RopeScaling | None) -> int:
    """The context a model runs: max_position_embeddings, or for YaRN factor x the original context when
    that is longer (Qwen2.5's checkpoints keep 32768 beside a yarn entry of factor 4, meant for 131072)."""
    if rs is not None and rs.kind == "yarn":
        return max(max_position, int(rs.factor * rs.original_max_position))
    return max_position
