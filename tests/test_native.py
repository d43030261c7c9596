"""The compiled float32 kernel (tpimpi.native): column panels, products of any row count against float64,
each row's result independent of the rows beside it, its build cache, and the BLAS fallback without it."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from tpimpi import native

needs_cc = pytest.mark.skipif(not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")),
                              reason="no C compiler here: tpimpi multiplies with BLAS (tested by the other tests)")


@pytest.fixture(autouse=True)
def one_thread_after():
    yield
    native.threads = 1


@needs_cc
def test_the_kernel_builds_and_loads_here():
    assert native.available(), native.reason
    assert native.kernel_name() == "panels"


@needs_cc
@pytest.mark.parametrize("N, K", [(1, 1), (15, 7), (16, 70), (17, 70), (53, 33), (300, 70), (64, 1)])
def test_products_of_every_row_count_match_float64(N, K):
    torch.manual_seed(N * 100 + K)
    w = torch.randn(N, K)
    p = native.pack_in_place(w.clone())
    assert p.shape == (N, K) and torch.equal(p.unpack(), w)
    for threads in (1, 2, 3):
        native.threads = threads
        for T in (*range(1, 19), 25, 64):
            x = torch.randn(T, K)
            want = (x.double() @ w.double().T).float()
            got = native.matmul(x, p)
            assert got.shape == (T, N)
            assert (got - want).abs().max() <= 1e-5 * max(1.0, want.abs().max()), (threads, T)
            # into a column slice of a wider output (the head writes its chunks so), from strided rows
            wide = torch.full((T, N + 5), 7.0)
            xs = torch.randn(T, 2 * K)[:, :K].copy_(x)
            native.matmul(xs, p, out=wide[:, 2 : 2 + N])
            assert torch.equal(wide[:, 2 : 2 + N], got) and (wide[:, :2] == 7).all() and (wide[:, 2 + N :] == 7).all()


@needs_cc
def test_a_rows_result_does_not_depend_on_the_rows_beside_it():
    """Batched decode gives each sequence the bits it gets alone: a row's sum runs over k in order
    whatever the row count, grouping or number of threads."""
    torch.manual_seed(1)
    w = torch.randn(200, 96)
    p = native.pack_in_place(w.clone())
    x = torch.randn(40, 96)
    native.threads = 1
    alone = torch.cat([native.matmul(x[t : t + 1], p) for t in range(40)])
    for threads in (1, 2, 4):
        native.threads = threads
        for T in (2, 5, 8, 9, 16, 17, 40):
            assert torch.equal(native.matmul(x[:T], p), alone[:T]), (threads, T)


@needs_cc
@pytest.mark.parametrize("threads", [1, 2])
def test_callers_on_several_threads_at_once_get_their_own_products(threads):
    """Ranks run as threads in one process in the tests (and ctypes lets go of the GIL): concurrent calls
    must not share a job."""
    import concurrent.futures

    native.threads = threads
    torch.manual_seed(2)
    ws = [native.pack_in_place(torch.randn(96 + 16 * i, 40)) for i in range(4)]
    xs = [torch.randn(1 + i, 40) for i in range(4)]
    want = [native.matmul(x, w) for x, w in zip(xs, ws)]

    def many(i):
        return all(torch.equal(native.matmul(xs[i], ws[i]), want[i]) for _ in range(300))

    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        assert all(ex.map(many, range(4)))


@needs_cc
def test_packing_reads_rows_back_in_chunks(monkeypatch):
    """pack_in_place with a reader, as the scheduler packs a resident block from the file, a few panels at
    a time; empty matrices (a rank without heads or FFN columns) stay as they are."""
    import tpimpi.scheduler as sched

    monkeypatch.setattr(sched, "TRANSPOSE_CHUNK_BYTES", 16 * 4 * 10)  # 16 rows of 10 at a time
    w = torch.randn(75, 10)
    calls = []

    def read_rows(r0, r1, rows):
        calls.append((r0, r1))
        rows.copy_(w[r0:r1])

    p = native.pack_in_place(torch.zeros(75, 10), read_rows)
    assert calls == [(0, 16), (16, 32), (32, 48), (48, 64), (64, 75)]
    assert torch.equal(p.unpack(), w)
    x = torch.randn(3, 10)
    assert (native.matmul(x, p) - x @ w.T).abs().max() < 1e-5
    for empty in (torch.empty(0, 10), torch.empty(10, 0)):
        e = native.pack_in_place(empty)
        assert e.shape == tuple(empty.shape) and native.matmul(torch.randn(2, empty.shape[1]), e).shape == (2, empty.shape[0])
    assert (native.matmul(torch.randn(2, 0), native.pack_in_place(torch.empty(10, 0))) == 0).all()


@needs_cc
def test_the_build_is_cached_per_source_compiler_and_cpu(tmp_path, monkeypatch):
    """Built once into the cache (TPIMPI_NATIVE_CACHE here; ~/.cache/tpimpi/native by default, whatever
    TPIMPI_CACHE says), under a name that changes with the source, the compiler and the CPU."""
    monkeypatch.setenv("TPIMPI_NATIVE_CACHE", str(tmp_path / "native"))
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    first = native._build(cc)
    assert first.parent == tmp_path / "native" and first.exists()
    assert native._build(cc) == first  # found, not built again
    assert sorted(p.name for p in first.parent.iterdir()) == [first.name]  # no temporary left behind


@needs_cc
def test_a_forked_child_multiplies_on_threads_of_its_own():
    """The worker threads do not survive fork; a child that multiplies with several threads starts its own
    instead of waiting for its parent's."""
    native.threads = 2
    w = native.pack_in_place(torch.randn(64, 32))
    x = torch.randn(4, 32)
    want = native.matmul(x, w)
    pid = os.fork()
    if pid == 0:
        try:
            os._exit(0 if torch.equal(native.matmul(x, w), want) else 3)
        finally:
            os._exit(4)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_without_the_kernel_resident_matrices_go_to_blas(tiny_gguf, tmp_path):
    """TPIMPI_NATIVE=0 (or no compiler): resident float32 matrices are held transposed for BLAS, and the
    logits agree with the kernel's to rounding."""
    code = f"""
import sys, numpy as np, torch
from tpimpi import native
from tpimpi.comm import SerialComm
from tpimpi.convert import convert
from tpimpi.engine import Engine, MemoryOptions
st = convert({str(tiny_gguf)!r}, {str(tmp_path / 's')!r} + sys.argv[1], 1, quiet=True)
eng = Engine(SerialComm(), st, max_seq=32, mem=MemoryOptions(resident=True)).load()
w = eng.blocks.get(1)["wgu"]
print(native.kernel_name(), type(w).__name__)
eng.head.embed_into([1, 520, 9531], eng.model.x[:3])
x = eng.model.forward(3, 0)
np.save({str(tmp_path)!r} + "/logits" + sys.argv[1] + ".npy", eng.head.logits(x[2]).numpy())
"""
    out = {}
    for flag in ("0", "1"):
        env = dict(os.environ, TPIMPI_NATIVE=flag)
        done = subprocess.run([sys.executable, "-c", code, flag], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        out[flag] = done.stdout.split()
    assert out["0"][0] == "blas" and out["0"][-1] == "Tensor"
    if native.available():
        assert out["1"] == ["panels", "Panels"]
    a, b = (np.load(tmp_path / f"logits{flag}.npy", allow_pickle=False) for flag in ("0", "1"))
    assert abs(a - b).max() < 1e-4 and int(a.argmax()) == int(b.argmax())


def test_panels_multiply_without_the_kernel_and_take_other_input_dtypes(monkeypatch):
    """Panels made where the kernel did not build still multiply (through torch, from the unpacked matrix),
    and rows in another dtype are taken as float32."""
    torch.manual_seed(3)
    w = torch.randn(40, 24)
    p = native.pack_in_place(w.clone())
    x = torch.randn(5, 24)
    if native.available():
        assert (native.matmul(x.bfloat16(), p) - x.bfloat16().float() @ w.T).abs().max() < 1e-5
    monkeypatch.setattr(native, "_lib", False)
    assert not native.available()
    assert (native.matmul(x, p) - x @ w.T).abs().max() < 1e-5
    assert (native.matmul(torch.randn(0, 24), p)).shape == (0, 40)
