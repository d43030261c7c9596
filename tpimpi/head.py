"""Rank 0's private part: token embedding, final norm and output head. No other rank ever holds these.

Embedding rows are read from rank 0's file for just the tokens being fed (a few KB per token), so the
table is never held whole. The output head (the embedding table itself when tied) is a run of chunk
blocks after the last layer in rank 0's block cycle: resident or streamed like any other block, and
multiplied chunk by chunk in both cases, so every memory mode gives bit-identical logits. A quantized
embedding is dequantized row by row as it is read; a quantized head chunk goes through tpimpi.quant's
sliced kernel.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .errors import StoreError
from .layers import matmul_f32, rms_norm
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
        xn = rms_norm(x, self.norm, self.cfg.norm_eps)  # [T, h]
        out = torch.empty(x.shape[0], self.cfg.vocab)  # [T, V]
        r0 = 0
        for b in self.chunks:
            w = self.blocks.get(b)["w"]  # [rows, h]
            r1 = r0 + w.shape[0]
            if isinstance(w, (kernels.Packed, kernels.Int4Packed)):
                out[:, r0:r1] = kernels.matmul(xn, w)
            elif w.dtype == torch.float32:
                matmul_f32(xn, w, out=out[:, r0:r1])  # as in layers.linear
            else:
                out[:, r0:r1] = (xn.to(w.dtype) @ w.T).float()
            self.blocks.release(b)
            r0 = r1
        if not math.isfinite(out[:, : self.n_tokens].sum()):
            raise StoreError(f"{self.store.path}: the logits are not finite (NaN or infinity) although the hidden "
                             f"state is: rank 0's output head or final norm is damaged; run again with --verify "
                             f"to check every file against the manifest")
        out[:, self.n_tokens :] = float("-inf")
        return out

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [h] last hidden state -> logits [V] (a buffer the next call reuses)."""
        xn = rms_norm(x.unsqueeze(0), self.norm, self.cfg.norm_eps)[0]  # [h]
        r0 = 0
        for b in self.chunks:
            w = self.blocks.get(b)["w"]  # [rows, h]
            r1 = r0 + w.shape[0]
            if isinstance(w, (kernels.Packed, kernels.Int4Packed)):  # quantized, or bf16/f16 in float32
                kernels.matmul(xn.unsqueeze(0), w, out=self.logits_buf[r0:r1].unsqueeze(0))
            elif w.dtype == torch.float32:
                np.matmul(w.numpy(), xn.numpy(), out=self.logits_buf[r0:r1].numpy())  # BLAS, as in layers.linear
            else:
                self.logits_buf[r0:r1] = torch.mv(w, xn.to(w.dtype))
            self.blocks.release(b)
            r0 = r1
        if not math.isfinite(self.logits_buf[: self.n_tokens].sum()):
            raise StoreError(f"{self.store.path}: the logits are not finite (NaN or infinity) although the hidden "
                             f"state is: rank 0's output head or final norm is damaged; run again with --verify "
                             f"to check every file against the manifest")
        self.logits_buf[self.n_tokens :] = float("-inf")
        return self.logits_buf

    def logits_batch(self, x: torch.Tensor) -> torch.Tensor:
        """x [n, h] last hidden states of n sequences -> logits [n, V] in one pass over the head (a buffer the
        next call reuses). One row goes through `logits`, so a batch of one gives its values bit for bit."""
        n = x.shape[0]
        if n == 1:
            return self.logits(x[0]).unsqueeze(0)
        if self.batch_buf.shape[0] < n:
            self.batch_buf = torch.empty(n, self.cfg.vocab)  # [n, V]
        out = self.batch_buf[:n]  # [n, V]
        xn = rms_norm(x, self.norm, self.cfg.norm_eps)  # [n, h]
        r0 = 0
        for b in self.chunks:
            w = self.blocks.get(b)["w"]  # [rows, h]
            r1 = r0 + w.shape[0]
            if isinstance(w, (kernels.Packed, kernels.Int4Packed)):  # quantized, or bf16/f16 in float32
                kernels.matmul(xn, w, out=out[:, r0:r1])
            elif w.dtype == torch.float32:
                matmul_f32(xn, w, out=out[:, r0:r1])  # [n, rows], as in layers.linear
            else:
                out[:, r0:r1] = torch.nn.functional.linear(xn.to(w.dtype), w).float()
            self.blocks.release(b)
            r0 = r1
        if not math.isfinite(out[:, : self.n_tokens].sum()):
            raise StoreError(f"{self.store.path}: the logits are not finite (NaN or infinity) although the hidden "
                             f"states are: rank 0's output head or final norm is damaged; run again with --verify "
                             f"to check every file against the manifest")
        out[:, self.n_tokens :] = float("-inf")
        return out
