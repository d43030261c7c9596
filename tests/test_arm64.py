"""The verdict of the aarch64 check (jobs/arm64/compare.py) fails when it should.

The check itself (jobs/arm64_check.sh: an emulated arm64 root, minutes of QEMU) runs as its own CI step,
not in this suite, which must stay within 15 minutes on 2 cores. These tests make sure that step cannot
pass on tokens, logits or stores that differ.
"""

import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import pytest

_spec = importlib.util.spec_from_file_location("arm64_compare", Path(__file__).parents[1] / "jobs/arm64/compare.py")
compare = sys.modules["arm64_compare"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(compare)

RNG = np.random.default_rng(0)
LOGITS = RNG.standard_normal(1000).astype(np.float32) * 10
TOKENS = [504, 3575, 282, 4649]


def _side(logits=LOGITS, tokens=TOKENS, name="float32-n2"):
    return {name: {"token_ids": list(tokens)}}, {name: logits}


def test_same_tokens_and_close_logits_pass():
    (x, xl), (a, al) = _side(), _side(LOGITS * (1 + 1e-6))
    [c] = compare.compare_runs(x, a, xl, al)
    assert c.ok and "tokens same" in c.detail


@pytest.mark.parametrize("tokens,scale", [([504, 3575, 282, 7042], 1.0), (TOKENS, 1 + 3e-4)],
                         ids=["one-token-differs", "logits-beyond-tolerance"])
def test_differences_fail(tokens, scale):
    (x, xl), (a, al) = _side(), _side(LOGITS * scale, tokens)
    [c] = compare.compare_runs(x, a, xl, al)
    assert not c.ok


@pytest.mark.parametrize("scale,ok", [(1 + 1e-2, True), (1 + 1e-1, False)])
def test_bfloat16_products_have_their_own_tolerance_but_not_for_tokens(scale, ok):
    name = "bfloat16-n2-compute-bf16"
    (x, xl), (a, al) = _side(name=name), _side(LOGITS * scale, name=name)
    assert compare.compare_runs(x, a, xl, al)[0].ok is ok
    (a, al) = _side(LOGITS, [504, 3575, 282, 7042], name=name)
    assert not compare.compare_runs(x, a, xl, al)[0].ok


def test_a_configuration_missing_on_one_side_fails():
    (x, xl), (a, al) = _side(), _side(name="bfloat16-n2")
    checks = compare.compare_runs(x, a, xl, al)
    assert [c.ok for c in checks] == [False, False]
    assert {c.detail for c in checks} == {"missing on aarch64", "missing on x86_64"}


def test_logits_of_another_shape_fail():
    (x, xl), (a, al) = _side(), _side(LOGITS[:-1])
    assert not compare.compare_runs(x, a, xl, al)[0].ok


def test_stores_must_match_byte_for_byte():
    ref = {"files": [{"name": "rank000.safetensors", "sha256": "aa"}, {"name": "rank001.safetensors", "sha256": "bb"}]}
    same = {"files": list(ref["files"])}
    other = {"files": [{"name": "rank000.safetensors", "sha256": "aa"}, {"name": "rank001.safetensors", "sha256": "cc"}]}
    assert compare.compare_stores("float32-n2", same, ref).ok
    bad = compare.compare_stores("float32-n2", other, ref)
    assert not bad.ok and "rank001.safetensors" in bad.detail


def test_the_command_lines_tokens_are_compared():
    x, _ = _side()
    assert compare.compare_cli("float32-n2", TOKENS, x).ok
    assert not compare.compare_cli("float32-n2", TOKENS[:-1], x).ok
    assert not compare.compare_cli("float32-n1", TOKENS, x).ok


def test_the_tests_run_inside_the_root_exist():
    """inside.sh names its subset of the suite test by test: a renamed test must fail here, in seconds, not
    as a collection error after minutes of emulation in the CI step."""
    repo = Path(__file__).parents[1]
    script = (repo / "jobs/arm64/inside.sh").read_text()
    nodes = re.findall(r"(tests/test_\w+\.py)(?:::(\w+))?", script.split("python3 -m pytest", 1)[1])
    assert len(nodes) >= 5
    for path, name in nodes:
        source = (repo / path).read_text()
        assert not name or f"def {name}(" in source, f"{path}::{name} not found"
