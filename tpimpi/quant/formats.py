"""Storage formats of weight matrices, and the choice of format for each GGUF tensor type.

Float formats hold one value per element. Quantized formats are GGUF's: every row of a [rows, cols]
matrix is cols/32 blocks of 32 weights along the input dimension,
  q8_0: float16 d, 32 x int8 q                      w = d * q                 34 bytes
  q4_0: float16 d, 16 bytes of nibbles              w = d * (q - 8)           18 bytes
  q4_1: float16 d, float16 m, 16 bytes of nibbles   w = d * q + m             20 bytes
where byte j of a block's nibbles holds weight j in its low half and weight j + 16 in its high half.
A QTensor holds the blocks as GGUF lays them out. The store keeps the same bytes regrouped per row
("row records"), so that a kernel reads each kind contiguously:
  [the row's quants (nibbles or int8), block after block][its d's, float16][its m's, float16 (q4_1)]
`rows_to_blocks` gives back GGUF's blocks exactly. A rank's slice of a matrix is whole rows, or whole
blocks of every row (columns split at multiples of 32).

Optionally (`tpimpi.convert --int4pack`) a block's q4_0/q4_1/q8_0 matrices are stored already repacked
for torch's int4 kernel (tpimpi/quant/kernels.py, `Int4Packed`): formats "q4_0-int4pack" etc., per
matrix planes x [rows, cols / 2] bytes of nibbles in the kernel's tile order, then bfloat16 scales and
zeros [planes, cols / 32, rows, 2]. Not the GGUF's bytes (scales rounded to bfloat16, nibbles
reordered), and the tile order is the CPU's (AVX-512, AVX2 and others differ): the manifest records it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ModelError, UsageError

GROUP = 32  # weights per quantization block, along the input dimension
FLOATS = {"float32": 4, "bfloat16": 2, "float16": 2}  # bytes per element
QUANTS = {"q8_0": 34, "q4_0": 18, "q4_1": 20}  # bytes per block of GROUP weights
FORMATS = (*FLOATS, *QUANTS)
# a quantized format stored in torch's int4 kernel layout (--int4pack) -> the format it was packed from
PACKED = {f"{f}-int4pack": f for f in QUANTS}
STORED = (*FORMATS, *PACKED)  # every format a store's blocks may have
# the converter's --dtype: a format, a short name for one, or "auto" (keep each GGUF tensor's own type)
ALIASES = {"q8": "q8_0", "q4": "q4_1", "f32": "float32", "bf16": "bfloat16", "f16": "float16"}
REQUESTS = ("auto", *FORMATS, *ALIASES)
# widest first: a block whose matrices come in several formats is stored in the widest of them
WIDTH_ORDER = ("float32", "bfloat16", "float16", "q8_0", "q4_1", "q4_0")


def is_quant(fmt: str) -> bool:
    return fmt in QUANTS


def is_packed(fmt: str) -> bool:
    """A quantized format kept in torch's int4 kernel layout (--int4pack)."""
    return fmt in PACKED


def packed(fmt: str) -> str:
    """The --int4pack format of a quantized format (q4_0 -> q4_0-int4pack)."""
    return f"{fmt}-int4pack"


def planes(fmt: str) -> int:
    """4-bit planes of a matrix in torch's int4 layout: q8_0 is two (kernels.Int4Packed), q4 one."""
    return 2 if PACKED.get(fmt, fmt) == "q8_0" else 1


def nbytes(fmt: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of `shape` in `fmt` (quantized: a 2-D [rows, cols] with cols a multiple of GROUP)."""
    if fmt in FLOATS:
        return int(np.prod(shape, dtype=np.int64)) * FLOATS[fmt]
    rows, cols = shape
    assert cols % GROUP == 0, (fmt, shape)
    if fmt in PACKED:  # nibbles, then a bfloat16 scale and zero per group of 32, per plane
        return planes(fmt) * rows * (cols // 2 + cols // GROUP * 4)
    return rows * (cols // GROUP) * QUANTS[fmt]


def row_bytes(fmt: str, cols: int) -> int:
    return nbytes(fmt, (1, cols))


def canonical(request: str) -> str:
    """A --dtype value as a format name (or "auto")."""
    return ALIASES.get(request, request)


def widest(fmts) -> str:
    return min(fmts, key=WIDTH_ORDER.index)


def check_divisible(fmt: str, what: str, n: int) -> None:
    """Refuse a quantized format for a model whose dimension n does not hold whole groups."""
    if n % GROUP:
        raise UsageError(f"--dtype {fmt}: {what} is {n}, not a multiple of the quantization group size {GROUP}; "
                         f"store this model as float32, bfloat16 or float16")


@dataclass(frozen=True)
class QTensor:
    """A quantized [rows, cols] matrix as GGUF blocks: data is uint8 [rows, cols / GROUP * block bytes]."""

    fmt: str
    data: np.ndarray
    shape: tuple[int, int]

    def take_rows(self, sl: slice) -> "QTensor":
        d = self.data[sl]
        return QTensor(self.fmt, d, (d.shape[0], self.shape[1]))

    def take_cols(self, c0: int, c1: int) -> "QTensor":
        """Columns [c0, c1), both on block boundaries (shard.py splits quantized stores that way)."""
        assert c0 % GROUP == 0 and c1 % GROUP == 0, (c0, c1)
        b = QUANTS[self.fmt]
        return QTensor(self.fmt, self.data[:, c0 // GROUP * b : c1 // GROUP * b], (self.shape[0], c1 - c0))

    def permute_rows(self, fn) -> "QTensor":
        return QTensor(self.fmt, fn(self.data), self.shape)


def take_rows(a, sl: slice):
    return a.take_rows(sl) if isinstance(a, QTensor) else a[sl]


def take_cols(a, c0: int, c1: int):
    return a.take_cols(c0, c1) if isinstance(a, QTensor) else a[:, c0:c1]


def concat_rows(parts: list):
    if isinstance(parts[0], QTensor):
        assert all(isinstance(p, QTensor) and p.fmt == parts[0].fmt for p in parts)
        data = np.concatenate([p.data for p in parts])
        return QTensor(parts[0].fmt, data, (data.shape[0], parts[0].shape[1]))
    return np.concatenate(parts)


def _gguf_type(fmt: str):
    from gguf import GGMLQuantizationType as T

    return {"q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_1": T.Q4_1}[fmt]


def quantize(a: np.ndarray, fmt: str) -> QTensor:
    """float32 [rows, cols] -> QTensor, rounding to nearest as llama.cpp's reference quantizer does."""
    from gguf.quants import quantize as gq

    a = np.ascontiguousarray(a, dtype=np.float32)
    return QTensor(fmt, gq(a, _gguf_type(fmt)), tuple(a.shape))


def dequantize(t: QTensor) -> np.ndarray:
    """QTensor -> float32 [rows, cols], the weights exactly as the format defines them."""
    from gguf.quants import dequantize as gd

    return np.ascontiguousarray(gd(t.data, _gguf_type(t.fmt)).reshape(t.shape), dtype=np.float32)


def as_format(a, fmt: str):
    """a (float32 array or QTensor) in fmt: QTensor for quantized formats (the same one if already in fmt),
    else a float32 array that the store rounds to fmt when it writes it."""
    fmt = PACKED.get(fmt, fmt)  # an --int4pack format is packed from its quantized format when written
    if isinstance(a, QTensor):
        if a.fmt == fmt:
            return a
        a = dequantize(a)
    return quantize(a, fmt) if is_quant(fmt) else a


SCALE_FIELDS = {"q8_0": [(0, 2)], "q4_0": [(0, 2)], "q4_1": [(0, 2), (2, 4)]}  # a block's float16 d (and m)


def _fields(fmt: str) -> list[tuple[int, int]]:
    """(start, stop) bytes of a block's fields in row-record order: quants, d, m."""
    return {"q8_0": [(2, 34), (0, 2)], "q4_0": [(2, 18), (0, 2)], "q4_1": [(4, 20), (0, 2), (2, 4)]}[fmt]


def blocks_to_rows(fmt: str, data: np.ndarray) -> np.ndarray:
    """GGUF blocks uint8 [rows, groups * block bytes] -> row records of the same shape (same bytes)."""
    blk = data.reshape(data.shape[0], -1, QUANTS[fmt])  # [rows, groups, block bytes]
    return np.concatenate([blk[..., a:b].reshape(data.shape[0], -1) for a, b in _fields(fmt)], axis=1)


def rows_to_blocks(fmt: str, rec: np.ndarray) -> np.ndarray:
    """Row records -> GGUF blocks: the inverse of blocks_to_rows."""
    rows, g = rec.shape[0], rec.shape[1] // QUANTS[fmt]
    blk = np.empty((rows, g, QUANTS[fmt]), dtype=np.uint8)
    off = 0
    for a, b in _fields(fmt):
        blk[..., a:b] = rec[:, off : off + g * (b - a)].reshape(rows, g, b - a)
        off += g * (b - a)
    return blk.reshape(rows, -1)


def to_bytes(a, fmt: str) -> bytes:
    """The stored bytes of a (float32 array or QTensor) in fmt: quantized ones as row records, or in torch's
    int4 layout for an --int4pack format."""
    a = as_format(a, fmt)
    if fmt in PACKED:
        from .kernels import int4pack_bytes

        return int4pack_bytes(a)
    if isinstance(a, QTensor):
        return blocks_to_rows(fmt, a.data).tobytes() if a.data.size else b""
    import torch

    if a.size == 0:
        return b""
    t = torch.from_numpy(np.require(a, np.float32, ["C", "W"]))
    if fmt != "float32":
        t = t.to(getattr(torch, fmt))
    return t.contiguous().view(torch.uint8).numpy().tobytes()


# ---------------------------------------------------------------------------------------------------
# GGUF tensor types -> store formats

# kept byte for byte; or a float type kept as that float type
KEPT = {"Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
# re-quantized (dequantized by the gguf package, then rounded to nearest) to the nearest stored format:
# 5- and 6-bit types and FP4 codes to q8_0 (which loses little more: MXFP4's values are exactly q8_0's
# integers times a power of two), 4-bit K/IQ types to q4_1 (4 bits with a minimum per group, like
# their sub-blocks), and the 1- to 3-bit types to q4_1 as well, the smallest stored format
REQUANT = {"Q5_0": "q8_0", "Q5_1": "q8_0", "Q5_K": "q8_0", "Q6_K": "q8_0", "MXFP4": "q8_0", "NVFP4": "q8_0",
           "Q4_K": "q4_1", "IQ4_NL": "q4_1", "IQ4_XS": "q4_1", "Q2_K": "q4_1", "Q3_K": "q4_1",
           "IQ2_XXS": "q4_1", "IQ2_XS": "q4_1", "IQ2_S": "q4_1", "IQ3_XXS": "q4_1", "IQ3_S": "q4_1",
           "IQ1_S": "q4_1", "IQ1_M": "q4_1", "TQ1_0": "q4_1", "TQ2_0": "q4_1"}


def unsupported_message(type_name: str, tensor: str, path: str) -> str:
    return (f"{path}: tensor {tensor!r} has GGUF type {type_name}, which tpimpi can neither keep nor re-quantize "
            f"(the gguf package cannot dequantize it); convert the model with llama.cpp's llama-quantize to "
            f"Q8_0, Q4_0 or Q4_1 first, or start from a float GGUF or a Hugging Face directory")


def auto_format(type_name: str, tensor: str, path: str) -> tuple[str, bool]:
    """(format, kept exactly?) for a tensor of this stored type (GGUF or safetensors name) under --dtype auto."""
    if type_name in KEPT:
        return KEPT[type_name], True
    if type_name in REQUANT:
        return REQUANT[type_name], False
    raise ModelError(unsupported_message(type_name, tensor, path))
