import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

PROMPT_IDS = [1, 9690, 198, 2683, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]


@pytest.fixture(scope="session")
def prompt_ids():
    return list(PROMPT_IDS)


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    from tinymodels import make_tiny_hf

    return make_tiny_hf(tmp_path_factory.mktemp("tiny") / "llama", arch="llama", seed=1)


@pytest.fixture(scope="session")
def tiny_gguf(tiny_hf, tmp_path_factory):
    from tinymodels import make_tiny_gguf

    return make_tiny_gguf(tmp_path_factory.mktemp("tinygguf") / "tiny.gguf", hf_dir=tiny_hf)


@pytest.fixture(scope="session")
def tiny_source(tiny_gguf):
    """The tiny GGUF opened once, for convert() in place of its path (as test_failures' long_stores does):
    parsing the file's 49k-token vocabulary is most of the time of a tiny model's conversion."""
    from tpimpi.sources import open_source

    return open_source(tiny_gguf)


@pytest.fixture(scope="session")
def tiny_ref(tiny_gguf, prompt_ids):
    """Reference logits and 8 greedy tokens from transformers on the tiny GGUF."""
    from tinymodels import hf_greedy, hf_last_logits, hf_model

    m = hf_model(tiny_gguf)
    return hf_last_logits(m, prompt_ids), hf_greedy(m, prompt_ids, 8)


@pytest.fixture
def one_thread():
    """One torch thread and one BLAS thread per rank while N ranks run as N threads of this process."""
    import torch
    from threadpoolctl import threadpool_limits

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1, user_api="blas"):
        yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    """One TPIMPI_CACHE for the tests that run the default model from the command line (test_lowmem, test_model,
    test_readme, test_scheduler, test_slurm): each of its conversions, about ten seconds of CPU, is made by the
    first test that needs it and reused by the others. Fresh for each run of pytest."""
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def default_hf():
    """The default model in transformers (float32, eval mode), loaded once for the tests that compare with it."""
    from tinymodels import default_gguf_path, hf_model

    return hf_model(default_gguf_path())
