"""A cluster of 3 hosts in network namespaces, sharing no files: a store staged from rank 0's host
generates across the hosts the same tokens as on one host, and a host missing its file is told the
staging command. The namespaces go away afterwards, even when a test fails."""

import json
import os
import subprocess
import sys

import pytest

from tpimpi.cluster.netns import Cluster, _netns_list, usable

NAME = f"tpimpi-ct{os.getpid()}"
ARGS = ["--prompt", "Hello", "--max-new-tokens", "6", "--threads", "1", "--json", "--max-seq-len", "64"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = usable()
    if why:
        pytest.skip(f"no cluster in namespaces here: {why}")
    c = Cluster(NAME, hosts=3, subnet="10.77.201.0/24", state=str(tmp_path_factory.mktemp("cluster")))
    try:
        yield c.up()
    finally:
        c.down()
        assert not [n for n in _netns_list() if n.startswith(NAME)]


def _run(argv, timeout=120):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)


def _mpirun(c, args):
    return _run(c.head_argv(c.mpirun_argv([sys.executable, "-m", *args], np_=3)))


def test_stage_then_generate_across_hosts_as_on_one_host(cluster):
    c = cluster
    src = c.disk(0) / "syn"  # rank 0's host holds the whole store, the others nothing
    p = _run([sys.executable, "-m", "tpimpi.synth", "--shape", "smollm2-135m", "--layers", "2", "--ranks", "3",
              "--dtype", "bfloat16", "--out", str(src), "--quiet"])
    assert p.returncode == 0, p.stderr
    store = c.mountpoint / "store"  # every host's own disk, at the same path
    missing = _mpirun(c, ["tpimpi.generate", "--model", str(src).replace(str(c.disk(0)), str(c.mountpoint)), *ARGS])
    assert missing.returncode == 2
    assert "ranks 1, 2 (hosts " in missing.stderr
    assert f"-np 3 python -m tpimpi.stage {c.mountpoint}/syn" in missing.stderr

    staged = _mpirun(c, ["tpimpi.stage", str(c.mountpoint / "syn"), "--to", str(store), "--json"])
    assert staged.returncode == 0, staged.stderr
    summary = json.loads(staged.stdout)
    assert summary["staged_ranks"] == [0, 1, 2] and summary["hosts"] == [c.ns(i) for i in range(3)]
    for i in range(3):  # each host got its own rank file and the manifest; rank 0's host the tokenizer
        names = sorted(f.name for f in (c.disk(i) / "store").iterdir())
        assert f"rank{i:03d}.safetensors" in names and "manifest.json" in names
        assert not [n for n in names if n.startswith("rank") and n != f"rank{i:03d}.safetensors"]
        assert not [n for n in names if ".partial-" in n or ".tmp-" in n]  # no temporary left behind
        assert any(n.startswith("tokenizer") for n in names) == (i == 0)
    again = _mpirun(c, ["tpimpi.stage", str(c.mountpoint / "syn"), "--to", str(store), "--json"])
    assert json.loads(again.stdout)["skipped_ranks"] == [0, 1, 2]

    across = _mpirun(c, ["tpimpi.generate", "--model", str(store), *ARGS])
    assert across.returncode == 0, across.stderr
    one_host = _run(["mpirun", "-np", "3", sys.executable, "-m", "tpimpi.generate", "--model", str(src), *ARGS])
    assert one_host.returncode == 0, one_host.stderr
    a, b = json.loads(across.stdout.splitlines()[-1]), json.loads(one_host.stdout.splitlines()[-1])
    assert a["token_ids"] == b["token_ids"] and len(a["token_ids"]) == 6
    assert min(a["wire_bytes_per_token"]["sent"]) > 0
