"""Quantized blocks: GGUF's Q8_0/Q4_0/Q4_1 kept byte for byte, the sliced kernel equal to the gguf
package's dequantization, quantized and mixed stores against transformers at several rank counts and
memory modes, and the refusals (unsupported types, dimensions that do not divide, damaged blocks)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import tinymodels as tm
from harness import rel_err, run_store
from quantmodels import requantize_gguf
from threadcomm import ThreadGroup
from tpimpi import convert as convert_mod
from tpimpi import store
from tpimpi.convert import convert
from tpimpi.engine import MemoryOptions
from tpimpi.errors import StoreError
from tpimpi.quant import formats as qf
from tpimpi.quant import kernels
from tpimpi.shard import plan
from tpimpi.sources import unpermute_qk

pytestmark = pytest.mark.usefixtures("one_thread")
QUANTS = ("q8_0", "q4_0", "q4_1")


def _gguf_types():
    import gguf

    return gguf.GGMLQuantizationType


def _record_tensor(t: qf.QTensor) -> torch.Tensor:
    """A QTensor as the store keeps it: row records in a uint8 tensor [rows, row bytes]."""
    raw = np.frombuffer(qf.to_bytes(t, t.fmt), dtype=np.uint8)
    return torch.from_numpy(raw.reshape(t.shape[0], -1).copy())


# ---- formats and kernel: pure functions ----------------------------------------------------------


@pytest.mark.parametrize("fmt", QUANTS)
def test_kernel_dequantizes_exactly_as_gguf_does(fmt):
    rng = np.random.default_rng(0)
    a = (rng.standard_normal((37, 160)) * rng.uniform(0.01, 3, (37, 1))).astype(np.float32)
    t = qf.quantize(a, fmt)
    rec = _record_tensor(t)
    assert np.array_equal(qf.rows_to_blocks(fmt, rec.numpy()), t.data)  # the same bytes, regrouped
    ref = qf.dequantize(t)
    out = torch.empty(37, 160)
    kernels.dequantize_into(fmt, rec, out, torch.empty(37 * 80, dtype=torch.uint8))
    assert np.array_equal(out.view(torch.int32).numpy(), ref.view(np.int32))  # bit for bit, zeros' signs too
    if fmt != "q8_0":  # the planar candidate: the same values, each row's low nibbles first
        raw = torch.cat([torch.zeros(37, 2, dtype=torch.uint8), rec], 1)[:, 2:]  # rows off 4-byte boundaries
        kernels.dequantize_planar(fmt, raw, out, *kernels._SCRATCH.planar(37 * 160))
        planar = kernels.planar_order(torch.from_numpy(ref))
        assert np.array_equal(out.view(torch.int32).numpy(), planar.view(torch.int32).numpy())
    for T in (1, 5):
        x = torch.from_numpy(rng.standard_normal((T, 160)).astype(np.float32))
        y = kernels.matmul(x, kernels.Packed(fmt, rec, (37, 160)))
        assert rel_err(y.numpy(), x.numpy() @ ref.T) < 1e-6
        assert rel_err(kernels.matmul(x, kernels.Packed(fmt, rec, (37, 160)), planar=True).numpy(), y.numpy()) < 1e-6


def test_kernel_works_a_slice_at_a_time_and_on_empty_matrices(monkeypatch):
    monkeypatch.setattr(kernels, "SLICE_ELEMS", 64 * 3)  # 3 rows of 64 per slice: many slices
    monkeypatch.setattr(kernels, "_SCRATCH", kernels._Scratch())
    a = np.random.default_rng(1).standard_normal((10, 64)).astype(np.float32)
    t = qf.quantize(a, "q4_1")
    x = torch.randn(2, 64)
    y = kernels.matmul(x, kernels.Packed("q4_1", _record_tensor(t), (10, 64)))
    assert kernels._SCRATCH.f32.numel() == 64 * 3
    assert rel_err(y.numpy(), x.numpy() @ qf.dequantize(t).T) < 1e-6
    empty = kernels.Packed("q4_1", torch.empty(0, 40, dtype=torch.uint8), (0, 64))
    assert kernels.matmul(x, empty).shape == (2, 0)
    no_cols = kernels.Packed("q8_0", torch.empty(5, 0, dtype=torch.uint8), (5, 0))
    assert not kernels.matmul(torch.randn(2, 0), no_cols).any()


def test_bfloat16_weights_in_float32_use_a_bounded_slice():
    w = torch.randn(300, 64).bfloat16()
    x = torch.randn(3, 64)
    y = kernels.matmul(x, kernels.Packed("bfloat16", w, (300, 64)))
    assert torch.allclose(y, x @ w.float().T, rtol=1e-5, atol=1e-5)


def test_q8_0_planes_hold_its_integers_exactly():
    """q8_0 under --compute bfloat16: q = 16 * hi + lo for every int8, and through torch's int4 kernel
    (scales 1, zeros 0 and 8 in place of 16d/0 and d/8d) the packed planes give back q exactly."""
    every = torch.arange(-128, 128, dtype=torch.int8)
    hi, lo = kernels.q8_planes(every)
    assert hi.min() >= 0 and hi.max() <= 15 and lo.min() >= 0 and lo.max() <= 15
    assert torch.equal(16 * (hi - 8) + lo, every.to(torch.int32))
    q = torch.cat([every, every.flip(0)]).view(16, 32)  # [16, 32]: every int8 twice, -128 included
    rec = torch.cat([q.view(torch.uint8), torch.ones(16, 1, dtype=torch.float16).view(torch.uint8)], 1)
    w = kernels.int4pack(kernels.Packed("q8_0", rec, (16, 32)))
    assert w.planes == 2 and w.packed.shape == (2, 16, 16)
    assert kernels.int4pack_nbytes("q8_0", (16, 32)) == w.packed.numel() + w.scales_zeros.numel() * 2 == 16 * 40
    eye = torch.eye(32).bfloat16()
    hi, lo = (torch.ops.aten._weight_int4pack_mm_for_cpu(eye, w.packed[p], 32,
                                                         torch.tensor([[[1.0, zero]] * 16]).bfloat16()).T.float()
              for p, zero in ((0, 0.0), (1, 8.0)))  # [16, 32] each: scale 1 gives the integers
    assert torch.equal(16 * hi + lo, q.float())


@pytest.mark.parametrize("fmt", QUANTS)
def test_int4_kernel_matches_the_exact_product_within_bfloat16(fmt):
    rng = np.random.default_rng(2)
    a = (rng.standard_normal((80, 160)) * rng.uniform(0.01, 3, (80, 1))).astype(np.float32)  # 2 x 80 rows: not tiles of 64
    t = qf.quantize(a, fmt)
    w = kernels.int4pack(kernels.Packed(fmt, _record_tensor(t), (80, 160)))
    assert w.planes == (2 if fmt == "q8_0" else 1)
    assert w.packed.numel() + 2 * w.scales_zeros.numel() == kernels.int4pack_nbytes(fmt, (80, 160))
    x = torch.from_numpy(rng.standard_normal((3, 160)).astype(np.float32))
    ref = x.numpy() @ qf.dequantize(t).T
    err = rel_err(kernels.matmul(x, w).numpy(), ref)
    assert 0 < err < 1e-2  # bfloat16 activations, scales and results: about 3 significant digits


def test_float32_products_by_row_count_agree_and_fill_a_view():
    """layers.matmul_f32 takes numpy at T = 1, torch at T = 2..7, numpy's W @ x.T from 8: all the product."""
    from tpimpi.layers import TORCH_ROWS, matmul_f32

    w = torch.randn(100, 64)
    for T in (1, TORCH_ROWS.start, TORCH_ROWS.stop - 1, TORCH_ROWS.stop, 33):
        x = torch.randn(T, 64)
        y = matmul_f32(x, w)
        assert y.shape == (T, 100) and y.is_contiguous()
        assert rel_err(y.numpy(), x.double().numpy() @ w.double().numpy().T) < 1e-6
        logits = torch.zeros(T, 300)
        matmul_f32(x, w, out=logits[:, 50:150])  # a column range of a wider buffer, as the head fills
        assert torch.equal(logits[:, 50:150], y) and not logits[:, :50].any() and not logits[:, 150:].any()


def test_memory_plan_counts_resident_blocks_as_repacked_under_bfloat16_compute():
    from tpimpi.store import BlockLayout, Part

    head = Part("w", (1024, 576), 0, "q8_0")  # a chunk of the default model's tied Q8_0 head
    lay = BlockLayout((head,), head.nbytes)
    assert kernels.resident_nbytes(lay, "float32") == lay.nbytes == 1024 * 18 * 34
    assert kernels.resident_nbytes(lay, "bfloat16") == 1024 * 18 * 40  # two planes of nibbles, scales, zeros
    odd = Part("w", (1000, 576), 0, "q8_0")  # rows not a multiple of 16: not repacked, kept as stored
    assert kernels.resident_nbytes(BlockLayout((odd,), odd.nbytes), "bfloat16") == odd.nbytes


def test_format_specs_round_trip():
    cfg = store.ModelConfig("llama", 3, 64, 2, 2, 32, 64, 100, 1e4, 1e-5, 64, False)
    mixed = store.Formats(("q8_0", "q8_0", "q4_1", "float32", "q4_0", "q4_0"), "q8_0", "bfloat16")
    assert store.Formats.parse(mixed.spec(), cfg) == mixed
    assert store.Formats.parse("q4", cfg) == store.Formats.uniform("q4_1", cfg)
    for bad in ("q3_0", "blocks=q4_1*5;embed=q8_0", "blocks=q4_1*x;embed=q8_0"):
        with pytest.raises(StoreError):
            store.Formats.parse(bad, cfg)


@pytest.mark.parametrize("ratios", [(1,) * 7, (3, 1, 1), (1,) * 8, (5, 2, 2, 1, 1)])
def test_quantized_split_keeps_whole_groups(ratios):
    for ffn in (192, 1536, 28672):
        slices = plan(9, 3, ffn, ratios, granule=qf.GROUP)
        assert slices[0].ffn[0] == 0 and slices[-1].ffn[1] == ffn
        assert all(s.ffn[0] % qf.GROUP == 0 and s.ffn[1] % qf.GROUP == 0 for s in slices)
        assert all(a.ffn[1] == b.ffn[0] for a, b in zip(slices, slices[1:]))


def test_float32_compute_of_bfloat16_blocks_holds_a_slice_not_a_block():
    """The Llama-2-70B shape at 8 ranks, window 2: an MLP block upcast whole was a 352 MB transient."""
    from tpimpi.engine import memory_plan
    from tpimpi.synth import shape_config

    cfg = shape_config("llama2-70b", 80)
    s = plan(cfg.n_heads, cfg.n_kv_heads, cfg.ffn, (1,) * 8)[0]
    _, mp = memory_plan(cfg, s, 0, 8, "bfloat16", 512, MemoryOptions(window=2))
    assert mp.parts["scratch"] < 2 << 20 and mp.parts["weights"] > 100 * mp.parts["scratch"]


# ---- GGUF kept as it is --------------------------------------------------------------------------

LAYER_TYPES = ("Q8_0", "Q4_0", "Q4_1", "F32")  # layer i's matrices


@pytest.fixture(scope="module")
def quant_hf(tmp_path_factory):
    return tm.make_tiny_hf(tmp_path_factory.mktemp("qhf") / "llama", seed=3, n_layers=4, hidden=128, n_heads=4,
                           n_kv_heads=2, ffn=192, tie=False)


@pytest.fixture(scope="module")
def f32_gguf(quant_hf, tmp_path_factory):
    return tm.make_tiny_gguf(tmp_path_factory.mktemp("qf32") / "f32.gguf", hf_dir=quant_hf)


@pytest.fixture(scope="module")
def mixed_gguf(f32_gguf):
    """Layers in Q8_0, Q4_0, Q4_1 and F32; the embedding Q8_0, the head Q4_1."""
    T = _gguf_types()

    def type_of(name):
        if name == "token_embd.weight":
            return T.Q8_0
        if name == "output.weight":
            return T.Q4_1
        return T[LAYER_TYPES[int(name.split(".")[1])]]

    return requantize_gguf(f32_gguf, f32_gguf.parent / "mixed.gguf", type_of)


@pytest.fixture(scope="module")
def mixed_n2(mixed_gguf, tmp_path_factory):
    return convert(mixed_gguf, tmp_path_factory.mktemp("mixed") / "n2", 2, dtype="auto", quiet=True)


def _blocks_of(rs, b: int, name: str, fmt: str) -> np.ndarray:
    """A quantized sub-tensor of block b as GGUF blocks, read from the rank file."""
    lay = rs.layout(b)
    p = lay.part(name)
    buf = np.empty(lay.nbytes, dtype=np.uint8)
    rs.read_into(rs.block_offset(b), memoryview(buf))
    return qf.rows_to_blocks(fmt, buf[p.offset : p.offset + p.nbytes].reshape(p.shape[0], -1))


@pytest.fixture(scope="module")
def mixed_ref(mixed_gguf, prompt_ids):
    m = tm.hf_model(mixed_gguf)  # transformers dequantizes every tensor with the gguf package
    return tm.hf_last_logits(m, prompt_ids), tm.hf_greedy(m, prompt_ids, 6)


def test_gguf_quantized_tensors_are_kept_bit_exact(mixed_gguf, mixed_n2):
    import gguf

    m = store.load_manifest(mixed_n2)
    assert m["dtype"] == "blocks=q8_0*2,q4_0*2,q4_1*2,float32*2;embed=q8_0;head=q4_1"
    assert "Q4_0 -> q4_0 kept as is: 7 tensors" in m["conversion"]
    raw = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(mixed_gguf)).tensors}
    cfg = m["config"]
    for rank in range(2):
        rs = store.RankStore(mixed_n2, rank, 2)
        s = rs.slice
        for layer, fmt in enumerate(("q8_0", "q4_0", "q4_1")):
            g = lambda n: raw[f"blk.{layer}.{n}.weight"]  # noqa: E731
            part = lambda b, name: _blocks_of(rs, b, name, fmt)  # noqa: E731
            hd, bb = cfg.head_dim, qf.QUANTS[fmt]
            q = unpermute_qk(g("attn_q"), cfg.n_heads)[s.q_heads[0] * hd : s.q_heads[1] * hd]
            k = unpermute_qk(g("attn_k"), cfg.n_kv_heads)[s.kv_heads[0] * hd : s.kv_heads[1] * hd]
            v = g("attn_v")[s.kv_heads[0] * hd : s.kv_heads[1] * hd]
            assert np.array_equal(part(2 * layer, "wqkv"), np.concatenate([q, k, v]))
            cols = lambda a, c0, c1: a[:, c0 // 32 * bb : c1 // 32 * bb]  # noqa: E731
            assert np.array_equal(part(2 * layer, "wo"), cols(g("attn_output"), s.q_heads[0] * hd, s.q_heads[1] * hd))
            f = slice(*s.ffn)
            assert np.array_equal(part(2 * layer + 1, "wgu"), np.concatenate([g("ffn_gate")[f], g("ffn_up")[f]]))
            assert np.array_equal(part(2 * layer + 1, "wdown"), cols(g("ffn_down"), *s.ffn))
        if rank == 0:
            for name, key, fmt in (("embed", "token_embd.weight", "q8_0"), ("head", "output.weight", "q4_1")):
                rec = rs.read_tensor(name).reshape(cfg.vocab, -1)
                assert np.array_equal(qf.rows_to_blocks(fmt, rec), raw[key])
        rs.close()


CASES = {  # world: (ratios, memory mode)
    1: ("1", MemoryOptions(resident=True)),
    2: (None, MemoryOptions(window=2, io="direct")),
    3: ("1,2,1", MemoryOptions(window=1, io="mmap")),
    8: ("3,1,1,1,2,1,1,1", MemoryOptions(budget=290 << 20)),
}


@pytest.mark.parametrize("world", sorted(CASES))
def test_mixed_store_matches_transformers(mixed_gguf, mixed_n2, mixed_ref, prompt_ids, tmp_path, world):
    ratios, mem = CASES[world]
    path = mixed_n2 if world == 2 else convert(mixed_gguf, tmp_path / "s", world, ratios, dtype="auto", quiet=True)
    logits, tokens = ThreadGroup(world).run(lambda c: run_store(path, c, prompt_ids, 6, mem=mem))[0]
    ref_logits, ref_tokens = mixed_ref
    assert rel_err(logits, ref_logits) < 1e-4
    assert tokens == ref_tokens


def test_hf_dir_quantized_to_q4_holds_the_q4_1_ggufs_blocks(quant_hf, f32_gguf, tmp_path):
    """--dtype q4 rounds to nearest as gguf's quantizer does: the store holds exactly the blocks of the
    Q4_1 GGUF made from the same float weights (whose logits the mixed-store test checks)."""
    import gguf

    T = _gguf_types()
    q4 = requantize_gguf(f32_gguf, tmp_path / "q4_1.gguf", lambda name: T.Q4_1)
    raw = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(q4)).tensors}
    path = convert(quant_hf, tmp_path / "s", 1, dtype="q4", quiet=True)
    assert store.load_manifest(path)["dtype"] == "q4_1"
    rs = store.RankStore(path, 0, 1)
    for layer in range(4):
        assert np.array_equal(_blocks_of(rs, 2 * layer + 1, "wdown", "q4_1"), raw[f"blk.{layer}.ffn_down.weight"])
        q = unpermute_qk(raw[f"blk.{layer}.attn_q.weight"], 4)
        assert np.array_equal(_blocks_of(rs, 2 * layer, "wqkv", "q4_1")[: len(q)], q)
    assert np.array_equal(qf.rows_to_blocks("q4_1", rs.read_tensor("head").reshape(rs.cfg.vocab, -1)),
                          raw["output.weight"])
    rs.close()


def test_other_gguf_types_are_requantized_and_reported(f32_gguf, tmp_path):
    import gguf

    T = _gguf_types()
    src = requantize_gguf(f32_gguf, tmp_path / "q5.gguf", lambda name: T.Q5_0 if "ffn_up" in name else T.Q4_0)
    path = convert(src, tmp_path / "s", 1, dtype="auto", quiet=True)
    m = store.load_manifest(path)
    assert "Q5_0 -> q8_0 re-quantized: 4 tensors" in m["conversion"]
    assert m["formats"].blocks == ("q4_0", "q8_0") * 4  # the MLP blocks take the widest of gate/up/down
    t = next(t for t in gguf.GGUFReader(str(src)).tensors if t.name == "blk.0.ffn_up.weight")
    q5 = gguf.quants.dequantize(t.data, t.tensor_type).reshape(192, 128)
    rs = store.RankStore(path, 0, 1)
    kept = qf.dequantize(qf.QTensor("q8_0", _blocks_of(rs, 1, "wgu", "q8_0"), (384, 128)))[192:]
    rs.close()
    step = np.repeat(np.abs(q5).reshape(192, 4, 32).max(-1) / 127, 32, axis=1)  # q8_0's step per group
    err = np.abs(kept - q5)
    assert (err <= 0.6 * step + 1e-7).all() and err.max() > 0  # half a step, and d rounded to float16


# ---- refusals ------------------------------------------------------------------------------------


def test_unsupported_gguf_type_names_the_tensor_the_type_and_what_to_do(f32_gguf, tmp_path, capsys):
    T = _gguf_types()
    src = requantize_gguf(f32_gguf, tmp_path / "i32.gguf", lambda name: T.I32 if name == "blk.1.ffn_down.weight" else None)
    assert convert_mod.main([str(src), "--ranks", "1", "--dtype", "auto", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "'blk.1.ffn_down.weight'" in err and "I32" in err and "Q8_0, Q4_0 or Q4_1" in err
    assert not (tmp_path / "s").exists()


def test_q4_on_dimensions_that_do_not_divide_says_so(tiny_gguf, tmp_path, capsys):
    assert convert_mod.main([str(tiny_gguf), "--ranks", "1", "--dtype", "q4", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "hidden size" in err and "72" in err and "group size 32" in err
    assert not (tmp_path / "s").exists()


def test_damaged_or_truncated_quantized_block_is_refused(mixed_n2, tmp_path):
    import shutil

    path = Path(shutil.copytree(mixed_n2, tmp_path / "s"))
    f = path / store.rank_file_name(1)
    rs = store.RankStore(path, 1, 2)
    off = rs.block_offset(4) + rs.layout(4).part("wqkv").offset + 7  # inside a q4_1 row's nibbles
    rs.close()
    data = bytearray(f.read_bytes())
    data[off] ^= 0x10
    f.write_bytes(data)
    store.RankStore(path, 1, 2).close()  # sizes and header still agree: only the checksum tells
    with pytest.raises(StoreError, match="checksum"):
        store.RankStore(path, 1, 2, verify=True)
    f.write_bytes(data[: off + 1])
    with pytest.raises(StoreError, match="truncated"):
        store.RankStore(path, 1, 2)


# ---- synthetic quantized models ------------------------------------------------------------------


@pytest.mark.slow  # reads the default model's GGUF for its tokenizer (seconds)
def test_synth_gguf_converts_to_its_own_blocks_and_runs(tmp_path, prompt_ids, fmt="q4_0"):
    import gguf

    from tpimpi.synth import shape_config, write_gguf

    cfg = shape_config("smollm2-135m", 1)
    src = write_gguf(cfg, tmp_path / "s.gguf", fmt, quiet=True)
    raw = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(src)).tensors}
    path = convert(src, tmp_path / "st", 1, dtype="auto", quiet=True)
    rs = store.RankStore(path, 0, 1)
    assert np.array_equal(qf.rows_to_blocks(fmt, rs.read_tensor("embed").reshape(cfg.vocab, -1)),
                          raw["token_embd.weight"])
    rs.close()
    logits, tokens = ThreadGroup(1).run(lambda c: run_store(path, c, prompt_ids[:4], 2))[0]
    assert np.isfinite(logits).all() and len(tokens) == 2


def test_synth_writes_quantized_store_without_a_float_model(tmp_path, prompt_ids):
    from tpimpi.synth import main

    assert main(["--shape", "smollm2-135m", "--layers", "2", "--ranks", "3", "--dtype", "q4",
                 "--out", str(tmp_path / "s"), "--quiet"]) == 0
    m = store.load_manifest(tmp_path / "s")
    assert m["dtype"] == "q4_1" and m["requested"] == "q4"
    mem = MemoryOptions(window=2)
    logits, tokens = ThreadGroup(3).run(lambda c: run_store(tmp_path / "s", c, prompt_ids[:4], 2, mem=mem))[0]
    assert np.isfinite(logits[:256]).all() and len(tokens) == 2  # rows past the byte tokenizer are -inf


# ---- --int4pack: blocks in the int4 kernel's layout, streamed under --compute bfloat16 ------------


@pytest.fixture(scope="module")
def packed_stores(mixed_gguf, mixed_n2, tmp_path_factory):
    """{ranks: (store in GGUF layout or None, --int4pack store)} of the mixed GGUF, for 1 and 2 ranks."""
    d = tmp_path_factory.mktemp("pk")
    return {w: (g, convert(mixed_gguf, d / f"pack-n{w}", w, dtype="auto", quiet=True, int4pack=True))
            for w, g in ((1, None), (2, mixed_n2))}


def test_int4pack_store_records_its_formats_and_tile_order(packed_stores):
    m = store.load_manifest(packed_stores[2][1])
    assert m["dtype"] == ("blocks=q8_0-int4pack*2,q4_0-int4pack*2,q4_1-int4pack*2,float32*2;"
                          "embed=q8_0;head=q4_1")
    assert m["int4pack"] == kernels.int4pack_layout()


def _run(path, mem, ids, world):
    """(prompt logits, greedy ids, class of block 0's qkv, blocks streamed) on rank 0."""
    def run(c):
        from tpimpi.engine import Engine

        eng = Engine(c, path, max_seq=64, mem=mem).load()
        kind, streamed = type(eng.blocks.get(0)["wqkv"]).__name__, eng.plan.streamed
        eng.close()
        return (*run_store(path, c, ids, 6, mem=mem), kind, streamed)

    return ThreadGroup(world).run(run)[0]


@pytest.mark.parametrize("world, mem", [
    (1, MemoryOptions(window=1, compute="bfloat16")),
    (2, MemoryOptions(window=1, io="direct", compute="bfloat16")),
    # between rank 0's plans streaming everything (281 MiB) and keeping everything (285): some of each
    (2, MemoryOptions(budget=int(283.5 * 2**20), compute="bfloat16")),
])
def test_streamed_int4pack_blocks_give_the_resident_bfloat16_results(packed_stores, prompt_ids, world, mem):
    """The layers' products equal a resident run's (the same kernel on the same packed bytes); the head, a
    GGUF q4_1 matrix streamed in chunks, takes the exact kernel where the resident run's is repacked.
    Resident, the --int4pack store gives the logits of the GGUF store repacked at load, bit for bit."""
    gguf_store, packed = packed_stores[world]
    resident = MemoryOptions(resident=True, compute="bfloat16")
    ref_logits, ref_tokens, ref_kind, _ = _run(packed, resident, prompt_ids, world)
    logits, tokens, kind, streamed = _run(packed, mem, prompt_ids, world)
    assert ref_kind == kind == "Int4Packed" and streamed > 0
    assert tokens == ref_tokens
    assert rel_err(logits, ref_logits) < 0.02
    if gguf_store is not None:
        repacked, *_ = _run(gguf_store, resident, prompt_ids, world)
        assert np.array_equal(repacked, ref_logits)


def test_memory_plan_counts_streamed_int4pack_blocks_at_their_packed_size(mixed_n2):
    """Window buffers hold a streamed block as stored: an --int4pack q8_0 block is two planes of nibbles
    plus bfloat16 scales and zeros, 40 bytes per 32 weights, against the GGUF's 34."""
    from tpimpi.resources import memory_plan

    cfg = store.load_manifest(mixed_n2)["config"]  # hidden 128, 4 heads of 32, 2 KV heads, FFN 192
    s = store.split_plan(cfg, (1, 1), store.Formats.uniform("q8_0", cfg))[0]  # 2 heads, 1 KV head, FFN 96
    # the MLP block, the largest: norm 512 B; wgu [192, 128] and wdown [128, 96], 64-byte aligned, page padded
    packed_mlp = -(-(512 + 2 * 192 * (64 + 16) + 2 * 128 * (48 + 12)) // 4096) * 4096  # 46592 -> 49152
    gguf_mlp = -(-(512 + 192 * 4 * 34 + 128 * 3 * 34) // 4096) * 4096  # 39680 -> 40960
    for fmt, block in (("q8_0-int4pack", packed_mlp), ("q8_0", gguf_mlp)):
        for window in (1, 2):
            mem = MemoryOptions(window=window, compute="bfloat16")
            _, p = memory_plan(cfg, s, 0, 2, f"blocks={fmt}*8;embed=q8_0;head=q4_1", 64, mem)
            assert p.parts["weights"] == window * block
            assert p.parts["scratch"] == kernels.scratch_bytes(128)  # the GGUF head's chunks: the exact kernel


def test_int4pack_store_is_refused_under_float32_compute_or_another_tile_order(packed_stores, prompt_ids, tmp_path):
    import shutil

    def run(path, compute):
        mem = MemoryOptions(window=1, compute=compute)
        return ThreadGroup(2).run(lambda c: run_store(path, c, prompt_ids, 1, mem=mem))

    with pytest.raises(RuntimeError, match="only --compute bfloat16 multiplies"):  # ThreadComm's agreed error
        run(packed_stores[2][1], "float32")
    path = Path(shutil.copytree(packed_stores[2][1], tmp_path / "s"))
    m = json.loads((path / store.MANIFEST).read_text())
    m["int4pack"] = {"layout": "0123456789abcdef", "cpu_capability": "NEON", "torch": "2.13.0"}
    (path / store.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(RuntimeError, match="NEON .* packs differently .* convert it again"):
        run(path, "bfloat16")
    del m["int4pack"]
    (path / store.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(StoreError, match="no valid int4pack record"):
        store.load_manifest(path)
    with pytest.raises(StoreError, match="--dtype auto --int4pack --ranks 1"):  # the command that splits it again
        store.RankStore(packed_stores[2][1], 0, 1)


def test_int4pack_needs_quantized_blocks(f32_gguf, tmp_path, capsys):
    assert convert_mod.main([str(f32_gguf), "--ranks", "1", "--dtype", "bfloat16", "--int4pack", "--out",
                             str(tmp_path / "s"), "--quiet"]) == 2
    assert "--int4pack repacks q4_0, q4_1 and q8_0 blocks" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


# ---- the default model ---------------------------------------------------------------------------


@pytest.mark.slow
def test_default_model_kept_in_q4_1_matches_transformers(tmp_path, prompt_ids):
    src = tm.default_gguf_path()
    path = convert(src, tmp_path / "s", 2, dtype="auto", quiet=True)
    m = store.load_manifest(path)
    assert m["dtype"] == "blocks=q4_1*60;embed=q8_0"
    model = tm.hf_model(src)
    ref_logits, ref_tokens = tm.hf_last_logits(model, prompt_ids), tm.hf_greedy(model, prompt_ids, 8)
    logits, tokens = ThreadGroup(2).run(lambda c: run_store(path, c, prompt_ids, 8))[0]
    assert rel_err(logits, ref_logits) < 1e-4
    assert tokens == ref_tokens
    # --compute bfloat16: the Q4_1 layers and the Q8_0 tied head (two planes) on torch's int4 kernel
    mem = MemoryOptions(resident=True, compute="bfloat16")
    logits, tokens = ThreadGroup(2).run(lambda c: run_store(path, c, prompt_ids, 8, mem=mem))[0]
    assert rel_err(logits, ref_logits) < 0.05 and tokens == ref_tokens


def test_bfloat16_compute_runs_resident_quantized_blocks_on_torchs_int4_kernel(mixed_n2, mixed_ref, prompt_ids):
    """--compute bfloat16: resident q8_0/q4_0/q4_1 blocks and head chunks repacked for torch's int4 kernel
    (q8_0 as two planes; their buffers freed), the rest as before; about bfloat16's precision, as a
    bfloat16 store gives."""
    def run(c):
        mem = MemoryOptions(resident=True, compute="bfloat16")
        from tpimpi.engine import Engine

        eng = Engine(c, mixed_n2, max_seq=64, mem=mem).load()
        mats = [eng.blocks.get(b)["wgu"] for b in (1, 3, 5)]  # the q8_0, q4_0 and q4_1 layers' MLPs
        mats += [eng.blocks.get(b)["w"] for b in (eng.head.chunks if c.rank == 0 else ())]  # q4_1 head
        kinds = ({type(m).__name__ for m in mats}, [getattr(m, "planes", 0) for m in mats[:3]])
        eng.close()
        return kinds, run_store(mixed_n2, c, prompt_ids, 1, mem=mem)[0]

    (kinds, logits), _ = ThreadGroup(2).run(run)
    assert kinds == ({"Int4Packed"}, [2, 1, 1])
    assert rel_err(logits, mixed_ref[0]) < 0.05 and np.argmax(logits) == np.argmax(mixed_ref[0])
