"""Every command the README shows in a ```sh block runs as written.

Each block runs as one bash script (`set -euo pipefail`, so a failing line fails the block), in a
scratch directory that links to the checkout's files (files a command writes stay out of the
checkout), with the session's model cache (tests/conftest.py: empty at the start of each pytest run and
shared with the other tests that run the default model, so each conversion of it is made once). The only change made to a command: a small token count
(tpimpi.generate gets --max-new-tokens 2, tpimpi.bench --new-tokens 2 --repeat 1 --warmup 0), so the
whole file runs in tens of seconds. Commands that cannot run inside a test are listed in SKIP with the
reason; an entry that matches no README line fails the test, so the list stays current.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"
BLOCK_TIMEOUT_S = 600

# a substring of the README line -> why it cannot run in a test
SKIP = {
    "bash jobs/quickstart.sh": "installs every dependency from PyPI (minutes, network); jobs/install.sh is CI's first step",
    "bash tests/run.sh": "the whole test suite, this file included",
    "sbatch ": "needs a Slurm cluster; tests/test_slurm.py submits these scripts to a real one",
    "bash jobs/sweep.sh": "submits Slurm jobs (tests/test_slurm.py runs the sweep)",
    "bash jobs/bench_generate.sh": "benchmark jobs: minutes each, figures for BENCHMARKS.md",
    "bash jobs/bench_window.sh": "benchmark jobs: minutes each, figures for BENCHMARKS.md",
    "python -m tpimpi.convert model.gguf": "a placeholder path (model.gguf) and optional [--flags] syntax",
    "python -m tpimpi.synth --shape llama2-70b": "writes a 70B-shaped model (7 GB for 4 layers, 38 GB in q4_0) under /data",
    "python -m tpimpi.synth --shape smollm2-1.7b": "writes a 1 GB GGUF of random weights; tests/test_quant.py writes a small synthetic GGUF",
    "python -m tpimpi.serve --port 8000": "a server runs until it is stopped; tests/test_serve.py starts it and sends the same requests",
    "curl -s http://127.0.0.1:8000": "needs the server above; tests/test_serve.py sends this request",
    "sudo apt install": "installs a system package (a board's set-up)",
    "python3 -m venv ~/tpimpi-env": "makes a venv in the home directory for the install that follows",
    "TORCH_VERSION=2.10.0 bash jobs/install.sh": "installs from PyPI (minutes); jobs/arm64_check.sh installs and checks this set",
    "python -m tpimpi.quantize $(": "about 180 forward passes of the default model (minutes); tests/test_quantize.py runs it on a tiny model",
}


def sh_blocks(text: str) -> list[list[str]]:
    """The README's ```sh blocks, each as its list of logical lines (backslash continuations joined)."""
    blocks = []
    for body in re.findall(r"^```sh\n(.*?)^```", text, re.S | re.M):
        lines, cur = [], ""
        for line in body.splitlines():
            cur += line
            if cur.endswith("\\"):
                cur = cur[:-1]
                continue
            if cur.strip():
                lines.append(cur)
            cur = ""
        blocks.append(lines)
    return blocks


def skip_reason(line: str) -> str | None:
    return next((why for key, why in SKIP.items() if key in line), None)


def bounded(line: str) -> str:
    """The line with a small token count for generation and benchmark commands (nothing else changed)."""
    if "tpimpi.generate" in line and "--plan" not in line:
        if "--max-new-tokens" in line:
            line = re.sub(r"--max-new-tokens \d+", "--max-new-tokens 2", line)
        else:
            line = line.replace("tpimpi.generate", "tpimpi.generate --max-new-tokens 2", 1)
    if "tpimpi.bench" in line:
        line = line.replace("tpimpi.bench", "tpimpi.bench --new-tokens 2 --repeat 1 --warmup 0", 1)
    return line


def lowmem_unavailable() -> str | None:
    """Why tpimpi.lowmem cannot run here (it needs a writable memory cgroup: root), or None."""
    from tpimpi import lowmem

    try:
        _, d = lowmem.make_cgroup(64 << 20)
    except OSError as e:
        return f"tpimpi.lowmem needs a writable memory cgroup (root): {e.strerror or e}"
    lowmem.remove_cgroup(d)
    return None


BLOCKS = sh_blocks(README.read_text())


def test_the_readme_has_commands_and_the_skip_list_is_current():
    lines = [line for block in BLOCKS for line in block]
    assert len(lines) >= 5
    stale = [key for key in SKIP if not any(key in line for line in lines)]
    assert not stale, f"SKIP entries that match no README command: {stale}"


def tracked(directory: Path) -> list[str]:
    """Paths (relative to ROOT) of the files under directory that git tracks; every file when ROOT is not
    a git checkout."""
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--", str(directory)],
                             capture_output=True, check=True).stdout
        return [p for p in out.decode().split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        return [str(p.relative_to(ROOT)) for p in directory.rglob("*") if p.is_file()]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, model_cache):
    """A scratch directory with the checkout's entries linked in (data/'s tracked files copied: commands
    write results there; untracked stores and GGUFs a developer keeps under data/ can be tens of GB), and
    the session's model cache."""
    d = tmp_path_factory.mktemp("readme")
    for entry in ROOT.iterdir():
        if entry.name == "data":
            for rel in tracked(entry):
                (d / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / rel, d / rel)
        elif entry.name != ".git":
            (d / entry.name).symlink_to(entry)
    env = dict(os.environ, TPIMPI_CACHE=str(model_cache), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    env.pop("OMPI_COMM_WORLD_SIZE", None)
    return d, env


@pytest.mark.parametrize("index", [i for i, b in enumerate(BLOCKS) if any(not skip_reason(x) for x in b)])
def test_readme_block_runs_as_written(workdir, index):
    d, env = workdir
    block = BLOCKS[index]
    if any("tpimpi.lowmem" in line for line in block) and lowmem_unavailable():
        pytest.skip(lowmem_unavailable())
    run = [bounded(line) for line in block if not skip_reason(line)]
    script = "set -euo pipefail\n" + "\n".join(run) + "\n"
    p = subprocess.run(["bash", "-c", script], cwd=d, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                       timeout=BLOCK_TIMEOUT_S)
    err = p.stderr.decode(errors="replace")
    assert p.returncode == 0, f"README block {index} failed:\n{script}\n--- stderr:\n{err[-3000:]}"
    assert "Traceback" not in err and "tpimpi: error" not in err, err[-3000:]
