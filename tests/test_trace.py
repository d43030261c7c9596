"""Per-token traces: what --trace records adds up, the file reads back, and the timeline draws."""

import numpy as np
import pytest
from harness import NoStopTokenizer

from tpimpi import comm as comm_mod
from tpimpi import trace
from tpimpi.convert import convert
from tpimpi.engine import Engine, MemoryOptions, decode_loop
from tpimpi.plan import make_plan
from tpimpi.planner.devices import Device, Profile
from tpimpi.planner.search import Settings
from tpimpi.sampling import SamplingConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def store(tiny_source, tmp_path_factory):
    return convert(tiny_source, tmp_path_factory.mktemp("trace") / "s", 1, quiet=True)


def _run(store, prompt_ids, n_new, tracing):
    comm = comm_mod.SerialComm()
    eng = Engine(comm, store, max_seq=64, mem=MemoryOptions(window=2, prefill_chunk=8)).load()
    for d in eng.blocks._done:  # the window's first reads are done before tracing starts
        d.wait()
    reader = eng.blocks._reader
    read0 = reader.bytes_read
    tr = trace.attach(eng, comm) if tracing else None
    decode_loop(comm, eng.model, eng.head, NoStopTokenizer(), prompt_ids, SamplingConfig(), n_new, 64, stream=False)
    eng.close()
    return eng, tr, reader.bytes_read - read0  # after close: the reader thread has ended


def test_trace_adds_up_and_reads_back(store, prompt_ids, tmp_path):
    eng, tr, read = _run(store, prompt_ids, 4, True)
    path = str(tmp_path / "t.h5")
    trace.write(comm_mod.SerialComm(), tr, path, {"allreduce": "star", "hidden": eng.cfg.hidden, "model": "tiny"})
    t = trace.read(path)
    st = t["steps"]
    n_pre = -(-len(prompt_ids) // 8)
    assert list(st["positions"]) == [8] * (n_pre - 1) + [len(prompt_ids) - 8 * (n_pre - 1)] + [1] * 3
    assert np.all(st["end"] > st["start"]) and np.all(st["start"][1:, 0] >= st["end"][:-1, 0])
    parts = st["compute_s"] + st["io_wait_s"] + st["allreduce_s"]
    np.testing.assert_allclose(parts, st["end"] - st["start"], rtol=1e-6)
    assert np.all(st["compute_s"] > 0) and np.all(st["allreduce_s"] >= 0)
    ev = t["events"]
    assert ev[ev[:, 2] == trace.READ, 5].sum() == read  # every byte the reader read, once
    n_ar = (ev[:, 2] == trace.ALLREDUCE).sum()
    assert n_ar == 2 * eng.cfg.n_layers * len(st["positions"])  # two allreduces per layer per pass
    assert t["attrs"]["ranks"] == 1 and not (tmp_path / "t.h5.tmp").exists()


def test_tracing_off_records_nothing(store, prompt_ids):
    eng, tr, _ = _run(store, prompt_ids, 2, False)
    assert tr is None and eng.model.trace is None and eng.blocks.trace is None


def test_timeline_draws_the_prediction_beside_the_run(store, prompt_ids, tmp_path):
    pytest.importorskip("matplotlib", reason="the timeline is a matplotlib plot")
    eng, tr, _ = _run(store, prompt_ids, 4, True)
    dev = Device("h", {"float32": 4e9}, {"float32": 5e10}, 1e-4, 1e-4, 8 << 30, 5e8, 4e9)
    plan = make_plan(eng.cfg, Profile((dev,)), Settings(max_seq=64, chunk=8), explain=False)
    plan["ranks"][0]["mode"] = {"kind": "window", "window": 2, "budget": None}
    path = str(tmp_path / "t.h5")
    trace.write(comm_mod.SerialComm(), tr, path, {"allreduce": "star", "hidden": eng.cfg.hidden, "plan": plan})
    png = tmp_path / "t.png"
    text = trace.draw_timeline(path, str(png))
    assert png.stat().st_size > 10_000 and "measured" in text and "predicted" in text
    events, s_tok = trace.predicted_events(trace.read(path))
    kinds = {e[2] for e in events}
    assert {"compute", "read", "allreduce"} <= kinds and s_tok > 0
