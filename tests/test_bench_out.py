"""tpimpi.bench writes its results outside the repository unless told where."""

import json
import subprocess
import sys
from pathlib import Path

from test_generate import env  # noqa: F401 (a fixture: the CLI's environment, root allowed, fresh cache)

ROOT = Path(__file__).parent.parent


def test_bench_appends_under_the_cache_not_to_the_committed_results(env, tiny_gguf, tmp_path):
    committed = ROOT / "data" / "results" / "bench.jsonl"
    before = committed.read_bytes() if committed.exists() else None
    cache = tmp_path / "cache"
    p = subprocess.run([sys.executable, "-m", "tpimpi.bench", "--model", str(tiny_gguf), "--new-tokens", "2",
                        "--repeat", "1", "--warmup", "0", "--max-seq-len", "64"], cwd=ROOT,
                       env=dict(env, TPIMPI_CACHE=str(cache)), capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr.decode()
    lines = (cache / "results" / "bench.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["system"] == "tpimpi"
    assert str(cache / "results" / "bench.jsonl") in p.stdout.decode()
    assert (committed.read_bytes() if committed.exists() else None) == before


def test_llama_cpp_baseline_runs_with_the_default_context(env, tiny_gguf, tmp_path):
    """--baseline llama.cpp without --max-seq-len: llama.cpp gets the context tpimpi's runs get (it was
    handed None and failed inside llama-cpp-python). Needs llama-cpp-python, an optional install that
    builds llama.cpp from source (jobs/bench_quant.sh installs it; CI does not)."""
    import pytest

    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (optional: jobs/bench_quant.sh)")
    out = tmp_path / "r.jsonl"
    p = subprocess.run([sys.executable, "-m", "tpimpi.bench", "--baseline", "llama.cpp", "--model", str(tiny_gguf),
                        "--new-tokens", "3", "--repeat", "1", "--warmup", "0", "--out", str(out)], cwd=ROOT,
                       env=dict(env, TPIMPI_CACHE=str(tmp_path / "cache")), capture_output=True, timeout=300)
    assert p.returncode == 0, p.stderr.decode()
    row = json.loads(out.read_text())
    assert row["system"] == "llama.cpp" and row["repeat"] == 1 and row["s_per_token"] > 0
