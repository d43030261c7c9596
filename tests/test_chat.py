"""Chat as people use it: multi-turn with the KV cache kept, stop strings, the repetition penalty, and
what appears on the terminal under mpirun. References: transformers' generate on the same weights."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from tpimpi.chat import Conversation, common_prefix
from tpimpi.comm import SerialComm
from tpimpi.convert import convert
from tpimpi.engine import Engine, MemoryOptions
from tpimpi.errors import UsageError
from tpimpi.sampling import SamplingConfig, StopText
from tpimpi.tokenizer import TOKENIZER_CONFIG_JSON, TOKENIZER_JSON, Tokenizer

MAX_SEQ = 128


@pytest.fixture(scope="module")
def engine(tiny_source, tmp_path_factory):
    store = convert(tiny_source, tmp_path_factory.mktemp("chat") / "s1", 1, quiet=True)
    eng = Engine(SerialComm(), store, max_seq=MAX_SEQ, mem=MemoryOptions(resident=True)).load()
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def reference(tiny_hf):
    """transformers' model and tokenizer on the same weights as tiny_gguf."""
    from tinymodels import hf_model, hf_tokenizer

    return hf_model(tiny_hf), hf_tokenizer(tiny_hf)


def hf_generate(reference, ids, n, **kwargs) -> list[int]:
    model, tok = reference
    x = torch.tensor([ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                         tokenizer=tok, **kwargs)
    return out[0, len(ids):].tolist()


def chat_ids(tok, text):
    return tok.encode_chat([{"role": "user", "content": text}])


# ---------------------------------------------------------------- stop strings and repetition penalty


def test_stop_string_stops_where_transformers_does(engine, reference):
    ids = chat_ids(engine.tok, "Hello there")
    free = hf_generate(reference, ids, 12)
    text = engine.tok.decode(free)
    # a stop string that spans a token boundary and occurs first there
    cuts = [len(engine.tok.decode(free[:k])) for k in range(2, 10)]
    cut = next(c for c in cuts if text.find(text[c - 2: c + 3]) == c - 2)
    stop = text[cut - 2: cut + 3]
    expected = hf_generate(reference, ids, 12, stop_strings=[stop])
    assert len(expected) < 12
    r = engine.generate(ids, SamplingConfig(), 12, stop=(stop, "never appears"))
    assert r["token_ids"] == expected and r["stop_reason"] == "stop_string"
    assert r["text"] == text[: cut - 2]  # the answer ends before the stop string


def test_repetition_penalty_matches_transformers(engine, reference):
    ids = chat_ids(engine.tok, "Hello there")
    plain = engine.generate(ids, SamplingConfig(), 10)["token_ids"]
    penalized = engine.generate(ids, SamplingConfig(repetition_penalty=1.8), 10)["token_ids"]
    assert penalized != plain, "the tiny model repeats itself; the penalty must change its answer"
    assert penalized == hf_generate(reference, ids, 10, repetition_penalty=1.8)
    assert engine.generate(ids, SamplingConfig(repetition_penalty=0.7), 10)["token_ids"] == \
        hf_generate(reference, ids, 10, repetition_penalty=0.7)


def test_stop_text_holds_back_a_possible_stop_string():
    stop = StopText(("END",), context="prompt ")
    assert stop.add("ab") == "ab"
    assert stop.add("cE") == "c"  # "E" may begin "END"
    assert stop.add("x") == "Ex"
    assert stop.add("yEN") == "y"
    assert stop.add("Dz") == "" and stop.stopped and stop.text == "abcExy"
    stop = StopText(("END",))
    stop.add("abE")
    assert stop.finish() == "E" and stop.text == "abE"
    stop = StopText(("\nUser",), context="Assistant:\n")  # a stop string may begin in the prompt
    assert stop.add("User said") == "" and stop.stopped and stop.text == ""
    with pytest.raises(UsageError):
        StopText(("",))


# ---------------------------------------------------------------- multi-turn with the cache kept


def run_turns(engine, conv, turns, n):
    """Each turn through Conversation and generate as the chat does: [(ids, start, result)]."""
    out = []
    for text in turns:
        ids, start = conv.turn(text)
        result = engine.generate(ids, SamplingConfig(), n, start_pos=start)
        conv.answered(text, ids, result)
        out.append((ids, start, result))
    return out


def test_turns_keep_the_cache_and_match_transformers(engine, reference):
    model, _ = reference
    from tinymodels import hf_greedy

    conv = Conversation(engine.tok, MAX_SEQ)
    turns = run_turns(engine, conv, ["Hello there", "And then?", "Why?"], 5)
    for k, (ids, start, result) in enumerate(turns):
        assert result["token_ids"] == hf_greedy(model, ids, 5), f"turn {k + 1}"
        assert len(result["token_ids"]) == 5  # the tiny model never ends a turn on its own
    first_ids = turns[0][0]
    # each turn fed only what the cache did not hold: at least the whole previous prompt was kept
    assert turns[1][1] >= len(turns[0][0]) and turns[2][1] >= len(turns[1][0])
    conv.reset()
    assert conv.turn("Hello there") == (first_ids, 0)


def test_a_template_that_rewrites_history_recomputes_from_the_change(engine, reference):
    model, _ = reference
    from tinymodels import hf_greedy

    files = {TOKENIZER_JSON: engine.tok._backend.to_str(),
             TOKENIZER_CONFIG_JSON: json.dumps({**engine.tok._config, "chat_template":
                                                "turn {{ messages|length }}{% for m in messages %}|{{ m['content'] }}"
                                                "{% endfor %}|answer:"})}
    conv = Conversation(Tokenizer.from_files(files), MAX_SEQ)
    turns = run_turns(engine, conv, ["Hello there", "And then?"], 4)
    ids, start, result = turns[1]
    assert 0 < start < 4  # "turn " is kept, the count after it changed and everything after is fed again
    assert result["token_ids"] == hf_greedy(model, ids, 4)


def test_a_full_context_is_said_and_reset_clears_it(engine):
    conv = Conversation(engine.tok, MAX_SEQ)
    long = "Hello there " * 44  # leaves a few positions to generate into
    ids, start = conv.turn(long)
    assert MAX_SEQ - 20 < len(ids) < MAX_SEQ
    result = engine.generate(ids, SamplingConfig(), MAX_SEQ, start_pos=start)
    assert result["stop_reason"] == "context_full" and result["positions"] == MAX_SEQ
    conv.answered(long, ids, result)
    with pytest.raises(UsageError, match="/reset"):
        conv.turn("more")
    conv.reset()
    assert conv.turn("more")[1] == 0


# ---------------------------------------------------------------- under mpirun, as a user runs it


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = dict(os.environ, TPIMPI_CACHE=str(tmp_path_factory.mktemp("cache")), HF_HUB_OFFLINE="1")
    e.pop("OMPI_COMM_WORLD_SIZE", None)
    if os.geteuid() == 0:
        e.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    e.setdefault("PRTE_MCA_rmaps_default_mapping_policy", ":oversubscribe")
    return e


def test_scripted_chat_under_mpirun(env, tiny_gguf, engine):
    conv = Conversation(engine.tok, 96)
    answers = [r["text"] for _, _, r in run_turns(engine, conv, ["Hello there", "And then?"], 5)]
    script = "Hello there\nAnd then?\n/reset\nHello there\n" + "long " * 100 + "\n"
    p = subprocess.run(["mpirun", "-np", "2", sys.executable, "-m", "tpimpi.generate", "--model", tiny_gguf,
                        "--chat", "--max-new-tokens", "5", "--max-seq-len", "96"],
                       input=script.encode(), env=env, capture_output=True, timeout=240)
    err = p.stderr.decode()
    assert p.returncode == 0, err  # the end of the script ends the job, although mpirun never forwards it
    assert p.stdout.decode() == "".join(a + "\n" for a in [answers[0], answers[1], answers[0]])
    assert "[new conversation]" in err and "type /reset to start a new one" in err and "Traceback" not in err


def test_streamed_text_arrives_token_by_token_then_the_statistics(env, tiny_gguf, tmp_path, engine):
    """With `mpirun --output :raw` (Open MPI forwards output a line at a time without it) the answer
    reaches the terminal token by token on stdout and ends with a newline; the statistics line goes to
    stderr. mpirun forwards the two streams separately, so their order on a shared terminal is not fixed
    (under load the statistics have overtaken the answer's last newline): each stream is checked alone."""
    (tmp_path / "prompt").write_text("Hello there")
    text = engine.generate(engine.encode_prompt("Hello there"), SamplingConfig(), 6)["text"]
    args = [sys.executable, "-m", "tpimpi.generate", "--model", tiny_gguf, "--prompt-file", tmp_path / "prompt",
            "--max-new-tokens", "6", "--link-latency-ms", "40"]  # a token every 2 layers x 2 allreduces x 40 ms
    with open(tmp_path / "stderr", "wb") as err:
        proc = subprocess.Popen(["mpirun", "--output", ":raw", "-np", "2", *map(str, args)],
                                env=env, stdout=subprocess.PIPE, stderr=err)
        reads, t0 = [], time.monotonic()
        while chunk := os.read(proc.stdout.fileno(), 1 << 16):
            reads.append((time.monotonic() - t0, chunk.decode(errors="replace")))
        code = proc.wait(timeout=120)
    out, errtext = "".join(c for _, c in reads), (tmp_path / "stderr").read_text(errors="replace")
    assert code == 0, out + errtext
    assert out.endswith(text + "\n"), out
    assert " prompt tokens, " in errtext and " prompt tokens, " not in out, errtext
    # the answer came in pieces: at least three reads carried some of its text, each before the next token
    pieces = [c for _, c in reads if c.strip() and c in text]
    assert len(pieces) >= 3, reads
