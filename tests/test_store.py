"""The converter's output: a valid safetensors file per rank, aligned blocks holding exactly the rank's
slices, a manifest that checks them, and nothing that looks valid after an interrupted conversion."""

import json
import os
import subprocess

import numpy as np
import pytest
import torch

from tpimpi import native, store
from tpimpi.convert import convert
from tpimpi.errors import StoreError
from tpimpi.scheduler import BlockScheduler
from tpimpi.shard import plan
from tpimpi.sources import open_source


@pytest.fixture(scope="module")
def store3(tiny_gguf, tmp_path_factory):
    return convert(tiny_gguf, tmp_path_factory.mktemp("st") / "s3", 3, "2,1,1", quiet=True)


def resident(rs, compute="float32"):
    """All blocks of a rank in memory; compute=bfloat16 keeps half-precision weights as stored."""
    return BlockScheduler(rs, rs.specs(), set(range(rs.n_blocks)), 0, compute=compute)


def test_rank_files_are_safetensors_with_aligned_blocks(store3):
    from safetensors import safe_open

    m = store.load_manifest(store3)
    for r in range(3):
        path = store3 / m["files"][r]["name"]
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            assert ("embed" in keys) == (r == 0) and ("final_norm" in keys) == (r == 0)
        rs = store.RankStore(store3, r, 3)
        for b in range(rs.n_blocks):
            assert rs.block_offset(b) % store.ALIGN == 0
            assert rs.layout(b).nbytes % store.ALIGN == 0
        assert m["files"][r]["sha256"] == store.sha256_file(path)


def test_blocks_hold_exactly_each_ranks_slices(store3, tiny_gguf):
    src = open_source(tiny_gguf)
    cfg = src.config
    layer1 = src.layer(1)
    hd = cfg.head_dim
    q_rows, k_rows, gate_rows, o_cols = [], [], [], []
    for r, s in enumerate(plan(cfg.n_heads, cfg.n_kv_heads, cfg.ffn, [2, 1, 1])):
        rs = store.RankStore(store3, r, 3)
        blocks = resident(rs)
        # layer 1; a resident float32 matrix may be held in column panels (tpimpi.native): as [out, in] here
        attn, mlp = ({k: v.unpack() if isinstance(v, native.Panels) else v for k, v in blocks.get(b).items()}
                     for b in (2, 3))
        q_rows.append(attn["wqkv"][: s.n_q * hd].numpy())
        k_rows.append(attn["wqkv"][s.n_q * hd : (s.n_q + s.n_kv) * hd].numpy())
        o_cols.append(attn["wo"].numpy())
        gate_rows.append(mlp["wgu"][: s.n_ffn].numpy())
        np.testing.assert_array_equal(mlp["wdown"].numpy(), layer1["down"][:, slice(*s.ffn)])
        np.testing.assert_array_equal(attn["norm"].numpy(), layer1["attn_norm"])
    np.testing.assert_array_equal(np.concatenate(q_rows), layer1["q"])
    np.testing.assert_array_equal(np.concatenate(o_cols, axis=1), layer1["o"])
    np.testing.assert_array_equal(np.concatenate(gate_rows), layer1["gate"])
    # query heads 0-4 | 5-6 | 7-8 with groups of 3: KV heads 0-1 | 1-2 | 2, shared ones copied
    assert [k.shape[0] // hd for k in k_rows] == [2, 2, 1]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_stores_round_the_weights(tiny_gguf, tmp_path, dtype):
    st = convert(tiny_gguf, tmp_path / dtype, 1, dtype=dtype, quiet=True)
    w = resident(store.RankStore(st, 0, 1), compute="bfloat16").get(0)["wqkv"]
    assert w.dtype == getattr(torch, dtype)
    full = open_source(tiny_gguf).layer(0)["q"]
    np.testing.assert_array_equal(w[: full.shape[0]].float().numpy(),
                                  torch.from_numpy(full).to(getattr(torch, dtype)).float().numpy())


def test_interrupted_conversion_leaves_nothing_that_looks_valid(tiny_gguf, tmp_path, monkeypatch):
    from tpimpi import sources

    calls = {"n": 0}
    real = sources.GGUFSource.layer

    def failing(self, i):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, i)

    monkeypatch.setattr(sources.GGUFSource, "layer", failing)
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_gguf, tmp_path / "s", 2, quiet=True)
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(sources.GGUFSource, "layer", real)
    convert(tiny_gguf, tmp_path / "s", 2, quiet=True)  # and running it again completes
    assert sorted(os.listdir(tmp_path)) == ["s"]
    store.RankStore(tmp_path / "s", 1, 2, verify=True)


def test_reconversion_replaces_an_existing_store(store3, tiny_gguf, tmp_path):
    out = convert(tiny_gguf, tmp_path / "s", 2, quiet=True)
    convert(tiny_gguf, out, 4, quiet=True)
    assert store.load_manifest(out)["world"] == 4
    assert sorted(os.listdir(tmp_path)) == ["s"]


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_damaged_stores_are_refused_with_the_file_named(store3, tmp_path):
    bad = _copy(store3, tmp_path / "trunc")
    f = bad / store.rank_file_name(1)
    os.truncate(f, f.stat().st_size - 4096)
    with pytest.raises(StoreError, match=r"rank001\.safetensors.*manifest says"):
        store.RankStore(bad, 1, 3)

    flip = _copy(store3, tmp_path / "flip")
    f = flip / store.rank_file_name(2)
    data = bytearray(f.read_bytes())
    data[-100] ^= 0x40
    f.write_bytes(bytes(data))
    store.RankStore(flip, 2, 3)  # cheap checks cannot see a flipped bit in the data...
    with pytest.raises(StoreError, match=r"rank002\.safetensors: checksum"):
        store.RankStore(flip, 2, 3, verify=True)  # ...the checksum does

    with pytest.raises(StoreError, match=r"split for 3 ranks, launched with 8.*tpimpi.convert .* --ranks 8"):
        store.RankStore(store3, 0, 8)

    edited = _copy(store3, tmp_path / "edited")
    m = json.loads((edited / "manifest.json").read_text())
    m["config"]["ffn"] += 1  # a manifest that no longer describes the files
    (edited / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match=r"rank000\.safetensors: the file's model config or split plan does not match"):
        store.RankStore(edited, 0, 3)

    (edited / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="unreadable manifest"):
        store.RankStore(edited, 0, 3)
    with pytest.raises(StoreError, match="does not exist"):
        store.RankStore(tmp_path / "nowhere", 0, 3)


# ---- verification once per file state ---------------------------------------------------------------


def _open(directory, rank, world, capfd, verify="auto") -> bool:
    """Open a rank's file as a run does; whether it was hashed (it says so on stderr)."""
    capfd.readouterr()
    store.RankStore(directory, rank, world, verify=verify).close()
    return f"checking {store.rank_file_name(rank)}" in capfd.readouterr().err


def _overwrite(path, offset, data, keep_mtime):
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size


def test_a_store_is_hashed_once_per_file_state(store3, tmp_path, capfd):
    assert not _open(store3, 1, 3, capfd)  # the converter stamped what it wrote
    assert (store3 / ".rank001.safetensors.verified").is_file()
    copy = _copy(store3, tmp_path / "copy")  # same bytes and mtimes, new inodes: hashed once again
    assert _open(copy, 1, 3, capfd) and not _open(copy, 1, 3, capfd)
    assert _open(copy, 1, 3, capfd, verify="always")
    assert not _open(copy, 1, 3, capfd, verify="never")

    f = copy / store.rank_file_name(1)
    start = store.RankStore(copy, 1, 3).block_offset(0)
    _overwrite(f, start, b"\xff" * 4096, keep_mtime=True)
    assert not _open(copy, 1, 3, capfd)  # size, mtime and inode unchanged: the stamp holds (the run's own
    # check of hidden states catches what this damage does, tests/test_failures.py)
    _overwrite(f, start + 4096, b"\xff" * 4096, keep_mtime=False)
    with pytest.raises(StoreError, match=r"rank001\.safetensors: checksum does not match the manifest"):
        store.RankStore(copy, 1, 3, verify="auto")
    with pytest.raises(StoreError, match="checksum"):  # and it stays refused: no stamp was written for it
        store.RankStore(copy, 1, 3, verify="auto")


def test_a_read_only_store_is_stamped_in_the_cache(store3, tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("TPIMPI_CACHE", str(tmp_path / "cache"))
    ro = _copy(store3, tmp_path / "ro")
    for p in ro.glob(".*.verified"):
        p.unlink()
    made = subprocess.run(["chattr", "+i", str(ro)], capture_output=True)  # not even root may create files in it
    if made.returncode != 0:
        pytest.skip(f"cannot make a directory immutable here (chattr +i needs root and ext2/3/4, xfs or btrfs): "
                    f"{made.stderr.decode().strip()}")
    try:
        assert _open(ro, 2, 3, capfd) and not _open(ro, 2, 3, capfd)
        assert not (ro / ".rank002.safetensors.verified").exists()
        assert [p.name for p in (tmp_path / "cache" / "verified").iterdir()][0].endswith("-rank002.safetensors.json")
    finally:
        subprocess.run(["chattr", "-i", str(ro)], check=True)
