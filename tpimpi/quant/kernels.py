"""Products with weights stored narrower than float32: GGUF's q8_0/q4_0/q4_1 blocks, bfloat16, float16.

A block stays in its stored bytes. `matmul` walks the weight matrix a slice of rows at a time: it
dequantizes (or upcasts) the slice into a float32 scratch of SLICE_ELEMS elements, small enough to stay
in the CPU's L2 cache, and multiplies it with BLAS (numpy's OpenBLAS, as for float32 stores). No copy of a
whole block ever exists. The dequantized values are bit-identical to the `gguf` package's (and so to what
transformers computes from a GGUF): every product d*q is exact in float32 and q4_1 adds m once.

Why this kernel: BENCHMARKS.md ("Kernels for quantized blocks") measures the candidates. torch's fused
int4/int8 weight-only kernels are fast only with bfloat16 activations, scales and outputs, which cannot
hold GGUF's float16 scales exactly; with float32 activations they fall back to slow reference loops.
So they serve `--compute bfloat16` only: `int4pack` repacks a resident q4_0/q4_1 matrix, or a q8_0 one
as two exact 4-bit planes, for torch's int4 kernel (the second half of this module).
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

    def planar(self, elems: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The planar candidate's extra scratch: uint8 [1.5 * elements], float32 [2 * elements / GROUP]."""
        have = getattr(self, "u8p", None)
        if have is None or have.numel() < elems * 3 // 2:
            self.u8p = torch.empty(elems * 3 // 2, dtype=torch.uint8)
            self.dm = torch.empty(2 * (elems // GROUP))
        return self.u8p, self.dm


_SCRATCH = _Scratch()


def dequantize_into(fmt: str, rec: torch.Tensor, out: torch.Tensor, tmp: torch.Tensor) -> None:
    """out [n, in] float32 <- the weights of n row records uint8 [n, row bytes] in fmt (formats.py), in
    GGUF's order, bit-identical to the gguf package's dequantization. tmp: uint8 scratch of at least
    n * in / 2 elements."""
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


# A candidate measured against dequantize_into (tpimpi.quant.bench, "-planar"), not faster on the machine
# measured so far (BENCHMARKS.md): a q4 row's weights in two halves, the low nibbles of all its bytes then
# the high ones, unpacked 4 bytes at a time into contiguous memory, with x permuted to that order once per
# call (each weight keeps its exact value; a dot product does not care about the order of its terms).


def planar_order(x: torch.Tensor) -> torch.Tensor:
    """x [T, in] -> a copy with its columns in the planar order of a q4 row (low nibbles, then high)."""
    T, k = x.shape
    return x.view(T, k // GROUP, 2, 16).transpose(1, 2).reshape(T, k)  # [T, low/high * groups * 16]


def dequantize_planar(fmt: str, rec: torch.Tensor, out: torch.Tensor, u8: torch.Tensor, dm: torch.Tensor) -> None:
    """out [n, in] float32 <- the q4_0/q4_1 weights of rec in planar order, each exactly the gguf package's.
    Scratch: u8 uint8 [>= 1.5 * n * in], dm float32 [>= 2 * n * in / GROUP]."""
    n, k = out.shape
    g, qb = k // GROUP, k // 2
    nd = 2 * g if fmt == "q4_1" else g  # float16 scales (and minimums) per row, after the quants
    scales = dm[: n * nd].view(n, nd)
    scales.copy_(rec[:, qb : qb + 2 * nd].view(torch.float16))  # [n, d's (then m's)]
    qs = rec[:, :qb]
    if qs.stride(0) % 4 or qs.storage_offset() % 4:  # rows not on 4-byte boundaries (q4_0, odd groups)
        qs = u8[n * k : n * k + n * qb].view(n, qb).copy_(qs)
    words = qs.view(torch.int32)  # [n, in / 8]: 4 bytes of nibbles each
    halves = u8[: n * k].view(n, 2, qb).view(torch.int32)  # [n, low/high, in / 8]
    torch.bitwise_and(words, 0x0F0F0F0F, out=halves[:, 0])
    torch.bitwise_right_shift(words, 4, out=halves[:, 1]).bitwise_and_(0x0F0F0F0F)
    out.copy_(u8[: n * k].view(n, k))
    w, d = out.view(n, 2, g, 16), scales[:, :g].view(n, 1, g, 1)  # [n, low/high, groups, 16]
    if fmt == "q4_0":
        w.sub_(8).mul_(d)
    else:
        w.mul_(d).add_(scales[:, g:].view(n, 1, g, 1))


def matmul(x: torch.Tensor, w, out: torch.Tensor | None = None, planar: bool = False) -> torch.Tensor:
    """x [T, in] float32 @ w.T -> [T, out] float32: a Packed w a slice of rows at a time through the
    scratch, an Int4Packed one through torch's int4 kernel. planar: the planar q4 candidate (benchmarks)."""
    if isinstance(w, Int4Packed):
        y = int4_matmul(x, w)
        return y if out is None else out.copy_(y)
    n_out, k = w.shape
    y = torch.empty(x.shape[0], n_out) if out is None else out  # [T, out]
    if n_out == 0 or k == 0:
        return y.zero_()
    f32, u8 = _SCRATCH.get(k)
    step = max(1, f32.numel() // k)
    planar = planar and w.fmt in ("q4_0", "q4_1")
    u8p, dm = _SCRATCH.planar(f32.numel()) if planar else (None, None)
    xn, yn = (planar_order(x) if planar else x).numpy(), y.numpy()
    for r0 in range(0, n_out, step):
        r1 = min(n_out, r0 + step)
        ws = f32[: (r1 - r0) * k].view(r1 - r0, k)  # [r, in]
        if planar:
            dequantize_planar(w.fmt, w.data[r0:r1], ws, u8p, dm)
        else:
            to_float32(w, slice(r0, r1), ws, u8)
        np.matmul(xn, ws.numpy().T, out=yn[:, r0:r1])
    return y


def to_float32(w: Packed, rows: slice, out: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """out [r, in] <- rows of w as float32 (dequantized or upcast); returns out."""
    if w.fmt in QUANTS:
        dequantize_into(w.fmt, w.data[rows], out, tmp)
    else:
        out.copy_(w.data[rows])
    return out


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
# --compute bfloat16: torch's fused int4 kernel for resident q4_0/q4_1/q8_0 matrices (fast, approximate)

PACK_ROWS = 64  # rows packed at a time: torch's CPU int4 packing works in tiles of up to 64 rows
INT4_FORMATS = ("q4_0", "q4_1", "q8_0")


@dataclass(frozen=True)
class Int4Packed:
    """A q4_0/q4_1/q8_0 matrix [out, in] repacked for torch's _weight_int4pack_mm_for_cpu, which computes
    w = (nibble - 8) * scale + zero per group of 32 with bfloat16 scales and zeros.

    q4_0/q4_1 (one plane): the same nibbles; scale d and zero 0 (q4_0) or m + 8d (q4_1), rounded to
    bfloat16. 20 bytes per group of 32 weights, as Q4_1 (Q4_0: 18).
    q8_0 (two planes): q = 16 * hi + lo exactly, with hi = q >> 4 in -8..7 and lo = q & 15 in 0..15. Plane
    0 holds hi + 8 with scale 16d and zero 0 (giving 16 d hi), plane 1 lo with scale d and zero 8d (giving
    d lo); y = plane 0's product + plane 1's. The integers are exact, d is rounded to bfloat16 (16d and 8d
    are then exact too). 2 x 16 bytes of nibbles + 2 x 4 bytes of scales and zeros = 40 bytes per group
    of 32 weights (Q8_0: 34, so 1.18x).
    Products take bfloat16 activations and give bfloat16 results (each plane's, for q8_0, added in
    float32): about 3 significant digits, like a bfloat16 store."""

    packed: torch.Tensor  # uint8 [planes, out, in / 2]
    scales_zeros: torch.Tensor  # bfloat16 [planes, in / 32, out, 2]
    shape: tuple[int, int]

    @property
    def planes(self) -> int:
        return self.packed.shape[0]


@functools.lru_cache(maxsize=None)
def _int4_tiles_are_row_local() -> bool:
    """Whether packing rows a tile at a time gives the packing of the whole (so a bounded transient)."""
    q = torch.randint(0, 16, (2 * PACK_ROWS, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    whole = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    parts = [torch.ops.aten._convert_weight_to_int4pack_for_cpu(q[i : i + PACK_ROWS], 1) for i in (0, PACK_ROWS)]
    return torch.equal(whole, torch.cat(parts))


def _packable(fmt: str, shape: tuple[int, ...]) -> bool:
    return fmt in INT4_FORMATS and len(shape) == 2 and shape[0] % 16 == 0 and shape[0] > 0 and shape[1] > 0


def can_int4pack(w) -> bool:
    return isinstance(w, Packed) and _packable(w.fmt, w.shape)


def int4pack_nbytes(fmt: str, shape: tuple[int, int]) -> int:
    """Bytes of a matrix of `shape` in fmt once repacked by `int4pack`."""
    planes = 2 if fmt == "q8_0" else 1
    return planes * shape[0] * (shape[1] // 2 + shape[1] // GROUP * 4)


def resident_nbytes(layout, compute: str) -> int:
    """Bytes a resident block (a store.BlockLayout) holds: under --compute bfloat16, when all its matrices
    can be repacked for the int4 kernel, their repacked bytes (BlockScheduler frees the stored buffer);
    else its stored bytes."""
    mats = [p for p in layout.parts if p.name.startswith("w")]
    if compute != "bfloat16" or not mats or not all(_packable(p.fmt, p.shape) for p in mats):
        return layout.nbytes
    return sum(int4pack_nbytes(p.fmt, p.shape) if p.name.startswith("w") else p.nbytes for p in layout.parts)


def q8_planes(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q8_0's integers q (int8 [..]) -> the two 4-bit planes int32 (hi + 8 in 0..15, lo in 0..15), with
    q = 16 * (hi + 8 - 8) + lo exactly for every int8 (GGUF's quantizer writes -127..127)."""
    q = q.to(torch.int32)
    return (q >> 4) + 8, q & 15


def _plane_rows(w: Packed, plane: int, r0: int, r1: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows [r0, r1) of one 4-bit plane of w: (nibbles int32 [r, in], scales, zeros float32 [r, in / 32])."""
    k = w.shape[1]
    g, qb = k // GROUP, (k if w.fmt == "q8_0" else k // 2)
    rec = w.data[r0:r1]
    d = rec[:, qb : qb + 2 * g].view(torch.float16).float()  # [rows, groups]
    if w.fmt == "q8_0":
        hi, lo = q8_planes(rec[:, :k].view(torch.int8))
        return (hi, 16 * d, torch.zeros_like(d)) if plane == 0 else (lo, d, 8 * d)
    ints = torch.empty(rec.shape[0], g, 2, 16, dtype=torch.int32)  # [rows, groups, low/high, 16]
    qs = rec[:, :qb].reshape(-1, g, 16)
    ints[:, :, 0] = qs & 15
    ints[:, :, 1] = qs >> 4
    zero = torch.zeros_like(d) if w.fmt == "q4_0" else rec[:, qb + 2 * g :].view(torch.float16).float() + 8 * d
    return ints.view(-1, k), d, zero


def int4pack(w: Packed) -> Int4Packed:
    """Repack a resident q4_0/q4_1/q8_0 matrix for torch's int4 kernel, PACK_ROWS rows at a time (the
    transient is a tile of int32 nibbles, never the matrix)."""
    n, k = w.shape
    planes = 2 if w.fmt == "q8_0" else 1
    step = PACK_ROWS if _int4_tiles_are_row_local() else n
    packed = torch.empty(planes, n, k // 2, dtype=torch.uint8)
    sz = torch.empty(planes, k // GROUP, n, 2, dtype=torch.bfloat16)  # [planes, groups, rows, scale/zero]
    for plane in range(planes):
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            ints, scale, zero = _plane_rows(w, plane, r0, r1)
            packed[plane, r0:r1] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(ints, 1)
            sz[plane, :, r0:r1, 0] = scale.T
            sz[plane, :, r0:r1, 1] = zero.T
    return Int4Packed(packed, sz, w.shape)


def int4_matmul(x: torch.Tensor, w: Int4Packed) -> torch.Tensor:
    """x [T, in] @ w.T -> [T, out] float32, through torch's fused int4 kernel in bfloat16, one call per
    plane (two calls measured faster than one on the planes stacked as [2 out, in]: BENCHMARKS.md)."""
    xb, mm = x.to(torch.bfloat16), torch.ops.aten._weight_int4pack_mm_for_cpu
    y = mm(xb, w.packed[0], GROUP, w.scales_zeros[0]).float()  # [T, out]
    for p in range(1, w.planes):
        y.add_(mm(xb, w.packed[p], GROUP, w.scales_zeros[p]))  # q8_0: 16 d hi + d lo
    return y


# ---------------------------------------------------------------------------------------------------
# Stores converted with --int4pack: matrices kept in the int4 kernel's layout, so a streamed block is
# multiplied as read. Repacking a streamed block every token instead costs more than the exact kernel:
# measured (one thread, Intel Xeon with AVX-512, under load; BENCHMARKS.md "Streamed quantized blocks")
# torch's packing op alone takes 0.18 GB/s of q4_0 bytes and `int4pack` 0.2-0.3 GB/s, a repack in word-wide
# numpy operations 0.21 GB/s, against a memcpy's 6-7.5 GB/s, the exact kernel's 0.4-0.7 GB/s, the int4
# kernel's 6-7 GB/s and a disk's 1.7 GB/s. The nibbles must be transposed (the kernel reads, for each
# input column, the nibbles of 64 rows side by side; GGUF keeps a row's columns side by side), and no
# library call does that byte transpose fast.


def int4pack_bytes(q) -> bytes:
    """A quantized matrix (formats.QTensor of GGUF blocks) in the stored --int4pack layout: planes x
    [rows, cols / 2] nibbles in torch's tile order, then bfloat16 [planes, cols / 32, rows, 2] scales and zeros."""
    from .formats import blocks_to_rows

    rec = torch.from_numpy(np.ascontiguousarray(blocks_to_rows(q.fmt, q.data)))
    w = int4pack(Packed(q.fmt, rec, q.shape))
    return w.packed.numpy().tobytes() + w.scales_zeros.view(torch.uint8).numpy().tobytes()


def int4pack_view(fmt: str, raw: torch.Tensor, shape: tuple[int, int]) -> Int4Packed:
    """The Int4Packed matrix of logical shape [out, in] whose --int4pack bytes are raw (uint8), as views."""
    n, k = shape
    p = 2 if fmt.startswith("q8_0") else 1
    nib = p * n * (k // 2)
    return Int4Packed(raw[:nib].view(p, n, k // 2),
                      raw[nib : nib + p * (k // GROUP) * n * 4].view(torch.bfloat16).view(p, k // GROUP, n, 2), shape)


@functools.lru_cache(maxsize=None)
def int4pack_layout() -> dict:
    """What identifies this machine's int4 tile order: a hash of torch's packing of a fixed matrix (two
    full tiles of 64 rows and a partial one of 48), with the CPU capability torch dispatches to and
    torch's version for the reader. Stores converted with --int4pack record it; a run compares the hash."""
    import hashlib

    i, j = torch.arange(176).view(-1, 1), torch.arange(64).view(1, -1)
    q = ((5 * i + 3 * j + (i * j >> 2)) % 16).to(torch.int32)  # [176, 64]: no two rows or columns alike
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    return {"layout": hashlib.sha256(packed.numpy().tobytes()).hexdigest()[:16],
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__.split("+")[0]}
