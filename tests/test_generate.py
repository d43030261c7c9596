"""The command line as a user runs it: serial and under mpirun, good and bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tpimpi.convert import convert

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = dict(os.environ, TPIMPI_CACHE=str(tmp_path_factory.mktemp("cache")), HF_HUB_OFFLINE="1")
    e.pop("OMPI_COMM_WORLD_SIZE", None)
    if os.geteuid() == 0:
        e.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    e.setdefault("PRTE_MCA_rmaps_default_mapping_policy", ":oversubscribe")
    return e


def generate(env, *args, np=1, stdin=None, script=None, timeout=120):
    cmd = [sys.executable] + ([str(script)] if script else ["-m", "tpimpi.generate"]) + [str(a) for a in args]
    if np > 1:
        cmd = ["mpirun", "-np", str(np)] + cmd
    return subprocess.run(cmd, env=env, input=stdin, capture_output=True, timeout=timeout)


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


@pytest.mark.parametrize("np_,algo", [(2, "star"), (3, "mpi")])
def test_mpirun_gives_the_serial_tokens(env, tiny_gguf, serial_run, np_, algo):
    p = generate(env, "--model", tiny_gguf, "--prompt", "Hello there", "--max-new-tokens", 6, "--json",
                 "--allreduce", algo, np=np_)
    assert p.returncode == 0, p.stderr.decode()
    r = json.loads(p.stdout)
    assert r["token_ids"] == serial_run["token_ids"] and len(r["peak_rss_bytes"]) == np_


def test_prompt_from_stdin_and_streamed_text(env, tiny_gguf, serial_run):
    p = generate(env, "--model", tiny_gguf, "--max-new-tokens", 6, np=2, stdin=b"Hello there")
    assert p.returncode == 0, p.stderr.decode()
    assert p.stdout.decode() == serial_run["text"] + "\n"  # the answer ends its line


def test_workers_never_open_the_tokenizer_embedding_or_source(env, tiny_gguf, tmp_path):
    p = generate(env, tmp_path, "--model", tiny_gguf, "--prompt", "a secret", "--max-new-tokens", 3,
                 np=3, script=HERE / "privacy_probe.py")
    assert p.returncode == 0, p.stderr.decode()
    master = json.loads((tmp_path / "opened-0.json").read_text())
    assert any(o.endswith("tokenizer.json") for o in master["opened"])  # the probe does see opens
    for rank in (1, 2):
        seen = json.loads((tmp_path / f"opened-{rank}.json").read_text())
        names = [os.path.basename(o) for o in seen["opened"]]
        assert f"rank00{rank}.safetensors" in names
        forbidden = {"tokenizer.json", "tokenizer_config.json", "rank000.safetensors", os.path.basename(tiny_gguf)}
        assert not forbidden & set(names)
        assert "tpimpi.tokenizer" not in seen["modules"] and "tokenizers" not in seen["modules"]


# ---- bad input: one message from rank 0, exit code 2, no traceback, no hang -------------------------


def test_missing_model(env):
    assert_one_clear_error(generate(env, "--model", "/nonexistent/model.gguf", "--prompt", "x", np=2),
                           "'/nonexistent/model.gguf' does not exist")


def test_prompt_longer_than_context(env, tiny_gguf):
    assert_one_clear_error(generate(env, "--model", tiny_gguf, "--prompt", "word " * 50, "--max-seq-len", 16, np=2),
                           "--max-seq-len 16 leaves no room")


def test_store_split_for_another_rank_count(env, tiny_gguf, tmp_path):
    st = convert(tiny_gguf, tmp_path / "s3", 3, quiet=True)
    assert_one_clear_error(generate(env, "--model", st, "--prompt", "x", np=2),
                           "split for 3 ranks, launched with 2; split it for 2 with: python -m tpimpi.convert")


def test_damaged_worker_file(env, tiny_gguf, tmp_path):
    st = convert(tiny_gguf, tmp_path / "s2", 2, quiet=True)
    f = st / "rank001.safetensors"
    os.truncate(f, f.stat().st_size - 1)
    assert_one_clear_error(generate(env, "--model", st, "--prompt", "x", np=2), "rank 1: ")
    assert "rank001.safetensors" in errors(generate(env, "--model", st, "--prompt", "x", np=2))[0]


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
