"""The sliding-window scheduler and the memory modes: every mode gives the same logits (bit for bit where
it holds the matrices alike) and the same tokens, blocks stream through exactly W buffers, read errors surface, and the memory plan holds."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from harness import rel_err, run_store
from threadcomm import ThreadGroup
from tpimpi import native, scheduler, store
from tpimpi.convert import convert
from tpimpi.errors import StoreError, UsageError
from tpimpi.engine import MemoryOptions, memory_plan
from tpimpi.memory import parse_size
from tpimpi.scheduler import BlockScheduler, evenly_spaced

MODES = {
    "resident": MemoryOptions(resident=True),
    "window1": MemoryOptions(window=1),
    "window2": MemoryOptions(window=2),
    "window4-direct": MemoryOptions(window=4, io="direct"),
    "window3-dontneed": MemoryOptions(window=3, io="dontneed"),
    "window2-mmap": MemoryOptions(window=2, io="mmap"),
    "budget-mmap": MemoryOptions(budget=300 << 20, io="mmap"),
    "budget": MemoryOptions(budget=300 << 20),
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def stores(tiny_source, tmp_path_factory):
    root = tmp_path_factory.mktemp("modes")
    return {(w, d): convert(tiny_source, root / f"{w}-{d}", w, dtype=d, quiet=True)
            for w in (1, 3) for d in ("float32", "bfloat16")}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("world", [1, 3])
def test_every_memory_mode_gives_the_same_logits(stores, prompt_ids, world, dtype):
    """Bit for bit between modes that hold the matrices alike. Resident float32 matrices are held
    transposed, a faster kernel's layout (layers.matmul_f32), so streamed, resident and mixed (budget)
    float32 runs agree to rounding and in every token."""
    results = {}
    for name, mem in MODES.items():
        results[name] = ThreadGroup(world).run(lambda c: run_store(stores[world, dtype], c, prompt_ids, 6, mem=mem))[0]
    layout = {name: "any" if dtype != "float32" else name.split("-")[0] if name.startswith("budget") else
              "resident" if name == "resident" else "streamed" for name in MODES}
    for name, (logits, tokens) in results.items():
        alike = next(n for n in MODES if layout[n] == layout[name])
        assert np.array_equal(logits, results[alike][0]), (name, alike)
        assert rel_err(logits, results["resident"][0]) < 1e-5 and tokens == results["resident"][1], name
    ref_logits, ref_tokens = results["resident"]
    # a prompt fed in chunks of 5 positions: other matrix shapes, so equal only to rounding
    mem = MemoryOptions(window=2, prefill_chunk=5)
    logits, tokens = ThreadGroup(world).run(lambda c: run_store(stores[world, dtype], c, prompt_ids, 6, mem=mem))[0]
    assert rel_err(logits, ref_logits) < (1e-5 if dtype == "float32" else 1e-2) and tokens == ref_tokens


def test_bfloat16_store_stays_close_to_float32(stores, prompt_ids):
    f32 = ThreadGroup(1).run(lambda c: run_store(stores[1, "float32"], c, prompt_ids, 1))[0][0]
    for compute in ("float32", "bfloat16"):
        mem = MemoryOptions(window=2, compute=compute)
        bf = ThreadGroup(1).run(lambda c: run_store(stores[1, "bfloat16"], c, prompt_ids, 1, mem=mem))[0][0]
        assert np.abs(bf - f32).max() / np.abs(f32).max() < 0.05
        assert np.argmax(bf) == np.argmax(f32)


def _cycle(sched, n_cycles=3):
    seen = []
    for _ in range(n_cycles):
        for b in range(len(sched.specs)):
            w = next(iter(sched.get(b).values()))
            seen.append(w.unpack() if isinstance(w, native.Panels) else w.clone())  # resident: maybe in panels
            sched.release(b)
    return seen


def test_window_streams_every_block_through_w_buffers(stores):
    rs = store.RankStore(stores[3, "float32"], 0, 3)
    specs = rs.specs(head_chunk_bytes=64 << 10)
    resident = BlockScheduler(rs, specs, set(range(len(specs))), 0)
    want = _cycle(resident, 1)
    for window, keep in [(1, set()), (2, set()), (4, {0, 5})]:
        s = BlockScheduler(rs, specs, keep, window)
        assert len(s._bufs) == window
        got = _cycle(s)
        assert all(torch.equal(a, b) for a, b in zip(got, want * 3))
        streamed = sum(specs[b].layout.nbytes for b in range(len(specs)) if b not in keep)
        # every streamed block once per cycle, plus the window's read-ahead into the next cycle
        assert 3 * streamed <= s.total_bytes_read - sum(specs[b].layout.nbytes for b in keep) <= 4 * streamed
        s.close()


def test_a_read_error_surfaces_in_the_compute_thread(stores, tmp_path):
    import shutil

    path = shutil.copytree(stores[1, "float32"], tmp_path / "s")
    rs = store.RankStore(path, 0, 1)
    specs = rs.specs()
    s = BlockScheduler(rs, specs, set(), 2)
    _cycle(s, 1)
    os.truncate(path / "rank000.safetensors", specs[3].offset + 10)  # the disk loses the file's tail
    with pytest.raises(StoreError, match="rank000.safetensors: cannot read .*short read"):
        _cycle(s, 2)
    s.close()


def test_memory_plans(stores):
    rs = store.RankStore(stores[1, "float32"], 0, 1)
    cfg, sl = rs.cfg, rs.slice
    _, everything = memory_plan(cfg, sl, 0, 1, "float32", 64, MemoryOptions(resident=True))
    assert everything.streamed == 0
    _, w2 = memory_plan(cfg, sl, 0, 1, "float32", 64, MemoryOptions(window=2))
    assert w2.window == 2 and not w2.resident and w2.total < everything.total
    budget = (w2.total + everything.total) // 2
    _, b = memory_plan(cfg, sl, 0, 1, "float32", 64, MemoryOptions(budget=budget))
    assert 0 < len(b.resident) < b.n_blocks and b.total <= budget and b.window == 2
    with pytest.raises(UsageError, match="too small for this rank: before any weights it holds .* lower the context with --max-seq-len"):
        memory_plan(cfg, sl, 0, 1, "float32", 64, MemoryOptions(budget=1 << 20))
    with pytest.raises(UsageError, match="--window 1000 is out of range"):
        memory_plan(cfg, sl, 0, 1, "float32", 64, MemoryOptions(window=1000))


def test_small_pure_helpers():
    assert evenly_spaced(10, 0) == set() and evenly_spaced(10, 10) == set(range(10))
    assert evenly_spaced(10, 2) == {0, 5} and len(evenly_spaced(61, 7)) == 7
    assert parse_size("800M") == 800 << 20 and parse_size("1.5G") == 3 << 29 and parse_size("4096") == 4096
    for bad in ("", "lots", "-1G", "0"):
        with pytest.raises(UsageError):
            parse_size(bad)


@pytest.fixture(scope="module")
def peak_env(model_cache):
    """The command line's environment with the default model's stores for one rank (float32 and bfloat16)
    already made, by another process: the measured run must not hold memory a conversion freed."""
    env = dict(os.environ, TPIMPI_CACHE=str(model_cache))
    env.pop("OMPI_COMM_WORLD_SIZE", None)
    code = "from tpimpi.models import prepare\nfor d in ('float32', 'bfloat16'): prepare(None, 1, dtype=d, quiet=True)"
    subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, check=True)
    return env


@pytest.mark.slow
@pytest.mark.parametrize("mode", [["--resident"], ["--window", "2"], ["--window", "4", "--dtype", "bfloat16"],
                                  ["--window", "2", "--io", "mmap"]])
def test_measured_peak_is_within_8_percent_of_the_prediction(mode, peak_env):
    # a prompt that nearly fills the context, so the prediction's worst case (attention over it) happens
    cmd = [sys.executable, "-m", "tpimpi.generate", "--prompt", "the sea is wide and deep " * 95, "--json",
           "--max-new-tokens", "8", "--max-seq-len", "640"] + mode
    r = json.loads(subprocess.run(cmd, env=peak_env, capture_output=True, check=True).stdout)
    measured, predicted = r["peak_rss_bytes"][0], r["predicted_peak_bytes"]
    # within 3% on the AMD EPYC (2026-12-03); before resident rewrites kept one scratch area, glibc's heap
    # grew in some runs and the resident peak landed 14% over the prediction
    assert abs(measured - predicted) <= 0.08 * measured, (measured, predicted, r["memory"])


@pytest.mark.parametrize("packed", [True, False])
def test_resident_rewrites_read_their_rows_into_the_one_scratch_given(packed):
    """Every row read back while a resident matrix is rewritten lands in the scratch area the load keeps
    (BlockScheduler maps one and unmaps it after the load): a new 4 MiB tensor per matrix left glibc's heap
    up to 136 MiB larger than the weights need."""
    from tpimpi.scheduler import transpose_in_place

    if packed and not native.available():
        pytest.skip(f"no compiled kernel here ({native.reason}): the BLAS layout is checked")
    w = torch.randn(100, 48)
    src = w.clone()
    scratch = torch.empty(64 * 48)
    lo, hi = scratch.data_ptr(), scratch.data_ptr() + scratch.numel() * 4
    seen = []

    def read_rows(r0, r1, rows):
        seen.append(lo <= rows.data_ptr() and rows.data_ptr() + rows.numel() * 4 <= hi)
        rows.copy_(src[r0:r1])

    scheduler.TRANSPOSE_CHUNK_BYTES, before = 32 * 48 * 4, scheduler.TRANSPOSE_CHUNK_BYTES
    try:
        out = (native.pack_in_place if packed else transpose_in_place)(w, read_rows, scratch)
    finally:
        scheduler.TRANSPOSE_CHUNK_BYTES = before
    assert len(seen) > 1 and all(seen)
    assert torch.equal(out.unpack() if packed else out, src)
