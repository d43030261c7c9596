"""Where a rank's weight blocks live while it computes.

`ResidentBlocks` reads every block once into page-aligned buffers. The runtime asks for block b with
`get(b)` right before using it and says `release(b)` right after, so a streaming scheduler with a
sliding window of buffers can take its place without changing the layer loop.
"""

from __future__ import annotations

import mmap

import numpy as np
import torch

from .store import DTYPES, BlockLayout, RankStore

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def aligned_buffer(nbytes: int) -> tuple[mmap.mmap, np.ndarray]:
    """A page-aligned, zeroed byte buffer (anonymous mmap) and a numpy view of it."""
    mm = mmap.mmap(-1, max(nbytes, 1))
    return mm, np.frombuffer(mm, dtype=np.uint8, count=nbytes)


def block_views(buf: np.ndarray, layout: BlockLayout, dtype: str) -> dict[str, torch.Tensor]:
    """Tensors viewing (not copying) each sub-tensor of a block held in buf."""
    td, size = TORCH_DTYPES[dtype], DTYPES[dtype][1]
    base = torch.from_numpy(buf)
    out = {}
    for p in layout.parts:
        n = int(np.prod(p.shape)) * size
        out[p.name] = base[p.offset : p.offset + n].view(td).view(p.shape)
    return out


class ResidentBlocks:
    """All of a rank's blocks in memory, read once at start-up."""

    def __init__(self, store: RankStore):
        self.store = store
        self._bufs, self._views = [], []
        for b in range(store.n_blocks):
            layout = store.layout(b)
            mm, arr = aligned_buffer(layout.nbytes)
            store.read_into(store.block_offset(b), memoryview(mm))
            self._bufs.append(mm)
            self._views.append(block_views(arr, layout, store.dtype))
        self.bytes_read = sum(store.layout(b).nbytes for b in range(store.n_blocks))

    def get(self, b: int) -> dict[str, torch.Tensor]:
        return self._views[b]

    def release(self, b: int) -> None:
        pass

    def close(self) -> None:
        self._views.clear()
