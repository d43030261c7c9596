"""Batched forward passes, and the serve package's pure parts: the control word, request checking and
the memory model's slots (the latency model: test_serve_latency.py)."""

import numpy as np
import pytest
import torch
from harness import prompt_logits, rel_err

from tpimpi.comm import SerialComm
from tpimpi.convert import convert
from tpimpi.engine import Engine, MemoryOptions
from tpimpi.memory import fixed_parts
from tpimpi.serve import api
from tpimpi.sampling import SamplingConfig
from tpimpi.serve.batcher import Batcher, Sequence, common_prefix, control_word, pack, unpack
from tpimpi.shard import plan

PROMPTS = [[1, 9690, 198, 2683, 314, 260, 3575], [1, 520, 9531, 198], [1, 4649, 47, 2, 198, 1, 520, 9531, 198, 42, 7],
           [1, 2683, 314]]


@pytest.fixture(scope="module")
def engine(tiny_gguf, tmp_path_factory):
    st = convert(tiny_gguf, tmp_path_factory.mktemp("batch") / "s1", 1, quiet=True)
    eng = Engine(SerialComm(), st, max_seq=64, mem=MemoryOptions(resident=True, prefill_chunk=4), slots=4).load()
    yield eng
    eng.close()


def run(eng, segments, ids):
    """One batched step: rows of ids for segments [(slot, pos, n)]; the logits of each segment's last row."""
    m = eng.model
    eng.head.embed_into(ids, m.x[: len(ids)])
    x = m.forward_batch(segments)
    last = np.cumsum([n for _, _, n in segments]) - 1
    return torch.stack([eng.head.logits(x[int(r)]).clone() for r in last]).numpy()


def prefill_alone(eng, slot, ids):
    for pos in range(0, len(ids), eng.model.chunk):
        part = ids[pos : pos + eng.model.chunk]
        out = run(eng, [(slot, pos, len(part))], part)
    return out[0]


def test_one_sequence_through_the_batched_path_is_bit_identical(engine, tiny_gguf):
    ref = prompt_logits(engine.model, engine.head, engine.comm, PROMPTS[0])  # forward(): generate's path
    assert np.array_equal(prefill_alone(engine, 3, PROMPTS[0]), ref)


def test_sequences_in_one_step_get_what_they_get_alone(engine):
    alone, nxt = [], []
    for slot, ids in enumerate(PROMPTS[:3]):
        lg = prefill_alone(engine, slot, ids)
        nxt.append(int(np.argmax(lg)))
    for slot, ids in enumerate(PROMPTS[:3]):  # each sequence's next step alone (same cache contents after)
        alone.append(run(engine, [(slot, len(ids), 1)], [nxt[slot]])[0])
    # again in one step: three decode rows at different positions beside a prompt chunk of a fourth
    segs = [(slot, len(ids), 1) for slot, ids in enumerate(PROMPTS[:3])] + [(3, 0, 3)]
    together = run(engine, segs, nxt + PROMPTS[3])
    for j in range(3):
        assert rel_err(together[j], alone[j]) < 1e-4
        assert int(np.argmax(together[j])) == int(np.argmax(alone[j]))
    assert rel_err(together[3], prefill_alone(engine, 3, PROMPTS[3])) < 1e-4
    # the head's one pass for several rows gives each row's logits
    x = torch.randn(3, engine.cfg.hidden)
    batch = engine.head.logits_batch(x).clone()
    for j in range(3):
        assert rel_err(batch[j].numpy(), engine.head.logits(x[j]).numpy()) < 1e-5


@pytest.mark.parametrize("group, window", [(3, 0), (0, 0), (3, 5), (0, 4)])
@pytest.mark.parametrize("slots", [[0, 1, 2, 3], [5, 1, 3, 0]])
def test_decoding_sequences_attend_together_as_they_attend_alone(group, window, slots):
    """attend_decode (one query each of several sequences, in two batched products) against attend (one
    sequence at a time), with whole groups of q heads per KV head and without (each q head's KV head
    given), a sliding window, and cache slots in place (consecutive) or gathered."""
    from tpimpi.layers import DecodeRows, attend, attend_decode

    torch.manual_seed(0)
    n_kv, g, hd, S = 2, 3, 16, 40
    kv_of_q = torch.arange(n_kv * g) // g if group else torch.tensor([1, 0, 1, 1, 0, 0])
    cache_k, cache_v = torch.randn(6, n_kv, S, hd), torch.randn(6, n_kv, S, hd)
    positions = torch.tensor([7, 30, 2, 19])
    q = torch.randn(n_kv * g, len(slots), hd)
    together = attend_decode(q, cache_k, cache_v, DecodeRows(slots, positions.tolist()), kv_of_q, group, window)
    for b, (slot, pos) in enumerate(zip(slots, positions.tolist())):
        alone = attend(q[:, b : b + 1], cache_k[slot], cache_v[slot], pos, kv_of_q, group, window)  # [q, 1, hd]
        assert torch.allclose(together[b], alone[:, 0], atol=1e-6), (b, slot, pos)


def test_resident_float32_matrices_are_held_transposed_and_multiply_alike():
    """A resident float32 matrix is rewritten as [in, out] in its own buffer; matmul_f32 gives the [out,
    in] product for every row count, into `out` or not."""
    from tpimpi.layers import matmul_f32
    from tpimpi.scheduler import transpose_in_place

    w = torch.randn(300, 70)
    buf = w.clone()
    wt = transpose_in_place(buf)
    assert wt.shape == (300, 70) and wt.stride() == (1, 300) and wt.data_ptr() == buf.data_ptr()
    assert torch.equal(wt, w)
    for empty in (torch.empty(0, 70), torch.empty(300, 0)):  # a rank without heads or FFN columns
        assert transpose_in_place(empty).shape == empty.shape
    for T in range(1, 11):
        x = torch.randn(T, 70)
        want = (x.double() @ w.double().T).float()
        got = matmul_f32(x, wt)
        into = matmul_f32(x, wt, out=torch.empty(T, 300))
        assert got.shape == (T, 300) and torch.equal(got, into)
        assert (got - want).abs().max() < 1e-5, T
        assert (matmul_f32(x, w) - want).abs().max() < 1e-5, T  # [out, in] (a streamed block)


def test_control_word_round_trip():
    ctrl = control_word(4)
    segs = [(2, 17, 1), (0, 5, 1), (3, 0, 16)]
    pack(ctrl, segs)
    assert ctrl.dtype == np.int64 and ctrl.shape == (15,) and unpack(ctrl) == segs and ctrl[2] == 18
    pack(ctrl, None)
    assert unpack(ctrl) is None


def test_requests_are_checked_with_their_numbers():
    lim = api.Limits("m", 100, 50)
    r = api.parse_chat({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "stop": "x",
                        "max_completion_tokens": 5, "stream": True, "stream_options": {"include_usage": True}}, lim)
    assert r.messages == (("user", "hi"),) and r.stop == ("x",) and r.max_tokens == 5 and r.include_usage
    assert api.budget(r, 90, lim) == 5 and api.budget(api.parse_completion({"prompt": "p"}, lim), 90, lim) == 10
    for body, status, match in [({"messages": []}, 400, "messages"), ({"messages": [{"role": "bot"}]}, 400, "role"),
                                ({"prompt": "p", "top_p": 0}, 400, "top_p"), ({"prompt": "p", "model": "n"}, 404, "n"),
                                ({"prompt": "p", "n": 2}, 400, "n=1"), ({"prompt": "p", "stop": [1]}, 400, "stop")]:
        with pytest.raises(api.ApiError, match=match) as e:
            (api.parse_chat if "messages" in body else api.parse_completion)(body, lim)
        assert e.value.status == status
    with pytest.raises(api.ApiError, match="maximum context length is 100 tokens.*resulted in 100 tokens"):
        api.budget(r, 100, lim)


def test_the_memory_model_counts_a_kv_cache_per_slot(tiny_gguf):
    from tpimpi.sources import open_source

    cfg = open_source(tiny_gguf).config
    s = plan(cfg.n_heads, cfg.n_kv_heads, cfg.ffn, (1.0,))[0]
    one, eight = fixed_parts(cfg, s, 0, 1, 64, 16), fixed_parts(cfg, s, 0, 1, 64, 16, slots=8)
    assert eight["kv_cache"] == 8 * one["kv_cache"] > 0 and eight["buffers"] > one["buffers"]


def test_a_sliding_window_batched_is_the_window_alone(tmp_path_factory):
    """Mistral's sliding window (4 positions) through the batched path: one sequence bit for bit as forward(),
    two sequences at different positions in one step as each alone."""
    from tinymodels import make_tiny_hf

    d = tmp_path_factory.mktemp("window")
    hf = make_tiny_hf(d / "mistral", arch="mistral", seed=3, sliding_window=4)
    st = convert(hf, d / "s1", 1, quiet=True)
    eng = Engine(SerialComm(), st, max_seq=64, mem=MemoryOptions(resident=True, prefill_chunk=4), slots=2).load()
    try:
        assert eng.model.windows[0] == 4
        a, b = PROMPTS[2], PROMPTS[0]
        assert np.array_equal(prefill_alone(eng, 1, a), prompt_logits(eng.model, eng.head, eng.comm, a))
        prefill_alone(eng, 0, b)
        alone = [run(eng, [(1, len(a), 1)], [5])[0], run(eng, [(0, len(b), 1)], [6])[0]]
        together = run(eng, [(1, len(a), 1), (0, len(b), 1)], [5, 6])
        for j in range(2):
            assert rel_err(together[j], alone[j]) < 1e-4
    finally:
        eng.close()


def test_the_report_tables_serving_runs_against_one_client():
    from tpimpi.report import serve_table

    def row(c, tps, lat, label="batch", t="2026-12-01T00:00:00+00:00"):
        return {"system": "serve", "model": "m", "ranks": 1, "concurrency": c, "label": label, "tokens_per_s": tps,
                "ttft_p50_s": 0.1, "ttft_p99_s": 0.2, "token_p50_s": lat, "token_p99_s": 2 * lat, "time": t}

    table = serve_table([row(1, 20.0, 0.05), row(8, 90.0, 0.08), row(8, 1.0, 1.0, t="2026-11-01T00:00:00+00:00"),
                         row(8, 70.0, 0.06, "target-1.5x")])
    lines = table.splitlines()
    assert len(lines) == 5  # header, rule, one row per point (the older run of a point is not shown)
    assert "| m | 1 | batch | 8 | 90.0 | 4.50 x |  | 100 / 200 | 80.0 / 160.0 | 1.60 x |" in table
    assert lines[-1].startswith("| m | 1 | target-1.5x | 8 | 70.0 | 3.50 x")
    # a newer run on another CPU is a line of its own, its ratio taken against its own single client
    other = [{**row(1, 10.0, 0.1, t="2026-12-02T00:00:00+00:00"), "machine": {"cpu": "AMD EPYC (avx2)"}},
             {**row(8, 20.0, 0.2, t="2026-12-02T00:00:00+00:00"), "machine": {"cpu": "AMD EPYC (avx2)"}}]
    table = serve_table([row(1, 20.0, 0.05), row(8, 90.0, 0.08), *other])
    assert "| m | 1 | batch | 8 | 90.0 | 4.50 x |" in table
    assert "| m (AMD EPYC (avx2)) | 1 | batch | 8 | 20.0 | 2.00 x |" in table
    # the throughput while every client was in flight, beside its own single client's
    steady = [{**row(1, 20.0, 0.05), "steady_tokens_per_s": 21.0}, {**row(8, 90.0, 0.08), "steady_tokens_per_s": 105.0}]
    assert "| m | 1 | batch | 8 | 90.0 | 4.50 x | 105.0, 5.00 x | 100 / 200 |" in serve_table(steady)


def test_steady_throughput_leaves_out_the_ramp_and_the_tail():
    """tpimpi.serve.bench: tokens/s from the last client's first request to the first client's last token."""
    from tpimpi.serve.bench import steady_tokens_per_s, summarize

    reqs = [{"client": 0, "t0": 0.0, "times": [1.0, 2.0, 3.0, 4.0], "tokens": 4},  # in flight 0 .. 4
            {"client": 1, "t0": 1.5, "times": [2.0, 2.5, 3.0, 3.5, 9.0, 10.0], "tokens": 6}]  # 1.5 .. 10
    # the span 1.5 .. 4: chunks at 2, 3, 4 and 2, 2.5, 3, 3.5 -> 7 chunks in 2.5 s, one token per chunk
    assert steady_tokens_per_s(reqs) == pytest.approx(7 / 2.5)
    assert summarize(reqs)["tokens_per_s"] == pytest.approx(10 / 10.0)
    assert steady_tokens_per_s([{**reqs[0], "tokens": 8}]) == pytest.approx(2 * 3 / 3.0)  # 2 tokens a chunk
    assert steady_tokens_per_s([{"client": 0, "t0": 0.0, "times": [], "tokens": 0}]) is None


def test_the_serving_plot_draws_the_newest_cpu_as_ratios_to_one_client():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tpimpi.report import _serve_plot

    def row(c, tps, lat, cpu, t):
        return {"system": "serve", "model": "m", "ranks": 1, "concurrency": c, "label": "batch", "tokens_per_s": tps,
                "ttft_p50_s": 0.1, "ttft_p99_s": 0.2, "token_p50_s": lat, "token_p99_s": 2 * lat, "time": t,
                "machine": {"cpu": cpu}}

    old, new = "2026-12-01T00:00:00+00:00", "2026-12-02T00:00:00+00:00"
    rows = [row(1, 20.0, 0.05, "Xeon", old), row(8, 90.0, 0.08, "Xeon", old),
            row(1, 10.0, 0.1, "EPYC", new), row(8, 30.0, 0.2, "EPYC", new)]
    [(name, fig)] = _serve_plot(plt, rows)
    ax_t, ax_l = fig.axes
    drawn = [ln for ln in ax_t.get_lines() if ln.get_label() == "m, 1 rank"]
    assert len(drawn) == 1 and list(drawn[0].get_ydata()) == [1.0, 3.0]  # the EPYC's own ratio, not the Xeon's
    assert [list(ln.get_ydata()) for ln in ax_l.get_lines() if ln.get_label() == "m, 1 rank"] == [[1.0, 2.0]]
    assert "EPYC" in fig._suptitle.get_text() and name == "serve_vs_concurrency.png"
    plt.close(fig)


def test_a_prompt_takes_the_free_slot_sharing_its_longest_start():
    """The prompt cache's choice (rank 0 only: it compares token ids): the free slot whose held ids share the
    longest prefix with the prompt, never the whole prompt; the latest freed among equals; off, the
    latest freed always and nothing held."""
    assert common_prefix([1, 2, 3], [1, 2, 4], 9) == 2 and common_prefix([1, 2], [1, 2, 3], 9) == 2
    assert common_prefix([1, 2, 3], [1, 2, 3], 2) == 2 and common_prefix([], [1], 0) == 0
    b = Batcher(None, None, 64, 4, 16, 4)
    b.held = {3: [1, 2, 3, 4], 2: [1, 2, 9], 1: [1, 2, 3, 4, 5, 6]}
    assert b.free == [3, 2, 1, 0]
    assert b._take_slot([1, 2, 3, 4, 5, 6]) == (1, 5)  # the whole prompt is there: its last id is fed again
    assert b._take_slot([1, 2, 3, 7]) == (3, 3)
    assert b._take_slot([8, 8]) == (0, 0)  # nothing shared: the latest freed
    assert b._take_slot([1, 2, 9, 9]) == (2, 3)
    off = Batcher(None, None, 64, 2, 16, 4, prompt_cache=False)
    assert off.held is None and off._take_slot([1, 2]) == (0, 0)


def test_under_a_target_sequences_join_one_at_a_time_while_the_prediction_allows():
    """DFTSP admission (rank 0's choice, no model needed): a burst at start-up joins one at a time, each once
    the running ones all decode, and only while the predicted step with it, tail added, stays within the
    target (before anything can be predicted, while the recent steps do)."""
    tok = type("Tok", (), {"stream": lambda self: None, "decode": lambda self, ids: ""})()
    b = Batcher(None, tok, 64, 8, 16, 8, max_token_latency_s=0.050)
    for _ in range(6):
        b.submit(Sequence([1, 2, 3], 4, SamplingConfig(), (), lambda *event: None))

    def decode_all():  # the running sequences' prompts are in: they decode from the next step
        for s in b.active:
            s.out_ids = s.out_ids or [0]

    b._admit()
    b._admit()
    assert len(b.active) == 1  # a burst at start-up: the first prefills alone
    decode_all()
    b.recent_s = 0.055  # nothing predicted yet, and the recent steps are over the target
    b._admit()
    assert len(b.active) == 1
    b.recent_s = 0.032
    b._admit()
    b._admit()
    assert len(b.active) == 2  # the new one is still prefilling: nobody else joins
    decode_all()
    b.latency.coef = (0.030, 0.002, 0.0005)  # learned: 30 ms + 2 ms a decode row
    b._admit()
    assert len(b.active) == 3
    b.latency.over.extend([0.012] * 10)  # steps run 12 ms over the line: 4 rows 50 ms, 5 rows 52 ms
    for _ in range(3):
        decode_all()
        b._admit()
    assert len(b.active) == 4 and len(b.waiting) == 2
