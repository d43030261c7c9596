"""The prompt never leaves rank 0: the command line users run, under mpirun, watched from outside.

A secret word in the prompt (given in a file rank 0 reads) and another in the system message must
appear in nothing a worker (rank 1, 2) has:
  - its /proc/PID/cmdline and /proc/PID/environ, sampled while it runs (what `ps` shows on its node);
  - every buffer of every MPI call it makes through tpimpi.comm (bcast_, allreduce_, agree, bcast_bytes,
    gather_ints, barrier, on every control word), recorded by tests/privacy_probe.py, as text and as
    the secret's token ids (int64 and int32);
  - every file it opens, from Python or from C extensions: `strace -f` of the whole job (openat and
    friends, threads and children included) and /proc/PID/fd sampled while it runs; no such file
    may be the prompt or system file, nor contain either secret.
The same watch over a deliberately leaking run (--prompt on the command line, the secret in the
environment, the probe's leaking variant that broadcasts the prompt and lets workers open the system
file) must flag every one of those channels: the checks can fail.
"""

import json
import os
import re
import secrets
import shutil
import string
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from test_generate import env  # noqa: F401 (a fixture: the CLI's environment, root allowed, fresh cache)
from tpimpi.convert import convert
from tpimpi.tokenizer import Tokenizer

HERE = Path(__file__).parent
NP = 3
WORKERS = range(1, NP)
STRACE = shutil.which("strace")
pytestmark = pytest.mark.skipif(STRACE is None, reason="needs strace (Debian: apt-get install strace) to see the "
                                "files C extensions open; .ci/run installs it")


def _word(n=10) -> str:
    return "".join(secrets.choice(string.ascii_lowercase) for _ in range(n))


@dataclass
class Watched:
    """What the workers of one run showed."""

    returncode: int
    stderr: str
    pids: dict[int, int]  # rank -> pid
    cmdline: dict[int, set[bytes]] = field(default_factory=dict)
    environ: dict[int, set[bytes]] = field(default_factory=dict)
    fd_paths: dict[int, set[str]] = field(default_factory=dict)
    opened: dict[int, set[str]] = field(default_factory=dict)  # from strace, by rank
    comm: dict[int, tuple[bytes, list[str]]] = field(default_factory=dict)  # rank -> (all buffers, methods)


@pytest.fixture(scope="module")
def secret():
    return {"prompt": "zq" + _word(), "system": "xj" + _word()}


@pytest.fixture(scope="module")
def store(tiny_source, tmp_path_factory):
    return convert(tiny_source, tmp_path_factory.mktemp("privacy") / f"n{NP}", NP, quiet=True)


@pytest.fixture(scope="module")
def texts(secret, tmp_path_factory):
    d = tmp_path_factory.mktemp("texts")
    (d / "prompt.txt").write_text(f"Please keep this private: {secret['prompt']} is the word.")
    (d / "system.txt").write_text(f"You guard the word {secret['system']} carefully.")
    return d / "prompt.txt", d / "system.txt"


@pytest.fixture(scope="module")
def patterns(secret, store, texts):
    """{name: bytes} a worker must never hold: each secret as UTF-8, and as its token ids (int64, int32)."""
    tok = Tokenizer.load(store)
    prompt, system = texts[0].read_text(), texts[1].read_text()
    messages = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
    full = tok.encode_chat(messages) if tok.has_chat_template else tok.encode(prompt)  # as rank 0 encodes it
    out = {}
    for what, word in secret.items():
        out[f"{what} text"] = word.encode()
        ids = tok.encode(" " + word)[1 if tok.add_bos else 0 :]
        assert any(full[k : k + len(ids)] == ids for k in range(len(full))), "the ids must be those of the prompt"
        out[f"{what} ids int64"] = np.array(ids, dtype=np.int64).tobytes()
        out[f"{what} ids int32"] = np.array(ids, dtype=np.int32).tobytes()
    return out


def watch_run(env, out: Path, args, extra_env=None, timeout=180) -> Watched:
    """Run the probe under mpirun inside strace, sampling the workers' /proc entries until they exit."""
    out.mkdir()
    trace = out.parent / (out.name + ".strace")
    cmd = [STRACE, "-f", "-qq", "-y", "--seccomp-bpf", "-e", "trace=open,openat,openat2,creat,clone,clone3,fork,"
           "vfork", "-e", "signal=none", "-o", str(trace),
           "mpirun", "-np", str(NP), sys.executable, str(HERE / "privacy_probe.py"), str(out), *map(str, args)]
    proc = subprocess.Popen(cmd, env=dict(env, **(extra_env or {})), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    w = Watched(0, "", {})
    t0 = time.monotonic()
    while proc.poll() is None and time.monotonic() - t0 < timeout:
        for r in WORKERS:
            f = out / f"pid-{r}"
            if r not in w.pids and f.exists() and f.read_text():
                w.pids[r] = int(f.read_text())
            if r in w.pids:
                _sample(w, r, w.pids[r])
        time.sleep(0.02)
    if proc.poll() is None:
        proc.kill()
    stdout, stderr = proc.communicate()
    w.returncode, w.stderr = proc.returncode, stderr.decode(errors="replace")
    for r in range(NP):
        f = out / f"pid-{r}"
        w.pids.setdefault(r, int(f.read_text()) if f.exists() else -1)
    w.opened = _opens_by_rank(trace.read_text(errors="replace"), w.pids)
    for r in range(NP):
        data = (out / f"comm-{r}.bin").read_bytes() if (out / f"comm-{r}.bin").exists() else b""
        idx = (out / f"comm-{r}.idx").read_text().split() if (out / f"comm-{r}.idx").exists() else []
        w.comm[r] = (data, idx[0::2])
    return w


def _sample(w: Watched, r: int, pid: int) -> None:
    base = Path(f"/proc/{pid}")
    try:
        w.cmdline.setdefault(r, set()).add((base / "cmdline").read_bytes())
        w.environ.setdefault(r, set()).add((base / "environ").read_bytes())
        for fd in os.listdir(base / "fd"):
            try:
                w.fd_paths.setdefault(r, set()).add(os.readlink(base / "fd" / fd))
            except OSError:
                pass
    except OSError:  # it exited between two samples
        pass


_LINE = re.compile(r"^(\d+) +(?:(\w+)\(|<\.\.\. (\w+) resumed>)(.*)$")
_RET = re.compile(r"= (\d+)(?:<(.*)>)?$")


def _opens_by_rank(trace: str, pids: dict[int, int]) -> dict[int, set[str]]:
    """{rank: paths opened by that rank's process, its threads and children} from `strace -f -y` output."""
    parent, opens = {}, []
    for line in trace.splitlines():
        m = _LINE.match(line)
        ret = _RET.search(line)
        if not m or not ret or "unfinished" in line:
            continue
        tid, call = int(m.group(1)), m.group(2) or m.group(3)
        if call in ("clone", "clone3", "fork", "vfork"):
            parent[int(ret.group(1))] = tid
        elif ret.group(2):
            opens.append((tid, ret.group(2)))
    rank_of_pid = {pid: r for r, pid in pids.items()}

    def rank_of(tid):
        for _ in range(64):
            if tid in rank_of_pid:
                return rank_of_pid[tid]
            if tid not in parent:
                return None
            tid = parent[tid]
        return None

    out = {r: set() for r in pids}
    for tid, path in opens:
        r = rank_of(tid)
        if r is not None:
            out[r].add(path)
    return out


def leaks(w: Watched, patterns: dict[str, bytes], private_files, out: Path) -> dict[str, list[str]]:
    """{channel: findings} over the workers; empty lists mean nothing leaked."""
    found = {"cmdline": [], "environ": [], "comm": [], "file opened": [], "file content": []}
    content_cache = {}
    for r in WORKERS:
        for channel, samples in (("cmdline", w.cmdline.get(r, ())), ("environ", w.environ.get(r, ()))):
            for name, pat in patterns.items():
                if any(pat in s for s in samples):
                    found[channel].append(f"rank {r}: {name}")
        data = w.comm[r][0]
        for name, pat in patterns.items():
            if pat in data:
                found["comm"].append(f"rank {r}: {name}")
        for path in w.opened.get(r, set()) | w.fd_paths.get(r, set()):
            if path.startswith(str(out)):  # the probe's own record of what it saw
                continue
            if any(os.path.realpath(path) == os.path.realpath(p) for p in private_files):
                found["file opened"].append(f"rank {r}: {path}")
            if path not in content_cache:
                content_cache[path] = _file_holds(path, patterns)
            found["file content"] += [f"rank {r}: {path}: {n}" for n in content_cache[path]]
    return found


def _file_holds(path: str, patterns: dict[str, bytes]) -> list[str]:
    if not path.startswith("/") or path.startswith(("/proc/", "/sys/", "/dev/")) or not os.path.isfile(path):
        return []
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return []
    return [n for n, p in patterns.items() if p in data]


@pytest.fixture(scope="module")
def clean(env, store, texts, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "run"
    return out, watch_run(env, out, ["--model", store, "--prompt-file", texts[0], "--system-file", texts[1],
                                     "--max-new-tokens", 3])


def test_workers_never_see_the_prompt_or_system_message(clean, patterns, texts):
    out, w = clean
    assert w.returncode == 0, w.stderr
    assert leaks(w, patterns, texts, out) == {k: [] for k in ("cmdline", "environ", "comm", "file opened",
                                                                "file content")}


def test_the_watch_sees_what_it_claims_to(clean, patterns, texts, store):
    """The clean run's silence is not blindness: every channel was observed on every worker, and the same
    detectors find the secrets where they are (rank 0 opens the prompt files)."""
    out, w = clean
    for r in WORKERS:
        assert w.cmdline.get(r) and w.environ.get(r), f"rank {r}'s /proc entries were never sampled"
        assert any(p.endswith(f"rank00{r}.safetensors") for p in w.opened[r]), "strace saw the rank file opened"
        assert any(p.endswith(f"rank00{r}.safetensors") for p in w.fd_paths.get(r, ())), "/proc/PID/fd sampled"
        methods = set(w.comm[r][1])
        assert {"bcast_", "allreduce_", "agree", "bcast_bytes", "gather_ints", "barrier"} <= methods, methods
        assert not {os.path.basename(p) for p in w.opened[r]} & {"tokenizer.json", "tokenizer_config.json",
                                                                 "rank000.safetensors"}
        modules = json.loads((out / f"opened-{r}.json").read_text())["modules"]
        assert "tpimpi.tokenizer" not in modules and "tokenizers" not in modules
    assert {os.path.realpath(p) for p in texts} <= {os.path.realpath(p) for p in w.opened[0]}
    assert _file_holds(str(texts[0]), patterns) == ["prompt text"]


def test_a_leaking_run_is_caught_on_every_channel(env, store, texts, patterns, secret, tmp_path):
    out = tmp_path / "leaky"
    w = watch_run(env, out, ["--model", store, "--prompt", texts[0].read_text(), "--system-file", texts[1],
                             "--max-new-tokens", 2],
                  extra_env={"TPIMPI_PROBE_LEAK": "comm,file", "TPIMPI_SECRET": secret["prompt"]})
    assert w.returncode == 0, w.stderr
    found = leaks(w, patterns, texts, out)
    for r in WORKERS:
        assert f"rank {r}: prompt text" in found["cmdline"]  # --prompt is on every rank's command line
        assert f"rank {r}: prompt text" in found["environ"]
        assert {f"rank {r}: prompt text", f"rank {r}: prompt ids int64"} <= set(found["comm"])
        assert f"rank {r}: {texts[1]}" in found["file opened"]
        assert f"rank {r}: {texts[1]}: system text" in found["file content"]
    assert sum("--prompt text is in every rank's command line" in line for line in w.stderr.splitlines()) == 1
