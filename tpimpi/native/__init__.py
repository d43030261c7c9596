"""The one compiled kernel: float32 products of a few rows with a resident matrix held in column panels.

Decode multiplies 1 to 16 rows (one per sequence being served) by every weight matrix. BLAS is built for
large products: OpenBLAS's GEMM repacks the weights on every call, so on an AMD EPYC (AVX2) 2 rows cost
1.8x one row and 8 rows 2.2x (BENCHMARKS.md, "Float32 products of a few rows"). panels.c multiplies each
weight vector into every row before loading the next, from a layout made once at load (`pack_in_place`,
in the matrix's own buffer): 8 rows cost 1.4-1.6x one row, and one row as much as BLAS's matrix-vector
product. No library we could use offers this for float32 (fbgemm's small-batch kernel, reachable through
torch, rounds the weights to float16 and is deprecated there).

It is compiled once per machine with the C compiler (`cc`, or $CC) into ~/.cache/tpimpi/native (a name
made of the source's, the compiler's and the CPU's identity, so a shared home on unlike boards gets one
build each) and loaded with ctypes. Without a compiler, or with TPIMPI_NATIVE=0, every product goes to
BLAS as before (`layers.matmul_f32`): the same results to rounding, slower for a few rows.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("panels.c")
NB = 16  # columns per panel (panels.c)
_lib = None  # the loaded library, False when it cannot be had, None before the first try
threads = 1  # threads per product; resources.set_threads sets it
reason = ""  # why the kernel is not in use, when it is not


def _cpu_identity() -> str:
    """What makes code built with -march=native run here: the architecture and the CPU's model and flags."""
    ident = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key = line.split(":", 1)[0].strip().lower()
                if key in ("model name", "flags", "features", "cpu part", "cpu implementer"):
                    ident += line
                if not line.strip() and ident != platform.machine():
                    break  # the first processor's entry is enough
    except OSError:
        pass
    return ident


def _cache_dir() -> Path:
    """$TPIMPI_NATIVE_CACHE, else tpimpi/native in the user's cache directory (not under $TPIMPI_CACHE,
    which tests and jobs point at fresh folders for stores: the kernel would be built again each time)."""
    if os.environ.get("TPIMPI_NATIVE_CACHE"):
        return Path(os.environ["TPIMPI_NATIVE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tpimpi" / "native"


def _build(cc: str) -> Path:
    """The compiled library for this source, compiler and CPU: built if missing (into a temporary name,
    then renamed, so ranks building at once never load a half-written file)."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(SOURCE.read_bytes() + version.encode() + _cpu_identity().encode()).hexdigest()[:16]
    lib = _cache_dir() / f"panels-{platform.machine()}-{key}.so"
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
    os.close(fd)
    try:
        base = [cc, "-O3", "-shared", "-fPIC", "-pthread", "-o", tmp, str(SOURCE)]
        done = subprocess.run(base[:2] + ["-march=native"] + base[2:], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:  # a compiler without -march=native for this CPU
            done = subprocess.run(base, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise OSError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "the compiler failed")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def available() -> bool:
    """Whether the kernel is compiled and loaded (tried once per process); `reason` says why not."""
    global _lib, reason
    if _lib is None:
        _lib = False
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if os.environ.get("TPIMPI_NATIVE", "1") == "0":
            reason = "TPIMPI_NATIVE=0"
        elif not cc:
            reason = "no C compiler (cc)"
        else:
            try:
                lib = ctypes.CDLL(str(_build(cc)))
                fn = lib.tpimpi_panels_mm
                size, ptr = ctypes.c_size_t, ctypes.c_void_p
                fn.argtypes = [ptr, size, size, size, ptr, size, ptr, size, ctypes.c_int]
                fn.restype = ctypes.c_int
                _lib = fn
            except (OSError, subprocess.SubprocessError) as e:
                reason = f"the kernel did not build: {e}"
    return bool(_lib)


def kernel_name() -> str:
    """What multiplies resident float32 matrices in this process, for the results."""
    return "panels" if available() else f"blas ({reason})"


class Panels:
    """A float32 matrix W [N, K] held in column panels (panels.c): `data` is its own buffer, N*K floats."""

    def __init__(self, data: torch.Tensor, shape: tuple[int, int]):
        self.data, self.shape = data, tuple(shape)
        self.dtype = torch.float32

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def unpack(self) -> torch.Tensor:
        """W [N, K] as a new tensor (tests and the rare caller that needs rows)."""
        N, K = self.shape
        full = N // NB * NB
        w = torch.empty(N, K)
        w[:full] = self.data[: full * K].view(N // NB, K, NB).transpose(1, 2).reshape(full, K)
        w[full:] = self.data[full * K :].view(K, N - full).T
        return w


def pack_in_place(w: torch.Tensor, read_rows=None, scratch: torch.Tensor | None = None) -> Panels:
    """The float32 matrix w [N, K] rewritten in its own buffer as column panels. read_rows(r0, r1, rows)
    fills rows [r1-r0, K] with rows r0..r1 of w as stored (read again from the file), so only `chunk` rows
    are held besides the buffer (in `scratch`, if given: scheduler.scratch_rows); without it, the rows come
    from a transient copy of the whole matrix."""
    N, K = w.shape
    data = w.view(-1)
    if w.numel() == 0:
        return Panels(data, (N, K))
    if read_rows is None:
        src = w.clone()
        read_rows = lambda r0, r1, rows: rows.copy_(src[r0:r1])  # noqa: E731
    from ..scheduler import TRANSPOSE_CHUNK_BYTES, scratch_rows

    step = max(NB, TRANSPOSE_CHUNK_BYTES // (4 * K) // NB * NB)  # whole panels at a time
    work = scratch_rows(scratch, min(step, N), K)
    full = N // NB * NB
    for r0 in range(0, N, step):
        r1 = min(N, r0 + step)
        rows = work[: r1 - r0]
        read_rows(r0, r1, rows)
        f1 = min(r1, full)
        if f1 > r0:  # whole panels r0/NB .. f1/NB: [panels, NB, K] -> [panels, K, NB]
            data[r0 * K : f1 * K].view((f1 - r0) // NB, K, NB).copy_(rows[: f1 - r0].view(-1, NB, K).transpose(1, 2))
        if r1 > full:  # the last, narrower panel: [K, N - full]
            data[full * K :].view(K, N - full).copy_(rows[full - r0 :].T)
    return Panels(data, (N, K))


def matmul(x: torch.Tensor, w: Panels, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, K] float32 @ W.T -> [T, N] (into out, which may be a column slice of a wider matrix)."""
    T, K = x.shape
    N = w.shape[0]
    assert K == w.shape[1]
    if x.dtype != torch.float32:
        x = x.float()
    if x.stride(1) != 1 or x.stride(0) < K:
        x = x.contiguous()
    y = torch.empty(T, N) if out is None else out
    assert y.shape == (T, N) and y.stride(1) == 1 and y.dtype == torch.float32
    if not (T and N and K):
        return y.zero_()
    if not available():  # panels made by hand where the kernel does not build: correct, not fast
        return torch.mm(x, w.unpack().T, out=y)
    _lib(x.data_ptr(), T, K, x.stride(0), w.data.data_ptr(), N, y.data_ptr(), y.stride(0), threads)
    return y
