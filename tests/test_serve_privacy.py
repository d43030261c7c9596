"""Privacy by role while serving: only rank 0 sees requests. The workers' received bytes, command lines,
environments, opened files and imported modules hold no trace of a secret word sent in requests."""

import json
import os
from pathlib import Path

import numpy as np
import psutil
import pytest
import serve_harness
from test_generate import env  # noqa: F401 (env is a fixture)

from tpimpi.tokenizer import Tokenizer

openai = pytest.importorskip("openai", reason="the openai client is a test dependency: pip install openai")

HERE = Path(__file__).parent
SECRET = "zanzibarquokka"


def test_workers_never_see_a_request(env, tiny_gguf, tmp_path):
    srv = serve_harness.start(env, tiny_gguf, 3, "--max-batch", 2, tmp=tmp_path, script=HERE / "serve_privacy_probe.py")
    try:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
        c.chat.completions.create(model="tiny", max_tokens=4, messages=[
            {"role": "system", "content": f"The password is {SECRET}."}, {"role": "user", "content": SECRET}])
        list(c.completions.create(model="tiny", prompt=f"{SECRET} {SECRET}", max_tokens=4, stream=True))
        workers = {int(p.environ()["OMPI_COMM_WORLD_RANK"]): p
                   for p in psutil.Process(srv.proc.pid).children(recursive=True)
                   if p.environ().get("OMPI_COMM_WORLD_RANK") not in (None, "0")}
        assert sorted(workers) == [1, 2]
        for p in workers.values():
            assert SECRET.encode() not in Path(f"/proc/{p.pid}/cmdline").read_bytes()
            assert SECRET.encode() not in Path(f"/proc/{p.pid}/environ").read_bytes()
        srv.terminate()
        assert srv.wait(60) == 0, srv.stderr
    finally:
        srv.kill()
    master = json.loads((tmp_path / "opened-0.json").read_text())
    tok_file = [o for o in master["opened"] if o.endswith("tokenizer.json")][-1]  # the probe does see opens
    ids = Tokenizer.load(os.path.dirname(tok_file)).encode(f"{SECRET} {SECRET}")
    for rank in (1, 2):
        seen = json.loads((tmp_path / f"opened-{rank}.json").read_text())
        names = {os.path.basename(o) for o in seen["opened"]}
        assert f"rank00{rank}.safetensors" in names
        assert not {"tokenizer.json", "tokenizer_config.json", "rank000.safetensors", tiny_gguf.name} & names
        for module in ("tpimpi.tokenizer", "tokenizers", "aiohttp", "tpimpi.serve.http", "tpimpi.serve.api"):
            assert module not in seen["modules"]
        received = (tmp_path / f"received-{rank}.bin").read_bytes()
        assert len(received) > 20_000  # control words and hidden states of every step
        assert SECRET.encode() not in received and SECRET.encode("utf-16-le") not in received
        for dtype in (np.int64, np.int32):
            assert np.array(ids, dtype=dtype).tobytes() not in received
