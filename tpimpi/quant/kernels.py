"""Products with weights stored narrower than float32: GGUF's q8_0/q4_0/q4_1 blocks, bfloat16, float16.

A block stays in its stored bytes. `matmul` walks the weight matrix a slice of rows at a time: it
dequantizes (or upcasts) the slice into a float32 scratch of SLICE_ELEMS elements, small enough to stay
in the CPU's L2 cache, and multiplies it with BLAS (numpy's OpenBLAS, as for float32 stores). No copy of a
whole block ever exists. The dequantized values are bit-identical to the `gguf` package's (and so to what
transformers computes from a GGUF): every product d*q is exact in float32 and q4_1 adds m once.

Why this kernel: BENCHMARKS.md ("Kernels for quantized blocks") measures the candidates. torch's fused
int4/int8 weight-only kernels are fast only with bfloat16 activations, scales and outputs, which cannot
hold GGUF's float16 scales exactly; with float32 activations they fall back to slow reference loops.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

import numpy as np
import torch

from .formats import FLOATS, GROUP, QUANTS

SLICE_ELEMS = 1 << 17  # float32 elements of the scratch: 512 KiB
TORCH_FLOATS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Packed:
    """A weight matrix of logical shape [out, in] kept in its stored format: for a quantized format
    data is uint8 [out, in / GROUP * block bytes] (GGUF blocks), for bfloat16/float16 it is [out, in]."""

    fmt: str
    data: torch.Tensor
    shape: tuple[int, int]


def scratch_bytes(max_in: int) -> int:
    """Bytes of the per-thread scratch `matmul` uses for matrices with up to max_in input features."""
    elems = max(SLICE_ELEMS, max_in)
    return elems * 4 + elems // 2 + 2 * (elems // GROUP) * 4


class _Scratch(threading.local):
    """One scratch per thread (ranks run as threads in the tests), allocated on first use."""

    def get(self, elems: int) -> tuple[torch.Tensor, torch.Tensor]:
        have = getattr(self, "f32", None)
        if have is None or have.numel() < elems:
            self.f32 = torch.empty(max(SLICE_ELEMS, elems))  # [elements] dequantized slice
            self.u8 = torch.empty(self.f32.numel() // 2, dtype=torch.uint8)  # [elements / 2] nibbles
        return self.f32, self.u8


_SCRATCH = _Scratch()


def dequantize_into(fmt: str, rec: torch.Tensor, out: torch.Tensor, tmp: torch.Tensor) -> None:
    """out [n, in] float32 <- the weights of n row records uint8 [n, row bytes] in fmt (formats.py).
    tmp: uint8 scratch of at least n * in / 2 elements."""
    n, k = out.shape
    g = k // GROUP
    q = k if fmt == "q8_0" else k // 2  # bytes of quants per row
    d = rec[:, q : q + 2 * g].view(torch.float16).unsqueeze(-1)  # [n, groups, 1]
    w = out.view(n, g, GROUP)  # [n, groups, 32]
    if fmt == "q8_0":
        out.copy_(rec[:, :k].view(torch.int8))
        w.mul_(d)  # d * q, exact
        return
    qs = rec[:, :q]  # [n, in/2]: per group, weight j in the low nibble of byte j, weight j + 16 in the high
    half = tmp[: n * q].view(n, q)
    pairs = out.view(n, g, 2, 16)  # [n, groups, low/high, 16]
    torch.bitwise_and(qs, 15, out=half)
    pairs[:, :, 0].copy_(half.view(n, g, 16))
    torch.bitwise_right_shift(qs, 4, out=half)
    pairs[:, :, 1].copy_(half.view(n, g, 16))
    if fmt == "q4_0":
        w.sub_(8).mul_(d)  # d * (q - 8), exact
    else:
        w.mul_(d).add_(rec[:, q + 2 * g :].view(torch.float16).unsqueeze(-1))  # d * q + m, as gguf does


def to_float32(w: Packed, rows: slice, out: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """out [r, in] <- rows of w as float32 (dequantized or upcast); returns out."""
    if w.fmt in QUANTS:
        dequantize_into(w.fmt, w.data[rows], out, tmp)
    else:
        out.copy_(w.data[rows])
    return out


def matmul(x: torch.Tensor, w, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, in] float32 @ w.T -> [T, out] float32: a Packed w a slice of rows at a time through the
    scratch, an Int4Packed one through torch's int4 kernel."""
    if isinstance(w, Int4Packed):
        y = int4_matmul(x, w)
        return y if out is None else out.copy_(y)
    n_out, k = w.shape
    y = torch.empty(x.shape[0], n_out) if out is None else out  # [T, out]
    if n_out == 0 or k == 0:
        return y.zero_()
    f32, u8 = _SCRATCH.get(k)
    step = max(1, f32.numel() // k)
    xn, yn = x.numpy(), y.numpy()
    for r0 in range(0, n_out, step):
        r1 = min(n_out, r0 + step)
        ws = to_float32(w, slice(r0, r1), f32[: (r1 - r0) * k].view(r1 - r0, k), u8)  # [r, in]
        np.matmul(xn, ws.numpy().T, out=yn[:, r0:r1])
    return y


def rows_to_float32(fmt: str, raw: torch.Tensor, out: torch.Tensor) -> None:
    """out [T, h] float32 <- T rows stored in fmt, raw uint8 [T, row bytes] (embedding rows)."""
    if fmt in QUANTS:
        _, u8 = _SCRATCH.get(out.shape[1])
        step = max(1, 2 * u8.numel() // out.shape[1])
        for t in range(0, out.shape[0], step):
            dequantize_into(fmt, raw[t : t + step], out[t : t + step], u8)
    else:
        out.copy_(raw.view(TORCH_FLOATS[fmt]).view(out.shape))


assert set(FLOATS) == set(TORCH_FLOATS)


# ---------------------------------------------------------------------------------------------------
# --compute bfloat16: torch's fused int4 kernel for resident q4_0/q4_1 matrices (fast, approximate)

PACK_ROWS = 64  # rows packed at a time: torch's CPU int4 packing works in tiles of up to 64 rows


@dataclass(frozen=True)
class Int4Packed:
    """A q4_0/q4_1 matrix [out, in] repacked for torch's _weight_int4pack_mm_for_cpu: the same 4-bit
    integers, with scales and zero points [in / 32, out, 2] in bfloat16 (w = (q - 8) * scale + zero:
    q4_0's d and 0, q4_1's d and m + 8d, rounded to bfloat16). Products take bfloat16 activations and
    give bfloat16 results: about 3 significant digits, like a bfloat16 store."""

    packed: torch.Tensor
    scales_zeros: torch.Tensor
    shape: tuple[int, int]


@functools.lru_cache(maxsize=None)
def _int4_tiles_are_row_local() -> bool:
    """Whether packing rows a tile at a time gives the packing of the whole (so a bounded transient)."""
    q = torch.randint(0, 16, (2 * PACK_ROWS, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    whole = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    parts = [torch.ops.aten._convert_weight_to_int4pack_for_cpu(q[i : i + PACK_ROWS], 1) for i in (0, PACK_ROWS)]
    return torch.equal(whole, torch.cat(parts))


def can_int4pack(w) -> bool:
    return isinstance(w, Packed) and w.fmt in ("q4_0", "q4_1") and w.shape[0] % 16 == 0 and w.shape[0] > 0 \
        and w.shape[1] > 0


def int4pack(w: Packed) -> Int4Packed:
    """Repack a resident q4_0/q4_1 matrix for torch's int4 kernel, PACK_ROWS rows at a time."""
    n, k = w.shape
    g, q = k // GROUP, k // 2
    step = PACK_ROWS if _int4_tiles_are_row_local() else n
    packed = torch.empty(n, k // 2, dtype=torch.uint8)
    for r0 in range(0, n, step):
        rec = w.data[r0 : r0 + step]
        ints = torch.empty(rec.shape[0], g, 2, 16, dtype=torch.int32)  # [rows, groups, low/high, 16]
        qs = rec[:, :q].reshape(-1, g, 16)
        ints[:, :, 0] = qs & 15
        ints[:, :, 1] = qs >> 4
        packed[r0 : r0 + step] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(ints.view(-1, k), 1)
    d = w.data[:, q : q + 2 * g].view(torch.float16).float()  # [out, groups]
    zero = torch.zeros_like(d) if w.fmt == "q4_0" else w.data[:, q + 2 * g :].view(torch.float16).float() + 8 * d
    sz = torch.stack([d.T, zero.T], dim=-1).to(torch.bfloat16).contiguous()  # [groups, out, 2]
    return Int4Packed(packed, sz, w.shape)


def int4_matmul(x: torch.Tensor, w: Int4Packed) -> torch.Tensor:
    """x [T, in] @ w.T -> [T, out] float32, through torch's fused int4 kernel in bfloat16."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), w.packed, GROUP, w.scales_zeros).float()
