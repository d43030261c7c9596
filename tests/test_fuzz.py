"""Fuzzing the store reader: damaged rank-file headers and manifests, built by mutating a real tiny store.

Whatever the bytes, opening a store either works or raises a TpimpiError (a message for the user), never
another exception, and never reads or allocates more than the files hold: a header length of 2**63 is
refused before anything is read, and no manifest value makes the reader loop or allocate without bound.
"""

import copy
import json
import math
import shutil
import struct
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tpimpi import store
from tpimpi.convert import convert
from tpimpi.errors import TpimpiError

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MAX_PEAK = 32 << 20  # bytes a failed open may allocate: the tiny store's headers and manifest are a few KB

# values that break naive parsers: wrong types, out-of-range numbers, paths out of the store directory
NASTY = [None, True, False, 0, -1, 1, 2, 3, 2**31, 2**63, 2**64 + 1, 10**30, 0.0, -0.0, 0.5, -1.5, 1e-320,
         1e308, math.inf, -math.inf, math.nan, "", "1", "2", "x", "..", "../rank001.safetensors", "a/b",
         "/etc/passwd", "rank000.safetensors", "nul\x00byte", "float32", "llama", [], [1], {}, {"a": 1}]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12) | st.sampled_from(NASTY),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


@pytest.fixture(scope="module")
def base(tiny_source, tmp_path_factory):
    """A real 2-rank store, its manifest, and the scratch directory the examples damage copies in."""
    st_dir = convert(tiny_source, tmp_path_factory.mktemp("fuzz") / "s2", 2, quiet=True)
    return st_dir, json.loads((st_dir / store.MANIFEST).read_text())


@pytest.fixture(scope="module")
def scratch(base, tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzzcopy") / "s2"
    shutil.copytree(base[0], d)
    return d


def open_all(directory: Path, world: int = 2) -> None:
    """What a launch does with a store: read the manifest, then every rank opens its file."""
    tracemalloc.start()
    try:
        store.load_manifest(directory)
        for r in range(world):
            store.RankStore(directory, r, world).close()
    except TpimpiError:
        pass  # a refusal with a message is a correct outcome; any other exception fails the test
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < MAX_PEAK, f"opening the store allocated {peak} bytes"


def restore(directory: Path, base) -> None:
    """Undo an example's damage: the original manifest and rank 1 file."""
    for name in (store.MANIFEST, store.rank_file_name(1)):
        shutil.copyfile(base[0] / name, directory / name)


@st.composite
def mutated(draw, doc):
    """doc (a JSON value) with one to three values somewhere inside replaced, deleted or added."""
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, 3))):
        node = doc
        while True:
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            if not keys:
                break
            k = draw(st.sampled_from(keys))
            if isinstance(node[k], (dict, list)) and node[k] and draw(st.booleans()):
                node = node[k]  # go deeper
                continue
            action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
            if action == "replace":
                node[k] = draw(json_values)
            elif action == "delete":
                del node[k]
            elif isinstance(node, dict):
                node[draw(st.text(max_size=8))] = draw(json_values)
            else:
                node.append(draw(json_values))
            break
    return doc


# ---- manifests ----------------------------------------------------------------------------------


def _write_manifest(directory: Path, text: str | bytes) -> None:
    (directory / store.MANIFEST).write_bytes(text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text)


@SETTINGS
@given(data=st.data())
def test_mutated_manifests_load_or_are_refused(base, scratch, data):
    doc = data.draw(mutated(base[1]))
    _write_manifest(scratch, json.dumps(doc))
    open_all(scratch)


@SETTINGS
@given(field=st.sampled_from(["world", "ratios", "files", "config", "dtype", "version", "source"]),
       sub=st.integers(0, 20), value=st.sampled_from(NASTY))
def test_nasty_values_in_every_manifest_field(base, scratch, field, sub, value):
    doc = copy.deepcopy(base[1])
    target = doc[field]
    if isinstance(target, dict) and target:  # config, source: one of their keys
        target[sorted(target)[sub % len(target)]] = value
    elif isinstance(target, list) and isinstance(target[0], dict):  # files: one key of one entry
        entry = target[sub % len(target)]
        entry[sorted(entry)[sub // len(target) % len(entry)]] = value
    elif isinstance(target, list):  # ratios: one of them
        target[sub % len(target)] = value
    else:
        doc[field] = value
    _write_manifest(scratch, json.dumps(doc))
    open_all(scratch)


@SETTINGS
@given(raw=st.one_of(st.binary(max_size=200), st.text(max_size=200), json_values.map(json.dumps),
                     st.integers(0, 1200)))
def test_arbitrary_or_cut_off_manifest_text(base, scratch, raw):
    if isinstance(raw, int):  # a manifest cut off after n characters, as by a crash mid-write
        raw = json.dumps(base[1], indent=1)[:raw]
    _write_manifest(scratch, raw)
    open_all(scratch)


def test_deeply_nested_manifest_and_header(base, scratch):
    _write_manifest(scratch, "[" * 100_000)
    open_all(scratch)
    _write_rank1(scratch, base, b"{" + b'"a":[' * 50_000)
    restore(scratch, base)


def test_huge_manifest_is_not_read_whole(base, scratch):
    with open(scratch / store.MANIFEST, "wb") as f:
        f.truncate(1 << 40)  # a sparse 1 TiB file: reading it would need 1 TiB of memory
    try:
        open_all(scratch)
    finally:
        restore(scratch, base)


# ---- rank-file headers ----------------------------------------------------------------------------


def _write_rank1(directory: Path, base, header: bytes, length: int | None = None) -> None:
    """Rank 1's file with `header` as its JSON header (and `length` in the 8-byte length field), the
    original data after it, and the manifest's byte count updated so the header is actually parsed."""
    st_dir, manifest = base
    orig = (st_dir / store.rank_file_name(1)).read_bytes()
    (n,) = struct.unpack("<Q", orig[:8])
    data = struct.pack("<Q", len(header) if length is None else length) + header + orig[8 + n:]
    (directory / store.rank_file_name(1)).write_bytes(data)
    m = copy.deepcopy(manifest)
    m["files"][1]["bytes"] = len(data)
    _write_manifest(directory, json.dumps(m))
    open_all(directory)


def _header(base) -> bytes:
    orig = (base[0] / store.rank_file_name(1)).read_bytes()
    (n,) = struct.unpack("<Q", orig[:8])
    return orig[8 : 8 + n]


@SETTINGS
@given(length=st.one_of(st.integers(0, 2**64 - 1), st.integers(0, 200_000),
                        st.sampled_from([0, 1, 8, 4087, 4088, 4089, 151_544, 2**63, 2**64 - 1])))
def test_any_header_length(base, scratch, length):
    _write_rank1(scratch, base, _header(base), length)


@SETTINGS
@given(data=st.data())
def test_corrupted_header_bytes(base, scratch, data):
    raw = bytearray(_header(base))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        how = data.draw(st.sampled_from(["set", "insert", "delete", "cut"]))
        if how == "set":
            raw[i] = data.draw(st.integers(0, 255))
        elif how == "insert":
            raw[i:i] = data.draw(st.binary(min_size=1, max_size=8))
        elif how == "delete":
            del raw[i]
        else:
            del raw[i:]
            break
    _write_rank1(scratch, base, bytes(raw))


@SETTINGS
@given(data=st.data())
def test_mutated_header_json(base, scratch, data):
    doc = json.loads(_header(base))
    _write_rank1(scratch, base, json.dumps(data.draw(mutated(doc))).encode())


@SETTINGS
@given(doc=json_values)
def test_header_of_any_json(base, scratch, doc):
    _write_rank1(scratch, base, json.dumps(doc).encode())
