"""The server's edges: every error status, a full queue, a client that disconnects, SIGTERM mid-stream, a
rank that dies, and the refusal to listen beyond loopback without a key. One server at 2 ranks with 2 slots."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import psutil
import pytest
import serve_harness
from pathlib import Path
from test_generate import assert_one_clear_error, env  # noqa: F401 (env is a fixture)

openai = pytest.importorskip("openai", reason="the openai client is a test dependency: pip install openai")

HERE = Path(__file__).parent
KEY = "test-key-serve"
LONG = 480  # tokens: a stream that runs for seconds unless cancelled


@pytest.fixture(scope="module")
def server(env, tiny_gguf, tmp_path_factory):
    srv = serve_harness.start(dict(env, TPIMPI_API_KEY=KEY), tiny_gguf, 2, "--max-batch", 2, "--max-queue", 1,
                              "--max-body", "8K", "--shutdown-timeout", 1, tmp=tmp_path_factory.mktemp("ctl"))
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def post(server, path, body: bytes, key=KEY):
    req = urllib.request.Request(server.url + path, data=body, method="POST",
                                 headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read()), r.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers


def health(server) -> dict:
    try:
        with urllib.request.urlopen(server.url + "/health", timeout=10) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        return json.loads(e.read())


def until(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def long_stream(client):
    """A streaming completion that has produced its first token."""
    s = client.completions.create(model="tiny", prompt="a", max_tokens=LONG, temperature=0, stream=True)
    it = iter(s)
    next(it)
    return s, it


def test_every_error_status(server, client):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert post(server, "/v1/completions", b'{"prompt": "x"}', key=None)[0] == 401
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-5", prompt="x")
    status, body, _ = post(server, "/v1/chat/completions", b'{"messages": [')
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="tiny", prompt="x", temperature=7)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny", prompt="x", max_tokens=10**6)
    status, body, _ = post(server, "/v1/completions", json.dumps({"prompt": "x" * 9000}).encode())
    assert status == 413 and body["error"]["code"] == "request_too_large"
    with pytest.raises(openai.BadRequestError, match=r"maximum context length is 512 tokens.*resulted in \d{3} tokens"):
        client.completions.create(model="tiny", prompt="word " * 600)
    with pytest.raises(openai.BadRequestError, match=r"requested \d+ tokens"):
        client.completions.create(model="tiny", prompt="word " * 100, max_tokens=500)


def test_a_full_queue_is_429_and_disconnects_free_their_slots(server, client):
    a, b = long_stream(client), long_stream(client)
    assert health(server)["free_slots"] == 0
    waiting = {}
    t = threading.Thread(target=lambda: waiting.update(r=client.completions.create(
        model="tiny", prompt="b", max_tokens=3, temperature=0)))
    t.start()
    until(lambda: health(server)["waiting"] == 1)
    with pytest.raises(openai.RateLimitError) as e:
        client.completions.create(model="tiny", prompt="c", max_tokens=3)
    assert int(e.value.response.headers["Retry-After"]) > 0
    for s, _ in (a, b):
        s.close()  # the client goes away mid-stream
    t.join(30)
    assert waiting["r"].usage.completion_tokens == 3
    until(lambda: health(server)["free_slots"] == 2 and health(server)["running"] == 0)
    before = health(server)
    with_two = [threading.Thread(target=client.completions.create,
                                 kwargs=dict(model="tiny", prompt=p, max_tokens=20, temperature=0)) for p in "xy"]
    for th in with_two:
        th.start()
    for th in with_two:
        th.join(30)
    after = health(server)
    assert (after["rows"] - before["rows"]) / (after["steps"] - before["steps"]) > 1.5  # both slots in use


def test_sigterm_mid_stream_ends_every_rank_with_0(server, client):
    s, it = long_stream(client)
    server.terminate()
    with pytest.raises(openai.APIError, match="shut down"):  # cancelled after --shutdown-timeout 1
        for _ in it:
            pass
    assert server.wait(90) == 0, server.stderr  # exit can take 20 s on a loaded machine (interpreter teardown)
    assert "Traceback" not in server.stderr and "tpimpi: server stopped" in server.stderr


def test_listening_beyond_loopback_needs_a_key(env, tiny_gguf):
    e = {k: v for k, v in env.items() if k != "TPIMPI_API_KEY"}
    p = subprocess.run([sys.executable, "-m", "tpimpi.serve", "--model", tiny_gguf, "--host", "0.0.0.0"], env=e,
                       capture_output=True, timeout=60)
    assert_one_clear_error(p, "--host 0.0.0.0 would let other machines use the model: pass --api-key")


def in_flight(c) -> tuple:
    """A stream that has produced its first token, and a whole (non-streamed) request running beside it."""
    s, it = long_stream(c)
    whole = {}

    def run():
        try:
            whole["r"] = c.completions.create(model="tiny", prompt="b", max_tokens=LONG, temperature=0)
        except openai.APIError as e:
            whole["e"] = e

    t = threading.Thread(target=run)
    t.start()
    until(lambda: health_of(c)["running"] == 2)
    return it, t, whole


def health_of(c) -> dict:
    with urllib.request.urlopen(str(c.base_url).removesuffix("v1/") + "health", timeout=10) as r:
        return json.loads(r.read())


def assert_answered_503(it, t, whole) -> None:
    """Both in-flight requests end with the server's OpenAI-style 503 error, not a dropped connection."""
    with pytest.raises(openai.APIError, match="stopped before this request finished"):
        for _ in it:
            pass
    t.join(10)
    e = whole.get("e")
    assert isinstance(e, openai.InternalServerError) and e.status_code == 503, whole
    assert e.body["type"] == "server_error" and "mpirun ended the job" in e.body["message"]


def test_sigterm_to_mpirun_answers_what_runs_and_every_rank_exits_0(env, tiny_gguf, tmp_path):
    """What Ctrl-C or Slurm does: mpirun gives the ranks 0.5 s, so running requests get a 503 at once."""
    srv = serve_harness.start(env, tiny_gguf, 2, "--max-batch", 2, tmp=tmp_path, script=HERE / "serve_exit_probe.py")
    try:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=30)
        running = in_flight(c)
        srv.proc.send_signal(signal.SIGTERM)
        assert_answered_503(*running)
        srv.wait(30)
        assert [(tmp_path / f"exit-{r}").read_text() for r in (0, 1)] == ["0", "0"], srv.stderr  # none killed
        assert not srv.pid_file.exists() and "Traceback" not in srv.stderr
    finally:
        srv.kill()


def test_a_dead_rank_ends_the_service_and_requests_get_an_error(env, tiny_gguf, tmp_path):
    srv = serve_harness.start(env, tiny_gguf, 2, "--max-batch", 2, tmp=tmp_path)
    try:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=30)
        running = in_flight(c)
        worker = next(pr for pr in psutil.Process(srv.proc.pid).children(recursive=True)
                      if pr.environ().get("OMPI_COMM_WORLD_RANK") == "1")
        worker.kill()
        t0 = time.monotonic()
        assert_answered_503(*running)
        assert srv.wait(30) != 0 and time.monotonic() - t0 < 30
        flat = " ".join(srv.stderr.split())
        assert f"process rank 1 with PID {worker.pid}" in flat and "exited on signal 9" in flat, srv.stderr
        assert flat.count("exited on") == 1 and "Traceback" not in flat, srv.stderr  # one message
    finally:
        srv.kill()


WAIT_IN_MPI = """
import sys, time
import numpy as np
from tpimpi.serve.__main__ import mpi_defaults
mpi_defaults()
from mpi4py import MPI
c, b = MPI.COMM_WORLD, np.zeros(4)
if c.rank == 0:
    time.sleep(0.5)
    c.Send(b, 1)
else:
    c.Recv(b, 0)  # half a second waiting in MPI
"""


@pytest.mark.alone  # two runs' counts compared: a test beside one of them would take its ranks' CPU time
@pytest.mark.skipif(not shutil.which("strace"), reason="needs strace (apt-get install strace) to count sched_yield")
def test_the_servers_ranks_yield_their_core_while_they_wait_in_mpi(env, tmp_path):
    """The server sets mpi_yield_when_idle before MPI starts, unless the user set it: a rank waiting in MPI
    then gives its core to rank 0's HTTP thread (and the clients on one machine). Counted with strace:
    Open MPI's waiting loop calls sched_yield many times more than with the setting off."""
    script = tmp_path / "wait.py"
    script.write_text(WAIT_IN_MPI)

    def yields(setting):
        out = tmp_path / f"strace-{setting}.txt"
        e = dict(env)
        e.pop("OMPI_MCA_mpi_yield_when_idle", None)
        if setting is not None:
            e["OMPI_MCA_mpi_yield_when_idle"] = setting
        subprocess.run(["strace", "-f", "-c", "-e", "trace=sched_yield", "-o", str(out), "mpirun", "-np", "2",
                        sys.executable, str(script)], env=e, check=True, timeout=120, capture_output=True)
        calls = [ln.split() for ln in out.read_text().splitlines() if ln.strip().endswith("sched_yield")]
        return int(calls[0][3]) if calls else 0

    default, off = yields(None), yields("0")
    assert default > 3 * max(off, 100), (default, off)
