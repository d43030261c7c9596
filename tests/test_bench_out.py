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
