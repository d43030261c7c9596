"""The command line as a user runs it: serial and under mpirun, good and bad input."""

import json
import os
import pty
import select
import subprocess
import sys
import time

import pytest

from tpimpi import stdin as stdin_mod
from tpimpi.convert import convert


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = dict(os.environ, TPIMPI_CACHE=str(tmp_path_factory.mktemp("cache")), HF_HUB_OFFLINE="1")
    e.pop("OMPI_COMM_WORLD_SIZE", None)
    if os.geteuid() == 0:
        e.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    e.setdefault("PRTE_MCA_rmaps_default_mapping_policy", ":oversubscribe")
    return e


def generate(env, *args, np=1, stdin=None, script=None, timeout=120):
    """Run the command line (or `script` with its arguments); stdin is bytes to pipe in, or a file object
    (e.g. subprocess.DEVNULL)."""
    cmd = [sys.executable] + ([str(script)] if script else ["-m", "tpimpi.generate"]) + [str(a) for a in args]
    if np > 1:
        cmd = ["mpirun", "-np", str(np)] + cmd
    if isinstance(stdin, bytes):
        return subprocess.run(cmd, env=env, input=stdin, capture_output=True, timeout=timeout)
    return subprocess.run(cmd, env=env, stdin=stdin, capture_output=True, timeout=timeout)


def errors(proc) -> list[str]:
    return [l for l in proc.stderr.decode(errors="replace").splitlines() if l.startswith("tpimpi: error:")]


def assert_one_clear_error(proc, match):
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 2, err
    assert "Traceback" not in err, err
    assert len(errors(proc)) == 1, err
    assert match in errors(proc)[0], err


@pytest.fixture(scope="module")
def serial_run(env, tiny_gguf):
    p = generate(env, "--model", tiny_gguf, "--prompt", "Hello there", "--max-new-tokens", 6, "--json")
    assert p.returncode == 0, p.stderr.decode()
    return json.loads(p.stdout)


def test_json_output_has_what_was_promised(serial_run):
    r = serial_run
    for key in ("text", "token_ids", "prompt_tokens", "ttft_s", "decode_tokens_per_s", "peak_rss_bytes"):
        assert key in r
    assert 1 <= len(r["token_ids"]) <= 6 and r["prompt_tokens"] > 3
    assert len(r["peak_rss_bytes"]) == 1 and r["peak_rss_bytes"][0] > 10 << 20


@pytest.mark.parametrize("np_,algo", [(2, "star"), (3, "mpi"), (2, "auto")])
def test_mpirun_gives_the_serial_tokens(env, tiny_gguf, serial_run, np_, algo):
    p = generate(env, "--model", tiny_gguf, "--prompt", "Hello there", "--max-new-tokens", 6, "--json",
                 "--allreduce", algo, np=np_)
    assert p.returncode == 0, p.stderr.decode()
    r = json.loads(p.stdout)
    assert r["token_ids"] == serial_run["token_ids"] and len(r["peak_rss_bytes"]) == np_
    if algo == "auto":  # what it chose, measured from one token's hidden state (72 floats in the tiny model) up
        table = r["allreduce_auto"]
        assert table[0]["up_to_floats"] == 72 and table[-1]["up_to_floats"] == 256 * 72  # [prefill chunk, hidden]
        assert {c["algorithm"] for c in table} <= {"star", "mpi", "reduce_bcast", "ring", "tree"}
    else:
        assert r["allreduce_auto"] is None


def test_a_first_run_converts_in_another_process(env, tiny_gguf, tmp_path):
    """So the conversion's memory is not in the running rank's peak RSS: the GGUF reader never loads here."""
    code = ("import sys; from tpimpi.models import prepare; st = prepare(sys.argv[1], 1); "
            "print(st.is_dir(), 'gguf' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code, str(tiny_gguf)], env=dict(env, TPIMPI_CACHE=str(tmp_path)),
                       capture_output=True, timeout=60)
    assert p.returncode == 0, p.stderr.decode()
    assert p.stdout.decode().split() == ["True", "False"]


def test_prompt_from_stdin_and_streamed_text(env, tiny_gguf, serial_run):
    p = generate(env, "--model", tiny_gguf, "--max-new-tokens", 6, np=2, stdin=b"Hello there")
    assert p.returncode == 0, p.stderr.decode()
    assert p.stdout.decode() == serial_run["text"] + "\n"  # the answer ends its line


@pytest.mark.parametrize("stdin", [b"", subprocess.DEVNULL], ids=["empty pipe", "/dev/null"])
def test_empty_stdin_under_mpirun_is_an_error_at_once(env, tiny_gguf, stdin):
    """Open MPI 5.0's mpirun never passes on the end of its input; tpimpi sees it on mpirun's side (before,
    it waited 60 s for a first byte)."""
    t = time.monotonic()
    p = generate(env, "--model", tiny_gguf, np=2, stdin=stdin)
    assert_one_clear_error(p, "the prompt is empty")
    assert time.monotonic() - t < stdin_mod.STDIN_FIRST_S


def test_a_terminal_is_told_the_prompt_is_awaited(env, tiny_gguf):
    """mpirun's standard input is a terminal: rank 0 says it waits, and Ctrl-D ends the prompt."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: mpirun on a terminal
        os.execvpe("mpirun", ["mpirun", "-np", "2", sys.executable, "-m", "tpimpi.generate", "--model",
                              str(tiny_gguf), "--max-new-tokens", "3", "--json"], env)
    out, typed, t0 = b"", False, time.monotonic()
    try:
        while time.monotonic() - t0 < 120:
            if select.select([fd], [], [], 0.1)[0]:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:  # the terminal closed: mpirun has exited
                    break
                if not chunk:
                    break
                out += chunk
            if not typed and b"waiting for the prompt on standard input" in out:
                os.write(fd, b"Hello there\n")
                time.sleep(0.5)
                os.write(fd, b"\x04")
                typed = True
    finally:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    text = out.decode(errors="replace")
    assert typed, text
    assert '"token_ids"' in text and "error" not in text, text


# ---- bad input: one message from rank 0, exit code 2, no traceback, no hang -------------------------


def test_missing_model(env):
    assert_one_clear_error(generate(env, "--model", "/nonexistent/model.gguf", "--prompt", "x", np=2),
                           "'/nonexistent/model.gguf' does not exist")


def test_prompt_longer_than_context(env, tiny_gguf):
    assert_one_clear_error(generate(env, "--model", tiny_gguf, "--prompt", "word " * 50, "--max-seq-len", 16, np=2),
                           "--max-seq-len 16 leaves no room")


def test_store_split_for_another_rank_count(env, tiny_source, tmp_path):
    st = convert(tiny_source, tmp_path / "s3", 3, quiet=True)
    assert_one_clear_error(generate(env, "--model", st, "--prompt", "x", np=2),
                           "split for 3 ranks, launched with 2; split it for 2 with: python -m tpimpi.convert")


def test_damaged_worker_file(env, tiny_source, tmp_path):
    st = convert(tiny_source, tmp_path / "s2", 2, quiet=True)
    f = st / "rank001.safetensors"
    os.truncate(f, f.stat().st_size - 1)
    assert_one_clear_error(generate(env, "--model", st, "--prompt", "x", np=2), "rank 1: ")
    assert "rank001.safetensors" in errors(generate(env, "--model", st, "--prompt", "x", np=2))[0]


def test_conversion_options_are_refused_for_a_ready_store(env, tiny_source, tmp_path):
    """--dtype and --ratios choose how a source is converted; a store holding something else is not silently
    run as it is."""
    st = convert(tiny_source, tmp_path / "s2", 2, quiet=True)
    p = generate(env, "--model", st, "--dtype", "bfloat16", "--ratios", "2,1", np=2, stdin=b"hi")
    assert_one_clear_error(p, "--dtype bfloat16 (it holds float32) and --ratios 2,1 (it was split 1,1) cannot apply "
                              f"to the ready store '{st}'")
    assert "python -m tpimpi.convert" in errors(p)[0] and "--ranks 2 --dtype bfloat16 --ratios 2,1" in errors(p)[0]


@pytest.mark.parametrize("args,match", [
    (["--temperature", "-1"], "--temperature -1.0"),
    (["--top-p", "0"], "--top-p 0.0"),
    (["--top-k", "-3"], "--top-k -3"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0"),
    (["--max-seq-len", "100000"], "exceeds the model's context"),
    (["--ratios", "1,2"], "--ratios has 2 values for 1 ranks"),
    (["--threads", "0"], "--threads 0"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["--prompt", "   "], "the prompt is empty"),
])
def test_bad_arguments(env, tiny_gguf, args, match):
    argv = ["--model", tiny_gguf] + (args if "--prompt" in args else ["--prompt", "hi"] + args)
    assert_one_clear_error(generate(env, *argv), match)


def test_prompt_that_is_not_utf8(env, tiny_gguf):
    assert_one_clear_error(generate(env, "--model", tiny_gguf, stdin=b"caf\xe9 \xff"), "not UTF-8")
