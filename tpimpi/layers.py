"""The math of one rank's share of a layer: RMSNorm, rotary embeddings, an attention slice, an MLP slice.

Plain functions on torch tensors. Each writes the rank's partial sum of the layer output into `out`;
the caller adds the partials of all ranks (the allreduce) and the residual.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from . import native
from .config import ModelConfig, yarn_mscale
from .quant import kernels


def linear(x: torch.Tensor, w, b: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, in] @ w[out, in].T (+ b) -> [T, out] float32 (into out if given): in float32, or in the
    weights' dtype (bfloat16) with a float32 result. The one place a product picks its kernel by the
    weight's format (the layers and the output head both come here).

    Resident float32 matrices held in column panels go to the compiled kernel (tpimpi.native), other
    float32 products to `matmul_f32`. A `Packed` weight (quantized, or bf16/f16 computed in float32)
    goes through the sliced kernel of tpimpi.quant, which never holds more than a slice in float32; an
    `Int4Packed` one (resident q4/q8 under --compute bfloat16) through torch's int4 kernel."""
    if isinstance(w, (kernels.Packed, kernels.Int4Packed)):
        y = kernels.matmul(x, w, out=out)
    elif isinstance(w, native.Panels):  # a resident float32 matrix, when the compiled kernel is here
        y = native.matmul(x, w, out=out)
    elif w.dtype == torch.float32 and x.dtype == torch.float32:
        y = matmul_f32(x, w, out=out)
    else:
        y = F.linear(x.to(w.dtype), w, b).float()
        return y if out is None else out.copy_(y)
    return y if b is None else y.add_(b)


TORCH_ROWS = range(2, 8)  # row counts T for which torch's matmul beats numpy's on [out, in] weights (BENCHMARKS.md)


def matmul_f32(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, in] @ w[out, in].T in float32 -> [T, out] (into out if given), by the kernel measured fastest
    for the weight's memory layout and T, on one thread (BENCHMARKS.md, "Float32 products of a few rows").

    w held as [in, out] (a resident block, scheduler.transpose_in_place): numpy's BLAS for every T, a
    plain product of row-major matrices, which OpenBLAS multiplies without repacking the weights. One sweep
    over the default model's 30 layers took 41.9 / 87.1 / 75.5 / 93.3 / 136.4 ms for T = 1 / 2 / 4 / 8 /
    16 where the [out, in] kernels below took 54.7 / 117.0 / 121.7 / 123.8 / 190.7 (AMD EPYC, AVX2, one
    thread; two threads: 30.8 / 68.1 / 72.2 / 50.6 / 68.6 against 34.6 / 96.6 / 101.4 / 71.4 / 88.9;
    `python -m tpimpi.quant.bench --sweep`). Padding the rows to a multiple of 4, OpenBLAS's
    unroll, gained nothing consistent in interleaved rounds.

    w held as [out, in] (a streamed block, a view of its read buffer), measured on an Intel Xeon under
    load as thread CPU time for the default model's qkv, gate+up and down:
      T = 1     numpy's BLAS, x @ W.T: OpenBLAS's matrix-vector kernel (0.076 / 0.291 / 0.152 ms) beat
                torch.mm (0.109 / 0.330 / 0.190); decode is nothing but streaming the weights
      T = 2..7  torch.mm: at T = 2 about its own T = 1 time (0.111 / 0.331 / 0.177) where numpy's x @ W.T
                (OpenBLAS's small-M gemm) took 3.5-4.4x its T = 1 time and W @ x.T 1.9-2.5x; even at T = 4
      T >= 8    numpy's BLAS as W @ x.T: at T = 8 0.224 / 0.847 / 0.340 against x @ W.T's 0.368 / 1.299 /
                0.608 and torch's 0.223 / 0.981 / 0.433
    The choice depends on the layout and T alone, so the same rows give the same bits through forward and
    forward_batch."""
    T = x.shape[0]
    transposed = w.stride(1) != 1
    if T in TORCH_ROWS and not transposed:
        return torch.mm(x, w.T, out=out)
    xn, wn = x.numpy(), w.numpy()
    if T == 1 or transposed:
        y = np.matmul(xn, wn.T, out=None if out is None else out.numpy())
    else:
        y = np.matmul(wn, xn.T).T  # [T, out], a transposed view of BLAS's [out, T]
        if out is not None:
            out.numpy()[...] = y
            return out
        y = np.ascontiguousarray(y)
    return out if out is not None else torch.from_numpy(y)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, h] -> [T, h], normalised by the root mean square and scaled by w [h]."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def inv_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """Rotary inverse frequencies [head_dim/2] as the model's rope scaling gives them (see RopeScaling);
    computed as transformers' rope init functions do, in float32."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))  # [hd/2]
    rs = cfg.rope_scaling
    if rs is None or rs.kind == "dynamic":  # dynamic NTK changes nothing up to max_position_embeddings
        return inv
    if rs.kind == "linear":
        return inv / rs.factor
    if rs.kind == "factors":
        return inv / torch.tensor(rs.freq_factors, dtype=torch.float32)
    if rs.kind == "yarn":
        return _yarn(cfg, rs)
    # llama3: keep high frequencies, divide low ones by factor, blend in between
    low_wavelen = rs.original_max_position / rs.low_freq_factor
    high_wavelen = rs.original_max_position / rs.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / rs.factor, inv)
    smooth = (rs.original_max_position / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
    mid = (1 - smooth) * scaled / rs.factor + smooth * scaled
    is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_mid, mid, scaled)


def _yarn(cfg: ModelConfig, rs) -> torch.Tensor:
    """YaRN's NTK-by-parts frequencies [hd/2]: dimensions that turn fewer than beta_slow times over the
    original context are divided by factor, more than beta_fast times kept, a linear ramp in between."""
    d, base = cfg.head_dim, cfg.rope_theta

    def dim_of(rotations: float) -> float:  # the dimension that turns `rotations` times over the context
        return d * math.log(rs.original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(rs.beta_fast), dim_of(rs.beta_slow)
    if rs.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # no division by zero
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)  # [hd/2]
    pos_freqs = base ** (torch.arange(0, d, 2).float() / d)
    keep = 1 - ramp  # share of the unscaled frequency
    return (1.0 / (rs.factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep


def rope_attention_scale(cfg: ModelConfig) -> float:
    """The factor cos and sin are multiplied by (YaRN's attention temperature; 1 for the other kinds)."""
    rs = cfg.rope_scaling
    return rs.attention_factor or yarn_mscale(rs.factor) if rs is not None and rs.kind == "yarn" else 1.0


def rope_tables(cfg: ModelConfig, max_seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [max_seq, head_dim] (frequencies repeated for both halves)."""
    freqs = torch.outer(torch.arange(max_seq, dtype=torch.float32), inv_frequencies(cfg))  # [S, hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [S, hd]
    scale = rope_attention_scale(cfg)
    return emb.cos() * scale, emb.sin() * scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [heads, T, hd] rotated by cos/sin [T, hd] (Hugging Face's half-split convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def attention_mask(T: int, pos: int, k0: int, window: int = 0) -> torch.Tensor | None:
    """Which keys k0..pos+T-1 the queries at pos..pos+T-1 see: [T, pos+T-k0] bool (None for one query,
    which sees them all: k0 is where its window starts). Causal: query p sees keys up to p; with a
    window, only keys above p - window."""
    if T == 1:
        return None
    q = (torch.arange(T) + pos).unsqueeze(1)  # [T, 1] query positions
    k = torch.arange(k0, pos + T).unsqueeze(0)  # [1, L-k0] key positions
    mask = k <= q
    return mask & (k > q - window) if window else mask


def attention(x, w, cache_k, cache_v, pos, cos, sin, kv_of_q, cfg: ModelConfig, out, group: int = 0,
              window: int = 0) -> None:
    """This rank's heads of one attention layer; writes its partial output [T, h] into out.

    x [T, h] hidden states at positions pos..pos+T; w: norm [h], wqkv [(q+2kv)*hd, h], bqkv, wo [h, q*hd];
    cache_k/cache_v [kv, S, hd] this layer's cache for this rank's KV heads; kv_of_q [q] long; group: g if
    q head j uses KV head j // g for every j (the rank holds whole groups), else 0; window: a query sees
    only the last `window` positions, itself included (Mistral's sliding window), 0 for all.
    """
    n_q, n_kv, hd = kv_of_q.numel(), cache_k.shape[0], cfg.head_dim
    if n_q == 0:
        out.zero_()
        return
    T = x.shape[0]
    q, k, v = project_qkv(x, w, n_q, n_kv, cfg)  # [q, T, hd], [kv, T, hd], [kv, T, hd]
    c, s = cos[pos : pos + T], sin[pos : pos + T]
    q = apply_rope(q, c, s)
    cache_k[:, pos : pos + T] = apply_rope(k, c, s)
    cache_v[:, pos : pos + T] = v
    o = attend(q, cache_k, cache_v, pos, kv_of_q, group, window)  # [q, T, hd]
    out.copy_(linear(o.transpose(0, 1).reshape(T, n_q * hd), w["wo"]))


def project_qkv(x, w, n_q: int, n_kv: int, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows x [T, h], normed, through wqkv (and bqkv): q [q, T, hd], k [kv, T, hd], v [kv, T, hd] (views
    of one [T, (q+2kv)*hd] product)."""
    T, hd = x.shape[0], cfg.head_dim
    qkv = linear(rms_norm(x, w["norm"], cfg.norm_eps), w["wqkv"], w.get("bqkv"))  # [T, (q+2kv)*hd]
    q = qkv[:, : n_q * hd].view(T, n_q, hd).transpose(0, 1)  # [q, T, hd]
    k = qkv[:, n_q * hd : (n_q + n_kv) * hd].view(T, n_kv, hd).transpose(0, 1)  # [kv, T, hd]
    v = qkv[:, (n_q + n_kv) * hd :].view(T, n_kv, hd).transpose(0, 1)  # [kv, T, hd]
    return q, k, v


def mlp(x, w, cfg: ModelConfig, out) -> None:
    """This rank's FFN columns; writes its partial output [T, h] into out.

    w: norm [h], wgu [2f, h] (gate rows then up rows), wdown [h, f].
    """
    f = w["wdown"].shape[1]
    if f == 0:
        out.zero_()
        return
    gu = linear(rms_norm(x, w["norm"], cfg.norm_eps), w["wgu"])  # [T, 2f]
    out.copy_(linear(F.silu(gu[:, :f]) * gu[:, f:], w["wdown"]))


class StepRows:
    """The rows of one batched step, worked out once for all its layers: segments [(slot, pos, n), ...] in
    row order, n rows for positions pos..pos+n of the sequence in KV-cache slot `slot`. Holds each row's
    rotary cos/sin, and for two or more single-row segments (sequences decoding, attended together by
    `attend_decode`) their rows, slots and positions and, per sliding window, the keys each one sees."""

    def __init__(self, segments, cos: torch.Tensor, sin: torch.Tensor):
        self.segments = segments
        self.starts = np.cumsum([0] + [n for _, _, n in segments]).tolist()  # each segment's first row
        self.T = self.starts[-1]
        pos_rows = torch.cat([torch.arange(p, p + n) for _, p, n in segments])  # [T] each row's position
        self.cos, self.sin = cos.index_select(0, pos_rows), sin.index_select(0, pos_rows)  # [T, hd] each
        decoding = [j for j, (_, _, n) in enumerate(segments) if n == 1]
        self.decode = None  # DecodeRows of the single-row segments, when there are two or more
        self.all_decode = len(decoding) == len(segments) >= 2  # every row a decoding sequence's
        if len(decoding) >= 2:
            self.decode = DecodeRows([segments[j][0] for j in decoding], [segments[j][1] for j in decoding],
                                     [self.starts[j] for j in decoding])


class DecodeRows:
    """Sequences decoding one row each: their rows in the step (rows [B]), cache slots (slots [B]) and
    positions (positions [B]); `keys(window)` gives the key range and additive mask they attend with."""

    def __init__(self, slots: list[int], positions: list[int], rows: list[int] | None = None):
        B = len(slots)
        self.slots, self.positions = torch.tensor(slots), torch.tensor(positions)
        self.rows = torch.tensor(rows if rows is not None else range(B))
        self.first_slot = slots[0] if slots == list(range(slots[0], slots[0] + B)) else None  # consecutive: views
        self._keys: dict[int, tuple[int, int, torch.Tensor]] = {}

    def keys(self, window: int = 0) -> tuple[int, int, torch.Tensor]:
        """(k0, L, mask): keys k0..L-1 cover every sequence's; mask [B, 1, L-k0] adds 0 to the scores of the
        keys a sequence sees (its own position and before, within the window) and -inf to the rest."""
        if window not in self._keys:
            L = int(self.positions.max()) + 1
            k0 = max(0, int(self.positions.min()) - window + 1) if window else 0
            kpos = torch.arange(k0, L).unsqueeze(0)  # [1, L-k0]
            seen = kpos <= self.positions.unsqueeze(1)  # [B, L-k0]
            if window:
                seen &= kpos > (self.positions - window).unsqueeze(1)
            mask = torch.zeros(seen.shape).masked_fill_(~seen, float("-inf")).unsqueeze(1)
            self._keys[window] = k0, L, mask
        return self._keys[window]


def attention_batch(x, w, cache_k, cache_v, step: StepRows, kv_of_q, cfg: ModelConfig, out,
                    group: int = 0, window: int = 0) -> None:
    """This rank's heads of one attention layer for rows of several sequences (`step`); writes its partial
    output [T, h]. cache_k/cache_v [B, kv, S, hd] this layer's cache, one slot per sequence.

    The projections take all rows at once (the weights are streamed once for the batch). Two or more
    sequences decoding attend together (`attend_decode`): a loop of a dozen small operations per sequence
    cost more than their arithmetic. The other segments (prompt chunks, or a single decoding sequence)
    attend one by one with the operations of `attention`, so a batch of one segment gives its result bit
    for bit.
    """
    n_q, n_kv, hd = kv_of_q.numel(), cache_k.shape[1], cfg.head_dim
    if n_q == 0:
        out.zero_()
        return
    T = x.shape[0]
    q, k, v = project_qkv(x, w, n_q, n_kv, cfg)  # [q, T, hd], [kv, T, hd], [kv, T, hd]
    q, k = apply_rope(q, step.cos, step.sin), apply_rope(k, step.cos, step.sin)  # [q, T, hd], [kv, T, hd]
    d = step.decode
    if step.all_decode:  # the usual step while serving: every row a sequence's next token
        cache_k[d.slots, :, d.positions] = k.transpose(0, 1)  # [B, kv, hd]
        cache_v[d.slots, :, d.positions] = v.transpose(0, 1)
        o = attend_decode(q, cache_k, cache_v, d, kv_of_q, group, window)  # [T, q, hd]
    else:
        o = torch.empty(T, n_q, hd)  # [T, q, hd]
        if d is not None:
            cache_k[d.slots, :, d.positions] = k.index_select(1, d.rows).transpose(0, 1)  # [B, kv, hd]
            cache_v[d.slots, :, d.positions] = v.index_select(1, d.rows).transpose(0, 1)
            o[d.rows] = attend_decode(q.index_select(1, d.rows), cache_k, cache_v, d, kv_of_q, group, window)
        for (slot, pos, n), r in zip(step.segments, step.starts):
            if d is not None and n == 1:
                continue
            cache_k[slot, :, pos : pos + n] = k[:, r : r + n]
            cache_v[slot, :, pos : pos + n] = v[:, r : r + n]
            o[r : r + n] = attend(q[:, r : r + n], cache_k[slot], cache_v[slot], pos, kv_of_q, group,
                                  window).transpose(0, 1)
    out.copy_(linear(o.view(T, n_q * hd), w["wo"]))


def attend_decode(q, cache_k, cache_v, d: DecodeRows, kv_of_q, group: int = 0, window: int = 0) -> torch.Tensor:
    """One query each of B sequences decoding, q [q, B, hd], sequence b at d.positions[b] in cache slot
    d.slots[b] of cache_k/cache_v [slots, kv, S, hd] (already holding that position) -> [B, q, hd]: `attend`
    for all of them in two batched products over keys k0..max(positions), each sequence's keys past its
    own position (or before its window) masked out. With whole groups the q heads of a KV head share one
    product, as in `attend`; consecutive slots are read in place, others gathered first."""
    n_q, B, hd = q.shape
    k0, L, mask = d.keys(window)  # mask [B, 1, L-k0]
    if d.first_slot is not None:
        keys, vals = cache_k[d.first_slot : d.first_slot + B, :, k0:L], cache_v[d.first_slot : d.first_slot + B, :, k0:L]
    else:
        keys, vals = cache_k[:, :, k0:L].index_select(0, d.slots), cache_v[:, :, k0:L].index_select(0, d.slots)
    if not group:  # q heads that are not whole groups: each against its own KV head's copy
        keys, vals = keys.index_select(1, kv_of_q), vals.index_select(1, kv_of_q)
    heads, g = keys.shape[1], group or 1  # KV heads (or q heads), q heads per KV head
    scores = torch.bmm(q.transpose(0, 1).reshape(B * heads, g, hd),
                       keys.reshape(B * heads, L - k0, hd).transpose(1, 2))  # [B*heads, g, L-k0]
    scores = scores.view(B, heads * g, L - k0).mul_(1.0 / math.sqrt(hd)).add_(mask)
    probs = torch.softmax(scores, -1).view(B * heads, g, L - k0)
    return torch.bmm(probs, vals.reshape(B * heads, L - k0, hd)).view(B, n_q, hd)


def attend(q, cache_k, cache_v, pos, kv_of_q, group: int = 0, window: int = 0) -> torch.Tensor:
    """Causal attention (within `window` positions, if not 0) of queries q [q, T, hd] at positions
    pos..pos+T over one sequence's cache [kv, S, hd] (already holding those positions) -> [q, T, hd]."""
    n_q, T, hd = q.shape
    n_kv, L = cache_k.shape[0], pos + T
    k0 = max(0, L - T - window + 1) if window else 0  # no query of this call sees a key before k0
    scale = 1.0 / math.sqrt(hd)
    if T == 1 and group:  # decode with whole groups: q heads of a KV head side by side, the cache not copied
        scores = torch.bmm(q.reshape(n_kv, group, hd), cache_k[:, k0:L].transpose(1, 2)).mul_(scale)  # [kv, g, L-k0]
        return torch.bmm(torch.softmax(scores, -1), cache_v[:, k0:L]).view(n_q, 1, hd)  # [q, 1, hd]
    keys = cache_k[:, k0:L].index_select(0, kv_of_q)  # [q, L-k0, hd]
    vals = cache_v[:, k0:L].index_select(0, kv_of_q)  # [q, L-k0, hd]
    return F.scaled_dot_product_attention(q, keys, vals, attn_mask=attention_mask(T, pos, k0, window),
                                          scale=scale)  # [q, T, hd]
