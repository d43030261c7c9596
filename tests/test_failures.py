"""When things go wrong, and when runs go on for long: a rank killed or failing mid-generation, a
conversion killed half-way, a thousand tokens in one run, many prompts through one engine, and bad
arguments. Every check is on what a user sees: the exit code, one message naming the culprit, how long
the job took to end, and that no process is left behind.
"""

import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from test_generate import assert_one_clear_error, env, errors, generate  # noqa: F401 (env is a fixture)

from tpimpi import store
from tpimpi.convert import convert, remove_leftovers

LONG_CONTEXT = 2048


@pytest.fixture(scope="module")
def long_gguf(tiny_hf, tmp_path_factory):
    """The tiny model (same weights) with a context of LONG_CONTEXT instead of 512, for long runs."""
    from tinymodels import make_tiny_gguf

    hf = tmp_path_factory.mktemp("longhf") / "llama"
    shutil.copytree(tiny_hf, hf)
    cfg = json.loads((hf / "config.json").read_text())
    cfg["max_position_embeddings"] = LONG_CONTEXT
    (hf / "config.json").write_text(json.dumps(cfg))
    return make_tiny_gguf(hf.parent / "long.gguf", hf_dir=hf)


@pytest.fixture(scope="module")
def long_stores(long_gguf, tmp_path_factory):
    """The long-context model split for 1, 2 and 3 ranks (the GGUF file is read once)."""
    from tpimpi.sources import open_source

    d, src = tmp_path_factory.mktemp("longstores"), open_source(long_gguf)
    return {n: convert(src, d / f"n{n}", n, quiet=True) for n in (1, 2, 3)}


# ---- a rank dies or fails mid-generation -------------------------------------------------------------


def mpi_ranks(launcher: subprocess.Popen) -> dict[int, psutil.Process]:
    """The ranks this mpirun started (its descendants only, never anyone else's), by MPI rank."""
    out = {}
    for c in psutil.Process(launcher.pid).children(recursive=True):
        try:
            rank = c.environ().get("OMPI_COMM_WORLD_RANK")
        except psutil.Error:
            continue
        if rank is not None:
            out[int(rank)] = c
    return out


def start_generating(env, store_dir: Path, n: int, *extra, settle=1.5):
    """mpirun a generation of (practically) endless length; return it once every rank has opened its
    weight file and `settle` more seconds have passed, so that it is in the decode loop. Under mpirun the
    streamed text only arrives at a newline, which the tiny model rarely prints, so output cannot tell."""
    cmd = ["mpirun", "-np", str(n), sys.executable, "-m", "tpimpi.generate", "--model", str(store_dir),
           "--prompt", "Hello", "--raw", "--max-new-tokens", "100000", "--max-seq-len", str(LONG_CONTEXT - 48),
           *map(str, extra)]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while True:
        ranks = mpi_ranks(p)
        try:
            ready = len(ranks) == n and all(
                any(f.path.endswith(store.rank_file_name(r)) for f in pr.open_files()) for r, pr in ranks.items())
        except psutil.Error:
            ready = False
        if ready:
            break
        if p.poll() is not None or time.monotonic() > deadline:
            p.kill()
            pytest.fail(f"the run ended or hung before generating: {p.communicate()[1].decode()}")
        time.sleep(0.1)
    time.sleep(settle)
    assert p.poll() is None, "the generation ended before the test could interfere"
    return p, ranks


def wait_ended(p: subprocess.Popen, since: float) -> tuple[float, str]:
    """(seconds from `since` until the job ended, its standard error)."""
    try:
        _, err = p.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        pytest.fail(f"the job was still running 60 s after the failure: {p.communicate()[1].decode()}")
    return time.monotonic() - since, err.decode(errors="replace")


def _running(pr: psutil.Process) -> bool:
    try:
        return pr.is_running() and pr.status() != psutil.STATUS_ZOMBIE  # a zombie has exited, unreaped
    except psutil.NoSuchProcess:
        return False


def assert_all_gone(procs, within=5.0) -> None:
    deadline = time.monotonic() + within
    for pr in procs:
        while _running(pr):
            if time.monotonic() > deadline:
                pytest.fail(f"rank process {pr.pid} is still running {within} s after the job ended")
            time.sleep(0.1)


@pytest.mark.parametrize("victim", [1, 0])
def test_a_killed_rank_ends_the_job_and_is_named(env, long_stores, victim):
    p, ranks = start_generating(env, long_stores[3], 3)
    pid = ranks[victim].pid
    ranks[victim].send_signal(signal.SIGKILL)
    took, err = wait_ended(p, time.monotonic())
    assert p.returncode != 0 and took < 10, (p.returncode, took, err)
    # Open MPI's launcher says which rank died, e.g. "prterun noticed that process rank 1 with PID 4242
    # on node vm exited on signal 9 (Killed)."
    flat = " ".join(err.split())
    assert f"process rank {victim} with PID {pid}" in flat and "exited on signal 9" in flat, err
    assert_all_gone(ranks.values())


def test_a_weight_file_cut_short_mid_run_ends_the_job_with_one_message(env, long_stores, tmp_path):
    st = shutil.copytree(long_stores[3], tmp_path / "s3")
    p, ranks = start_generating(env, st, 3, "--window", 1)  # window 1: every block is re-read every token
    os.truncate(st / store.rank_file_name(1), store.ALIGN)  # the header stays, every block is gone
    took, err = wait_ended(p, time.monotonic())
    assert p.returncode == 2 and took < 10, (p.returncode, took, err)
    assert "Traceback" not in err, err
    said = [l for l in err.splitlines() if l.startswith("tpimpi: error")]
    assert len(said) == 1 and "rank 1" in said[0] and "rank001.safetensors" in said[0], err
    assert_all_gone(ranks.values())


# ---- a damaged weight file -----------------------------------------------------------------------


def _damage(st, rank: int, keep_mtime: bool, nbytes: int = 200 << 10) -> None:
    """Overwrite nbytes (or what there is) of a rank's layer blocks with 0xff (float32 NaN), size unchanged."""
    f = st / store.rank_file_name(rank)
    rs = store.RankStore(st, rank, 2)
    start, end = rs.block_offset(0), rs.block_offset(rs.n_blocks - 1) + rs.layout(rs.n_blocks - 1).nbytes
    rs.close()
    before = f.stat()
    with open(f, "r+b") as fh:
        fh.seek(start)
        fh.write(b"\xff" * min(nbytes, end - start))
    if keep_mtime:
        os.utime(f, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert f.stat().st_size == before.st_size and f.stat().st_ino == before.st_ino


def test_damage_the_stamp_cannot_see_is_caught_by_the_non_finite_check(env, long_stores, tmp_path):
    st = shutil.copytree(long_stores[2], tmp_path / "s2")
    for r in range(2):
        store.RankStore(st, r, 2, verify="auto").close()  # the copy verified and stamped, as a first run does
    _damage(st, 1, keep_mtime=True)  # size, mtime and inode as stamped: the file is not hashed again
    p = generate(env, "--model", st, "--prompt", "Hello", "--raw", "--max-new-tokens", 4, np=2)
    assert_one_clear_error(p, "the hidden states are not finite")
    said = errors(p)[0]
    assert "from rank 1 in layers.0.attn" in said and "--verify" in said, said
    assert "checking" not in p.stderr.decode()
    p = generate(env, "--model", st, "--prompt", "Hello", "--raw", "--max-new-tokens", 4, "--verify", np=2)
    assert_one_clear_error(p, "rank001.safetensors: checksum does not match the manifest")


def test_damage_is_found_before_the_run_without_being_asked(env, long_stores, tmp_path):
    st = shutil.copytree(long_stores[2], tmp_path / "s2")
    _damage(st, 1, keep_mtime=False)
    p = generate(env, "--model", st, "--prompt", "Hello", "--raw", "--max-new-tokens", 4, np=2)
    assert_one_clear_error(p, "rank001.safetensors: checksum does not match the manifest")
    assert "rank 1: checking rank001.safetensors" in p.stderr.decode()
    p = generate(env, "--model", st, "--prompt", "Hello", "--raw", "--max-new-tokens", 4, "--no-verify", np=2)
    assert_one_clear_error(p, "from rank 1 in layers.0.attn")  # skipped on request: the run's check remains


@pytest.mark.parametrize("row,match", [(-1, "the logits are not finite"), (0, "embedding rows of the input")])
def test_damage_to_rank0s_embedding_or_head_is_named(long_stores, tmp_path, row, match):
    """The head (tied: the embedding table) is rank 0's alone: NaN there is caught where it is used."""
    from harness import run_store
    from tpimpi.comm import SerialComm
    from tpimpi.errors import StoreError

    st = shutil.copytree(long_stores[1], tmp_path / "s1")
    rs = store.RankStore(st, 0, 1, verify="auto")  # verified and stamped
    row_bytes = rs.cfg.hidden * 4
    offset = rs.offsets["embed"] + (row % rs.cfg.vocab) * row_bytes  # the last row is no prompt token's
    rs.close()
    f = st / store.rank_file_name(0)
    before = f.stat()
    with open(f, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\xff" * row_bytes)
    os.utime(f, ns=(before.st_atime_ns, before.st_mtime_ns))  # past the stamp
    with pytest.raises(StoreError, match=match + ".*--verify"):
        run_store(st, SerialComm(), [0, 5, 7], 1)


# ---- a conversion is killed -------------------------------------------------------------------------


def conversion_cmd(kind: str, source: Path, out: Path) -> list[str]:
    if kind == "convert":
        return [sys.executable, "-m", "tpimpi.convert", str(source), "--ranks", "2", "--out", str(out), "--quiet"]
    return [sys.executable, "-m", "tpimpi.synth", "--shape", "smollm2-135m", "--layers", "4", "--ranks", "2",
            "--out", str(out), "--quiet"]


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.glob(f".{out.name}.tmp-*"))


def assert_absent_or_complete(out: Path) -> None:
    """Only a finished conversion renames its output into place, so whatever is there must verify."""
    if out.exists():
        for r in range(2):
            store.RankStore(out, r, 2, verify=True).close()


@pytest.mark.parametrize("kind", ["convert", "synth"])
def test_a_killed_conversion_never_leaves_a_store_and_the_next_one_cleans_up(tiny_gguf, tmp_path, kind):
    out = tmp_path / "s"
    # kill points: during start-up, part-way through writing (synth starts writing in under 1 s and writes
    # for 1-3 s, convert starts in 2-3 s: synth is killed at more points), and as the first bytes are
    # written. That one comes last: each run removes dead runs' leftovers first, so the leftover checked
    # below is the last kill's, and a run killed 2 s in may already have finished on a quiet machine.
    points = [("start", 0.3)] + ([("tmp", 0.5), ("tmp", 2.0)] if kind == "synth" else []) + [("tmp", 0.0)]
    for trigger, delay in points:
        p = subprocess.Popen(conversion_cmd(kind, tiny_gguf, out), stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while trigger == "tmp" and not leftovers(out) and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert_absent_or_complete(out)
    assert leftovers(out), "no kill landed while the conversion was writing"
    p = subprocess.run(conversion_cmd(kind, tiny_gguf, out), capture_output=True)  # running it again
    assert p.returncode == 0, p.stderr.decode()
    assert_absent_or_complete(out)
    assert os.listdir(tmp_path) == ["s"]  # the killed conversions' temporary directories are gone


def test_only_leftovers_of_dead_conversions_are_removed(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer runs
    keep = [".s.tmp-1", ".s.tmp-x", f".s2.tmp-{dead.pid}"]  # a live pid (init), not a pid, another output
    for name in keep + [f".s.tmp-{dead.pid}", f".s.old-{dead.pid}"]:
        (tmp_path / name).mkdir()
    remove_leftovers(tmp_path / "s")  # what convert() does first
    assert sorted(os.listdir(tmp_path)) == sorted(keep)


# ---- long runs stay flat ------------------------------------------------------------------------------

PROBE = textwrap.dedent('''
    """Runs tpimpi.generate recording this rank's resident memory every 0.1 s and when decoding began and
    ended (perf_counter, the clock of token_times_s); writes OUT_DIR/rss-RANK.json."""
    import json, os, sys, threading, time
    from tpimpi import engine, generate

    samples, marks = [], {}

    def sample():
        while True:
            with open("/proc/self/status") as f:
                kb = next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
            samples.append((time.perf_counter(), kb * 1024))
            time.sleep(0.1)

    def timed(*a, **k):
        marks["start"] = time.perf_counter()
        try:
            return real(*a, **k)
        finally:
            marks["end"] = time.perf_counter()

    real, engine.decode_loop = engine.decode_loop, timed
    threading.Thread(target=sample, daemon=True).start()
    code = generate.main(sys.argv[2:])
    with open(os.path.join(sys.argv[1], "rss-%s.json" % os.environ.get("OMPI_COMM_WORLD_RANK", "0")), "w") as f:
        json.dump(dict(marks, samples=samples), f)
    sys.exit(code)
''')


@pytest.mark.alone  # the median gap early against late: a test beside it would load one stretch and not the other
def test_a_thousand_tokens_keep_memory_and_latency_flat(env, long_stores, tmp_path):
    (tmp_path / "probe.py").write_text(PROBE)
    p = generate(env, tmp_path, "--model", long_stores[2], "--prompt", "Hello", "--raw", "--max-new-tokens", 1000,
                 "--max-seq-len", 1100, "--json", np=2, script=tmp_path / "probe.py")
    assert p.returncode == 0, p.stderr.decode()
    times = json.loads(p.stdout)["token_times_s"]
    assert len(times) == 1000
    for rank in range(2):
        rec = json.loads((tmp_path / f"rss-{rank}.json").read_text())
        warm = rec["start"] + times[99]  # after 100 tokens every buffer has been used at least once
        rss = [b for t, b in rec["samples"] if warm <= t <= rec["end"]]
        assert len(rss) >= 10, rec
        assert max(rss) <= 1.05 * rss[0], f"rank {rank}: resident memory grew from {rss[0]} to {max(rss)} bytes"
    # Attention over the growing context is the only per-token cost that may grow; for this tiny model it
    # is a small part of a step, so the median gap stays put (3.5-3.8 ms here from first to last 100).
    # Work in proportion to the context (no KV cache, re-running the prompt, a growing copy) would make
    # the gaps at contexts 700-1000 about 5x those at 10-310. 3x leaves room for another process taking a
    # core for a second (that doubles the gaps while it lasts); 300-token windows make one such burst
    # cover only part of a window.
    gaps = [b - a for a, b in zip(times, times[1:])]
    early, late = statistics.median(gaps[10:310]), statistics.median(gaps[-300:])
    assert late < 3 * early, f"median gap {early * 1e3:.2f} ms at tokens 10-310, {late * 1e3:.2f} ms at 700-1000"


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) * 1024


def test_many_prompts_through_one_engine_do_not_grow_memory(long_stores):
    from tpimpi.comm import SerialComm
    from tpimpi.engine import Engine, MemoryOptions
    from tpimpi.sampling import SamplingConfig

    eng = Engine(SerialComm(), long_stores[1], max_seq=128, mem=MemoryOptions(resident=True)).load()
    rss = []
    for i in range(30):
        ids = eng.encode_prompt(f"Question {i}: what is {i} times {'seven ' * (i % 7)}?")
        r = eng.generate(ids, SamplingConfig(), 8, stop_at_eos=False)
        assert len(r["token_ids"]) == 8
        rss.append(_rss())
    eng.close()
    grown = max(rss[10:]) - rss[9]
    assert grown < 4 << 20, f"resident memory grew by {grown / 2**20:.1f} MiB over 20 prompts: {rss}"


# ---- bad arguments: one message from rank 0, exit code 2, no traceback --------------------------------


@pytest.mark.parametrize("args,match", [
    (["--window", "1000"], "--window 1000 is out of range"),
    (["--mem-budget", "1M"], re.compile(r"--mem-budget 1 MiB is too small for this rank: before any weights it holds \d+ MiB .* --max-seq-len")),
    (["--ratios", "1,0"], "--ratios '1,0': every ratio must be a positive number"),
    (["--prefill-chunk", "0"], "--prefill-chunk 0 must be at least 1"),
    (["--io", "bogus"], "argument --io: invalid choice: 'bogus'"),
])
def test_bad_arguments_under_mpirun(env, tiny_gguf, args, match):
    p = generate(env, "--model", tiny_gguf, "--prompt", "hi", *args, np=2)
    if isinstance(match, re.Pattern):
        assert_one_clear_error(p, "")
        assert match.search(errors(p)[0]), errors(p)[0]
    else:
        assert_one_clear_error(p, match)


def test_a_huge_ratio_is_a_usage_error(env, tiny_gguf):
    assert_one_clear_error(generate(env, "--model", tiny_gguf, "--prompt", "hi", "--ratios", "1e308"), "--ratios")


def test_any_exception_on_one_rank_is_every_ranks_error():
    """engine.collective hands any exception to the agreement, not only tpimpi's own: a bug raising on one
    rank (a division by zero on a rank without heads, say) becomes every rank's RankFailure (comm.agree,
    tested under MPI in test_mpi.py) instead of leaving the others waiting in the next collective call."""
    from tpimpi.comm import RankFailure, SerialComm
    from tpimpi.engine import collective

    class Recording(SerialComm):
        said = []

        def agree(self, error):
            self.said.append(error)
            super().agree(error)

    c = Recording()
    assert collective(c, lambda: 7) == 7 and c.said == [None]
    with pytest.raises(RankFailure, match=r"ZeroDivisionError: .* \(unexpected: a bug in tpimpi"):
        collective(c, lambda: 1 // 0)
    with pytest.raises(RankFailure, match="^no such store$"):
        collective(c, lambda: (_ for _ in ()).throw(store.StoreError("no such store")))
    assert c.said[1].startswith("ZeroDivisionError") and c.said[2] == "no such store"
