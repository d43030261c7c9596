"""The server as a client sees it: the official `openai` client against `tpimpi.serve` under mpirun at 1 and
3 ranks (one server start per rank count), compared with `tpimpi.generate` and with itself unbatched."""

import json
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import serve_harness
from test_generate import env, generate  # noqa: F401 (env is a fixture)

openai = pytest.importorskip("openai", reason="the openai client is a test dependency: pip install openai")

SYSTEM, USER = "You are terse.", "Hello there"
N_TOKENS = 10
PROMPTS = ["Hello there", "What is the capital of France?", "Count to five.", "Tell me a story",
           "a", "Why is the sky blue? Explain it to a child in a few sentences.", "2+2=", "Bonjour"]


@pytest.fixture(scope="module", params=[1, 3], ids=["np1", "np3"])
def server(request, env, tiny_gguf, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"serve{request.param}")
    # a target far above any step: the latency model runs (admission, prompt rows) without holding anyone back
    srv = serve_harness.start(env, tiny_gguf, request.param, "--max-batch", 8, "--prefill-chunk", 16,
                              "--max-token-latency-ms", 60000, "--step-log", tmp / "steps.jsonl", tmp=tmp)
    srv.step_log = tmp / "steps.jsonl"
    yield srv
    srv.terminate()
    assert srv.wait(30) == 0, srv.stderr
    assert "Traceback" not in srv.stderr, srv.stderr


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(env, tiny_gguf):
    """What tpimpi.generate answers to the same conversation, greedy."""
    p = generate(env, "--model", tiny_gguf, "--system", SYSTEM, "--prompt", USER, "--max-new-tokens", N_TOKENS,
                 "--prefill-chunk", 16, "--json")
    assert p.returncode == 0, p.stderr.decode()
    return json.loads(p.stdout)


def chat(client, user=USER, **kw):
    kw.setdefault("max_tokens", N_TOKENS)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model="tiny", messages=[{"role": "system", "content": SYSTEM},
                                                                  {"role": "user", "content": user}], **kw)


def health(server) -> dict:
    with urllib.request.urlopen(server.url + "/health", timeout=10) as r:
        return json.loads(r.read())


def test_greedy_chat_is_what_generate_answers(client, reference):
    r = chat(client)
    assert r.choices[0].message.content == reference["text"]
    assert r.usage.completion_tokens == len(reference["token_ids"])
    assert r.usage.prompt_tokens == reference["prompt_tokens"]
    assert r.choices[0].finish_reason == ("stop" if len(reference["token_ids"]) < N_TOKENS else "length")


def test_streamed_deltas_make_the_same_text(client, reference):
    chunks = list(chat(client, stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(deltas) == reference["text"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(reference["token_ids"])


def test_completions_models_and_health(client, server, reference):
    assert [m.id for m in client.models.list()] == ["tiny"]
    r = client.completions.create(model="tiny", prompt="Hello there", max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 4 and r.choices[0].text
    h = health(server)
    assert h["status"] == "ok" and h["free_slots"] == 8 and h["running"] == 0


def test_the_prompt_cache_feeds_only_where_a_prompt_differs(client, server, reference):
    """A request takes the free slot whose last sequence shares the longest start with its prompt (here the
    chat template and system prompt) and is fed from there: the usage says how many prompt tokens were
    cached, and the answer is what generate gives with the whole prompt fed."""
    other = chat(client, "Count to five.")
    before = health(server)["cached_prompt_tokens"]
    r = chat(client)
    cached = r.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < r.usage.prompt_tokens and health(server)["cached_prompt_tokens"] == before + cached
    assert r.choices[0].message.content == reference["text"]
    again = chat(client)  # the same conversation again: all but the last prompt token held
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
    assert again.choices[0].message.content == reference["text"] and other.usage.prompt_tokens > cached


def test_a_seed_repeats_a_sample_and_stop_strings_cut_the_text(client, reference):
    a, b = (chat(client, temperature=1.0, seed=7, max_tokens=8).choices[0].message.content for _ in range(2))
    assert a == b
    text = reference["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    r = chat(client, stop=[stop])
    assert r.choices[0].message.content == text[: text.index(stop)] and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in chat(client, stop=stop, stream=True) if c.choices)
    assert streamed == text[: text.index(stop)]


def test_eight_concurrent_clients_get_what_they_get_alone(client, server):
    alone = [chat(client, p).choices[0].message.content for p in PROMPTS]
    before = health(server)
    start = threading.Barrier(len(PROMPTS))

    def one(p):
        start.wait()
        return chat(client, p, stream=True)

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = ["".join(c.choices[0].delta.content or "" for c in s if c.choices) for s in pool.map(one, PROMPTS)]
    after = health(server)
    assert together == alone
    rows, steps = after["rows"] - before["rows"], after["steps"] - before["steps"]
    assert rows / steps > 3, (rows, steps)  # the sequences shared forward passes


def test_the_step_log_and_the_bench_clients_times_join(server, tmp_path):
    """Every chunk a bench client read is matched with the step that produced it (the step log names the
    responses each step gave text to), a step's times are in order and share the client's clock, and a gap
    is the server's cycle between its two steps plus the change in delivery delay (tpimpi.serve.tail). The
    bench's clients take the requests from one list: each is sent once, whichever client is free."""
    import asyncio

    from tpimpi.serve import bench, tail

    _, reqs = asyncio.run(bench.run_load(server.url, 3, 2, 6, None))
    assert sorted(r["request"] for r in reqs) == list(range(6)) and {r["client"] for r in reqs} <= {0, 1, 2}
    for _ in range(100):  # a step's line is written just after its tokens went out
        steps = [json.loads(line) for line in server.step_log.read_text().splitlines()]
        if steps and steps[-1]["active"] == 0:  # the line of the step that ended the last request
            break
        time.sleep(0.05)
    assert steps and all(s["ask"] <= s["start"] <= s["forward"] <= s["end"] for s in steps)
    assert all(s["decode"] + s["prefill"] >= 1 and s["active"] >= 0 for s in steps)
    gaps = tail.gaps(steps, reqs)
    assert len(gaps) >= sum(len(r["times"]) - 2 for r in reqs) > 0
    for g in gaps:
        assert g["steps"] >= 1 and g["server"] > 0 and abs(g["lag_b"]) < 30
        assert g["gap"] == pytest.approx(g["server"] + g["lag_b"] - g["lag_a"], abs=1e-9)
    assert "gaps over" in tail.report(steps, reqs)
