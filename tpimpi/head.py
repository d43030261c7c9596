"""Rank 0's private part: token embedding, final norm and output head. No other rank ever holds these.

Embedding rows are read from rank 0's file for just the tokens being fed (a few KB per token), so the
table is never held whole. The output head (the embedding table itself when tied) is a run of chunk
blocks after the last layer in rank 0's block cycle: resident or streamed like any other block (a resident
float32 chunk held transposed, as every resident float32 matrix is), and multiplied chunk by chunk in
both cases. A quantized
embedding is dequantized row by row as it is read; a quantized head chunk goes through tpimpi.quant's
sliced kernel.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .errors import StoreError
from .layers import linear, rms_norm
from .quant import formats as qf
from .quant import kernels
from .scheduler import TORCH_DTYPES
from .store import RankStore


class Head:
    """Embedding lookup and logits on rank 0; the head's chunks are blocks `chunks` of `blocks`."""

    def __init__(self, store: RankStore, blocks, chunks: range, n_tokens: int | None = None):
        cfg = store.cfg
        # rows past the tokenizer's vocabulary (padding, or a synthetic model) are never sampled
        self.n_tokens = min(n_tokens or cfg.vocab, cfg.vocab)
        self.cfg, self.store, self.blocks, self.chunks = cfg, store, blocks, chunks
        self.embed_fmt = store.formats.embed
        self.row_bytes = qf.row_bytes(self.embed_fmt, cfg.hidden)
        norm = store.read_tensor("final_norm")
        self.norm = torch.from_numpy(norm).view(TORCH_DTYPES[store.formats.final_norm]).float()  # [h]
        self.logits_buf = torch.empty(cfg.vocab)  # [V]
        self._rows = np.empty(0, dtype=np.uint8)  # [T * row bytes], grows to the longest chunk fed
        self.batch_buf = torch.empty(0, cfg.vocab)  # [n, V] logits of several rows, grows to the largest batch

    def embed_into(self, ids: list[int], out: torch.Tensor) -> None:
        """out [T, h] <- embedding rows of ids, read from disk."""
        n = len(ids) * self.row_bytes
        if self._rows.size < n:
            self._rows = np.empty(n, dtype=np.uint8)
        rows = self._rows[:n]
        self.store.embed_rows_into(ids, rows)
        kernels.rows_to_float32(self.embed_fmt, torch.from_numpy(rows).view(len(ids), self.row_bytes), out)
        if not math.isfinite(out.sum()):
            raise StoreError(f"{self.store.path}: the embedding rows of the input are not finite (NaN or infinity): "
                             f"rank 0's weight file is damaged; run again with --verify to check it against the manifest")

    def logits_rows(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, h] hidden states -> logits [T, V] of every position, in one pass over the head's chunks
        (tpimpi.eval scores every position of a text; generation needs only the last, in logits)."""
        return self._logits_into(x, torch.empty(x.shape[0], self.cfg.vocab))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [h] last hidden state -> logits [V] (a buffer the next call reuses)."""
        return self._logits_into(x.unsqueeze(0), self.logits_buf.unsqueeze(0))[0]

    def logits_batch(self, x: torch.Tensor) -> torch.Tensor:
        """x [n, h] last hidden states of n sequences -> logits [n, V] in one pass over the head (a buffer the
        next call reuses). One row goes through `logits`, so a batch of one gives its values bit for bit."""
        n = x.shape[0]
        if n == 1:
            return self.logits(x[0]).unsqueeze(0)
        if self.batch_buf.shape[0] < n:
            self.batch_buf = torch.empty(n, self.cfg.vocab)  # [n, V]
        return self._logits_into(x, self.batch_buf[:n])

    def _logits_into(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out [T, V] <- logits of hidden states x [T, h]: the final norm, then the head a chunk at a time
        through the kernel its format takes (layers.linear); padding columns past the tokenizer's
        vocabulary at -inf. Non-finite logits from finite hidden states mean a damaged head or norm."""
        xn = rms_norm(x, self.norm, self.cfg.norm_eps)  # [T, h]
        r0 = 0
        for b in self.chunks:
            w = self.blocks.get(b)["w"]  # [rows, h]
            r1 = r0 + w.shape[0]
            linear(xn, w, out=out[:, r0:r1])  # [T, rows]
            self.blocks.release(b)
            r0 = r1
        if not math.isfinite(out[:, : self.n_tokens].sum()):
            raise StoreError(f"{self.store.path}: the logits are not finite (NaN or infinity) although the hidden "
                             f"state{' is' if x.shape[0] == 1 else 's are'}: rank 0's output head or final norm is "
                             f"damaged; run again with --verify to check every file against the manifest")
        out[:, self.n_tokens :] = float("-inf")
        return out
