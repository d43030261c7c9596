"""How partial sums travel: float32 as they are, bfloat16 (half the bytes), or q8 — blocks of 32 values as
one float16 scale and 32 signed bytes (34 bytes for 128; distributed-llama's Q80 idea). Pure numpy on
preallocated buffers; comm.py sends the bytes (WireBuffers) and rank 0 adds the decoded partials in float32."""

from __future__ import annotations

import numpy as np

from .errors import UsageError

WIRES = ("float32", "bfloat16", "q8")
Q8_BLOCK = 32


def wire_nbytes(wire: str, n: int) -> int:
    """Bytes on the wire for n float32 values."""
    if wire == "float32":
        return 4 * n
    if wire == "bfloat16":
        return 2 * n
    if wire == "q8":
        nb = -(-n // Q8_BLOCK)
        return nb * (2 + Q8_BLOCK)
    raise UsageError(f"--wire {wire!r} is not one of {', '.join(WIRES)}")


class Codec:
    """Encoder and decoder of one wire format for messages of up to max_elems floats (scratch preallocated)."""

    def __init__(self, wire: str, max_elems: int):
        wire_nbytes(wire, 1)  # validates the name
        self.wire, self.max_elems = wire, max_elems
        nb = -(-max_elems // Q8_BLOCK)
        self._u32 = np.empty(max_elems, dtype=np.uint32)  # [n] bfloat16 rounding scratch
        self._blocks = np.zeros((nb, Q8_BLOCK), dtype=np.float32)  # [blocks, 32] q8 scratch, zero padded
        self._amax = np.empty(nb, dtype=np.float32)  # [blocks]

    def nbytes(self, n: int) -> int:
        return wire_nbytes(self.wire, n)

    def encode(self, x: np.ndarray, out: np.ndarray) -> None:
        """out [nbytes(n)] uint8 <- x [n] float32."""
        n = x.size
        if self.wire == "float32":
            out.view(np.float32)[:n] = x
        elif self.wire == "bfloat16":
            u, t = x.view(np.uint32), self._u32[:n]
            np.right_shift(u, 16, out=t)  # round to nearest even: add 0x7fff plus the lowest kept bit
            np.bitwise_and(t, 1, out=t)
            t += 0x7FFF
            t += u
            t >>= 16
            out.view(np.uint16)[:n] = t
        else:
            nb = -(-n // Q8_BLOCK)
            blocks, amax = self._blocks[:nb], self._amax[:nb]  # [nb, 32], [nb]
            flat = blocks.reshape(-1)
            flat[:n] = x
            flat[n:] = 0
            np.abs(blocks).max(axis=1, out=amax)
            scales = out[: 2 * nb].view(np.float16)  # [nb]
            np.multiply(amax, 1 / 127, out=amax)
            scales[:] = amax
            amax[:] = scales  # quantize with the scale as the receiver will see it
            np.divide(1.0, amax, out=amax, where=amax > 0)
            amax[~np.isfinite(amax)] = 0
            blocks *= amax[:, None]
            np.rint(blocks, out=blocks)
            np.clip(blocks, -127, 127, out=blocks)
            out[2 * nb : 2 * nb + nb * Q8_BLOCK].view(np.int8)[:] = flat

    def decode(self, raw: np.ndarray, out: np.ndarray, add: bool = False) -> None:
        """out [n] float32 <- (or +=, if add) the values encoded in raw."""
        n = out.size
        if self.wire == "float32":
            vals = raw.view(np.float32)[:n]
        elif self.wire == "bfloat16":
            t = self._u32[:n]
            t[:] = raw.view(np.uint16)[:n]
            t <<= 16
            vals = t.view(np.float32)
        else:
            nb = -(-n // Q8_BLOCK)
            blocks = self._blocks[:nb]  # [nb, 32]
            blocks[:] = raw[2 * nb : 2 * nb + nb * Q8_BLOCK].view(np.int8).reshape(nb, Q8_BLOCK)
            blocks *= raw[: 2 * nb].view(np.float16).astype(np.float32)[:, None]
            vals = blocks.reshape(-1)[:n]
        if add:
            out += vals
        else:
            out[:] = vals


class WireBuffers:
    """The star allreduce's bytes for one wire format: a row per message received (rank 0: one per worker;
    a worker: its own partial) and one for the sum on its way back; all preallocated. comm.py moves them;
    this says what they hold."""

    def __init__(self):
        self.codec = Codec("float32", 0)
        self.rows = np.empty((0, 0), dtype=np.uint8)  # [messages + 1, wire bytes]

    def setup(self, wire: str, messages: int, max_elems: int) -> None:
        """Room for `messages` encoded partials of up to max_elems floats, and the sum, as `wire`."""
        self.codec = Codec(wire, max_elems)
        nbytes = self.codec.nbytes(max_elems)
        if self.rows.shape[0] < messages + 1 or self.rows.shape[1] < nbytes:
            self.rows = np.empty((messages + 1, nbytes), dtype=np.uint8)  # [messages + sum, wire bytes]

    @property
    def compressed(self) -> bool:
        return self.codec.wire != "float32"

    def incoming(self, messages: int, n: int) -> np.ndarray:
        """[messages, wire bytes] rows for the partials of n floats to be received into."""
        return self.rows[:messages, : self.codec.nbytes(n)]

    def outgoing(self, buf: np.ndarray) -> np.ndarray:
        """This rank's partial buf [n] encoded, ready to send."""
        out = self.rows[0, : self.codec.nbytes(buf.size)]
        self.codec.encode(buf, out)
        return out

    def add_received(self, received: np.ndarray, buf: np.ndarray) -> None:
        """Rank 0: buf += every decoded partial, in row (rank) order; then, on a compressed wire, buf rounded
        as the workers will decode it, so every rank holds the same values."""
        for row in received:
            self.codec.decode(row, buf, add=True)
        if self.compressed:
            back = self.back(buf)
            self.codec.encode(buf, back)
            self.codec.decode(back, buf)

    def back(self, buf: np.ndarray) -> np.ndarray:
        """The bytes of the sum on its way back from rank 0: buf itself, or its encoding for the wire."""
        if not self.compressed:
            return buf.view(np.uint8)
        return self.rows[-1, : self.codec.nbytes(buf.size)]

    def take_back(self, back: np.ndarray, buf: np.ndarray) -> None:
        """A worker: the sum received as `back` into buf (decoded where the wire is compressed)."""
        if self.compressed:
            self.codec.decode(back, buf)
