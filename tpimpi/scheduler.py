"""Where a rank's weight blocks live while it computes: TPI-LLM's sliding-window memory scheduler.

The runtime walks the same cycle of blocks every token (attention and MLP of each layer, then on
rank 0 the output head in chunks), calling `get(b)` right before block b is used and `release(b)`
right after. Blocks marked resident are read once at start-up. The others stream through W
page-aligned buffers: releasing block b hands its buffer to the block W places later in the
cycle, and a background thread fills it with one positional read (which releases the GIL) while
compute and allreduces go on. Compute waits only if that read has not finished. With io "mmap" the
thread maps the block from the page cache instead (faulting its pages in), and compute reads them
there: the same memory, without the copy.

Blocks are handed out in their stored format. A matrix stored narrower than the float32 it is computed in
(quantized, or bfloat16/float16 under --compute float32) comes as a `Packed` weight, which the kernels
multiply a slice of rows at a time; no upcast copy of a block is made. Under --compute bfloat16 resident
q4_0/q4_1/q8_0 blocks are repacked once at load for torch's int4 kernel; streamed ones are repacked
nowhere: a store converted with --int4pack holds them in that kernel's layout already (as `Int4Packed`
views of the buffer the read filled), else they take the exact kernel. Repacking a streamed block on
every pass would cost more than the exact kernel it replaces (tpimpi/quant/kernels.py, int4pack_bytes).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import queue
import threading
import time
import warnings

import numpy as np
import torch

from . import native
from .errors import StoreError, UsageError
from .quant import kernels
from .quant.formats import PACKED, QUANTS, row_bytes
from .quant.kernels import TORCH_FLOATS as TORCH_DTYPES
from .quant.kernels import Packed
from .store import ALIGN, BlockLayout, BlockSpec, RankStore
from .trace import IO_WAIT
IO_MODES = ("cache", "mmap", "direct", "dontneed")


def aligned_buffer(nbytes: int) -> tuple[mmap.mmap, np.ndarray]:
    """A page-aligned, zeroed byte buffer (anonymous mmap) and a numpy view of it."""
    mm = mmap.mmap(-1, max(nbytes, 1))
    return mm, np.frombuffer(mm, dtype=np.uint8, count=nbytes)


def block_views(buf: np.ndarray, layout: BlockLayout, compute: str = "float32") -> dict:
    """The sub-tensors of a block held in buf, as views (never copies): float tensors, or `Packed` weights
    for matrices that are quantized or, with float32 compute, stored as bfloat16/float16."""
    if buf.flags.writeable:
        base = torch.from_numpy(buf)
    else:  # a read-only file mapping (io "mmap"): nothing ever writes to weights
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            base = torch.from_numpy(buf)
    out = {}
    for p in layout.parts:
        raw = base[p.offset : p.offset + p.nbytes]
        if p.fmt in QUANTS:
            out[p.name] = Packed(p.fmt, raw.view(p.shape[0], row_bytes(p.fmt, p.shape[1])), p.shape)
            continue
        if p.fmt in PACKED:  # --int4pack: already in the int4 kernel's layout
            out[p.name] = kernels.int4pack_view(p.fmt, raw, p.shape)
            continue
        t = raw.view(TORCH_DTYPES[p.fmt]).view(p.shape)
        narrow = p.fmt != "float32" and compute == "float32" and len(p.shape) == 2
        out[p.name] = Packed(p.fmt, t, p.shape) if narrow else t
    return out


TRANSPOSE_CHUNK_BYTES = 4 << 20  # rows read back at a time while a resident matrix is transposed


def scratch_rows(scratch: torch.Tensor | None, n: int, k: int) -> torch.Tensor:
    """A [n, k] float32 work area: the front of `scratch` (a flat float32 buffer kept for a whole load) when it
    is large enough, else a new tensor."""
    if scratch is not None and scratch.numel() >= n * k:
        return scratch[: n * k].view(n, k)
    return torch.empty(n, k)


def transpose_in_place(w: torch.Tensor, read_rows=None, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """A resident float32 matrix w [out, in] rewritten in its own buffer as [in, out], returned as the
    [out, in] view of that: the layout `layers.matmul_f32` multiplies fastest for every row count
    (BENCHMARKS.md, "Float32 products of a few rows"). read_rows(r0, r1, rows) fills rows [r1-r0, in] with
    rows r0..r1 of w as stored (read again from the file), so only TRANSPOSE_CHUNK_BYTES are held besides
    the buffer (in `scratch`, if given); without it, the rows come from a transient copy of the whole matrix."""
    n_out, n_in = w.shape
    if w.numel() == 0:  # a rank with no heads or no FFN columns of this layer
        return w
    if read_rows is None:
        src = w.clone()
        read_rows = lambda r0, r1, rows: rows.copy_(src[r0:r1])  # noqa: E731
    dest = w.view(-1).view(n_in, n_out)
    step = max(1, min(n_out, TRANSPOSE_CHUNK_BYTES // (4 * n_in)))
    work = scratch_rows(scratch, step, n_in)
    for r0 in range(0, n_out, step):
        r1 = min(n_out, r0 + step)
        rows = work[: r1 - r0]
        read_rows(r0, r1, rows)
        dest[:, r0:r1] = rows.T
    return dest.T


def transpose_resident(store: RankStore, spec: BlockSpec, views: dict, scratch: torch.Tensor | None = None) -> dict:
    """The block's float32 matrices rewritten in place for the products of a few rows, their rows read back
    from the store's file into `scratch`: in column panels for the compiled kernel
    (tpimpi.native.pack_in_place), or without it transposed for BLAS (transpose_in_place); the other
    tensors as they are."""
    out = dict(views)
    for p in spec.layout.parts:
        w = views[p.name]
        if not (p.name.startswith("w") and isinstance(w, torch.Tensor) and w.dtype == torch.float32 and w.dim() == 2):
            continue
        row0 = spec.offset + p.offset

        def read_rows(r0, r1, rows, row0=row0, n_in=w.shape[1]):
            store.read_into(row0 + r0 * n_in * 4, memoryview(rows.numpy()).cast("B"))

        out[p.name] = (native.pack_in_place if native.available() else transpose_in_place)(w, read_rows, scratch)
    return out


def check_int4pack(store: RankStore, compute: str) -> None:
    """Refuse a store with blocks in the int4 kernel layout (--int4pack) unless the run computes in bfloat16
    and this machine's torch packs int4 tiles in the order the converter's did."""
    fmts = sorted({f for f in store.formats.blocks if f in PACKED})
    if not fmts:
        return
    if compute != "bfloat16":
        raise UsageError(f"store {str(store.directory)!r} keeps its blocks in torch's int4 kernel layout "
                         f"({', '.join(fmts)}: converted with --int4pack), which only --compute bfloat16 "
                         f"multiplies: add --compute bfloat16, or convert without --int4pack for exact products")
    rec, here = store.manifest["int4pack"], kernels.int4pack_layout()
    if rec["layout"] != here["layout"]:
        raise StoreError(f"store {str(store.directory)!r} was packed for torch's int4 kernel as torch "
                         f"{rec['torch'][:20]} lays it out on {rec['cpu_capability'][:20]} (tile order "
                         f"{rec['layout'][:16]}); here torch {here['torch']} on {here['cpu_capability']} "
                         f"packs differently ({here['layout']}): convert it again on this machine, with or "
                         f"without --int4pack")


def evenly_spaced(n: int, k: int) -> set[int]:
    """k of the indices 0..n-1, spread evenly, so the streamed blocks between them are far apart."""
    if k <= 0:
        return set()
    if k >= n:
        return set(range(n))
    return {int(i * n / k) for i in range(k)}


class _Reader:
    """One background thread serving (spec, slot, done-event) jobs in order: a read into the slot's
    buffer, or with io "mmap" a new mapping of the block as the slot's."""

    def __init__(self, store: RankStore, io: str, bufs: list, maps: list):
        self.store, self.io, self.bufs, self.maps = store, io, bufs, maps
        self.fd = store.fd
        self.direct_fd = -1
        if io == "direct":
            try:
                self.direct_fd = os.open(store.path, os.O_RDONLY | os.O_DIRECT)
            except OSError as e:
                raise StoreError(f"{store.path}: cannot open for O_DIRECT ({e.strerror}); this file system may "
                                 f"not support it: use --io dontneed") from None
        self.trace = None  # a trace.Tracer when --trace is on
        self.jobs: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.bytes_read = 0
        self.thread = threading.Thread(target=self._run, name="tpimpi-reader", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            spec, slot, done = job
            t = time.perf_counter()
            try:
                if self.io == "mmap":
                    self.maps[slot] = self._map(spec)
                else:
                    self._read(spec, self.bufs[slot][0])
            except OSError as e:  # handed to the compute thread, which raises it
                self.error = StoreError(f"{self.store.path}: cannot read {spec.name} ({e.strerror or e})")
            except BaseException as e:
                self.error = e
            if self.trace is not None:
                self.trace.add_read(t, time.perf_counter(), spec.layout.nbytes)
            done.set()

    def _map(self, spec: BlockSpec) -> np.ndarray:
        """The block's pages of the file mapped read-only and faulted in now (MAP_POPULATE), not copied:
        compute reads the page cache itself. The mapping goes when its last view does."""
        n = spec.layout.nbytes
        if os.fstat(self.fd).st_size < spec.offset + n:  # past the end a mapping would fault with SIGBUS
            raise OSError(f"the file ends before byte {spec.offset + n}, shorter than the manifest says")
        lead = spec.offset % mmap.ALLOCATIONGRANULARITY  # an untied head's chunks need not start on a page
        mm = mmap.mmap(self.fd, lead + n, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ,
                       offset=spec.offset - lead)
        self.bytes_read += n
        return np.frombuffer(mm, dtype=np.uint8, count=n, offset=lead)

    def _read(self, spec: BlockSpec, mm: mmap.mmap) -> None:
        n = spec.layout.nbytes
        aligned = spec.offset % ALIGN == 0 and n % ALIGN == 0
        fd = self.direct_fd if self.direct_fd >= 0 and aligned else self.fd
        done = 0
        view = memoryview(mm)[:n]
        while done < n:
            got = os.preadv(fd, [view[done:]], spec.offset + done)
            if got <= 0:
                raise OSError(f"short read at byte {spec.offset + done}, the file is shorter than the manifest says")
            done += got
        if self.io != "cache" and fd == self.fd:  # buffered read: drop the pages it brought in
            os.posix_fadvise(self.fd, spec.offset, n, os.POSIX_FADV_DONTNEED)
        self.bytes_read += n

    def submit(self, spec, slot, done) -> None:
        done.clear()
        self.jobs.put((spec, slot, done))

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join()
        if self.direct_fd >= 0:
            os.close(self.direct_fd)


class BlockScheduler:
    """Blocks of one rank: `resident` ones loaded once, the rest streamed through `window` buffers."""

    def __init__(self, store: RankStore, specs: list[BlockSpec], resident: set[int], window: int,
                 io: str = "cache", compute: str = "float32"):
        check_int4pack(store, compute)
        self.store, self.specs, self.compute = store, specs, compute
        self.dtype = store.dtype
        self.trace = None  # a trace.Tracer when --trace is on
        self.io_wait_s = 0.0
        self.bytes_read = 0
        self._resident: dict[int, dict] = {}
        self._keep = []  # the mmaps behind every view
        # one work area for every resident matrix's rewrite, in a mapping of its own that goes back to the
        # system after the load: a new 4 MiB tensor per matrix left glibc's heap up to 136 MiB larger
        # (its mmap threshold rises after the first such free), and the peak RSS above the prediction
        scratch_mm, scratch_arr = aligned_buffer(TRANSPOSE_CHUNK_BYTES if resident else 0)
        scratch = torch.from_numpy(scratch_arr).view(torch.float32)
        for b in sorted(resident):
            mm, arr = aligned_buffer(specs[b].layout.nbytes)
            store.read_into(specs[b].offset, memoryview(mm))
            views = block_views(arr, specs[b].layout, compute)
            if compute == "bfloat16" and all(kernels.can_int4pack(v) for k, v in views.items() if k.startswith("w")):
                # resident q4_0/q4_1/q8_0 blocks (output head chunks too) under --compute bfloat16: repacked
                # once for torch's int4 kernel (q8_0 as two 4-bit planes); the block's buffer goes, only the
                # small norm and bias are copied out of it
                packed = {k: kernels.int4pack(v) if k.startswith("w") else v.clone() for k, v in views.items()}
                del views, arr
                mm.close()
                views = packed
            else:
                views = transpose_resident(store, specs[b], views, scratch)
                self._keep.append(mm)
            self._resident[b] = views
            self.bytes_read += specs[b].layout.nbytes
        del scratch, scratch_arr
        with contextlib.suppress(BufferError):  # (a view still held: it goes when that does)
            scratch_mm.close()
        self.seq = [b for b in range(len(specs)) if b not in resident]  # the streamed cycle
        self.window = min(window, len(self.seq))
        self._reader = None
        if self.seq:
            size = max(specs[b].layout.nbytes for b in self.seq)
            # (mmap, array) per slot that reads fill, or with io "mmap" the slot's current file mapping
            self._bufs = [aligned_buffer(size) for _ in range(self.window)] if io != "mmap" else []
            self._maps: list = [None] * self.window
            self._done = [threading.Event() for _ in range(self.window)]
            self._slot: dict[int, int] = {}
            self._pos = {b: i for i, b in enumerate(self.seq)}
            self._reader = _Reader(store, io, self._bufs, self._maps)
            for i in range(self.window):
                self._schedule(self.seq[i], i)

    def _schedule(self, b: int, slot: int) -> None:
        self._slot[b] = slot
        self._reader.submit(self.specs[b], slot, self._done[slot])

    def get(self, b: int) -> dict[str, torch.Tensor]:
        """The tensors of block b, waiting for its read if it is still under way."""
        views = self._resident.get(b)
        if views is None:
            slot = self._slot[b]
            if not self._done[slot].is_set():
                t = time.perf_counter()
                self._done[slot].wait()
                t1 = time.perf_counter()
                self.io_wait_s += t1 - t
                if self.trace is not None:
                    self.trace.add(IO_WAIT, t, t1, self.specs[b].layout.nbytes)
            if self._reader.error is not None:
                raise self._reader.error
            buf = self._maps[slot] if self._reader.io == "mmap" else self._bufs[slot][1]
            views = block_views(buf, self.specs[b].layout, self.compute)
        return views

    def release(self, b: int) -> None:
        """Block b is done for this token: its buffer goes to the block `window` places later."""
        if b in self._resident:
            return
        slot = self._slot.pop(b)
        nxt = self.seq[(self._pos[b] + self.window) % len(self.seq)]
        self._schedule(nxt, slot)

    @property
    def total_bytes_read(self) -> int:
        return self.bytes_read + (self._reader.bytes_read if self._reader else 0)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
