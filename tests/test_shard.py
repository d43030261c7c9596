"""The split arithmetic: every head, KV head and FFN column owned exactly where it should be."""

import pytest

from tpimpi.errors import UsageError
from tpimpi.shard import parse_ratios, plan, split_counts


@pytest.mark.parametrize("n", [0, 1, 9, 1536, 49152])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 5, 7, 8, 13, 16])
def test_split_counts_sum_and_balance(n, world):
    counts = split_counts(n, [1.0] * world)
    assert sum(counts) == n
    assert max(counts) - min(counts) <= 1
    assert counts == sorted(counts, reverse=True)  # leftovers go to the lower ranks


def test_split_counts_follow_ratios():
    assert split_counts(12, [2, 1, 1]) == [6, 3, 3]
    assert split_counts(9, [2, 1]) == [6, 3]
    c = split_counts(1536, [3, 1, 1, 1])
    assert c == [768, 256, 256, 256]


@pytest.mark.parametrize("heads,kv,ffn", [(9, 3, 1536), (32, 8, 11008), (64, 8, 28672), (8, 8, 100), (14, 2, 4864)])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 8, 9, 12, 16])
def test_plan_covers_everything_once(heads, kv, ffn, world):
    slices = plan(heads, kv, ffn, [1.0] * world)
    group = heads // kv
    owned_q = [h for s in slices for h in range(*s.q_heads)]
    assert owned_q == list(range(heads))
    assert [c for s in slices for c in range(*s.ffn)] == list(range(ffn))
    for s in slices:
        # a rank holds exactly the KV heads its query heads use, and nothing else
        needed = sorted({h // group for h in range(*s.q_heads)})
        assert list(range(*s.kv_heads)) == needed
        assert all(0 <= i < s.n_kv for i in s.kv_of_q(group))


def test_default_model_at_two_ranks_replicates_the_shared_kv_head():
    a, b = plan(9, 3, 1536, [1, 1])
    assert a.q_heads == (0, 5) and b.q_heads == (5, 9)
    assert a.kv_heads == (0, 2) and b.kv_heads == (1, 3)  # KV head 1 lives on both
    assert a.ffn == (0, 768) and b.ffn == (768, 1536)


def test_more_ranks_than_heads_leaves_some_with_mlp_only():
    slices = plan(9, 3, 1536, [1] * 16)
    assert sum(s.n_q == 0 for s in slices) == 7
    assert all(s.n_ffn == 96 for s in slices)


def test_ratios_give_proportional_work():
    fast, slow = plan(32, 8, 11008, [2, 1])
    assert (fast.n_q, slow.n_q) == (21, 11)  # 21.33 and 10.67, rounded by largest remainder
    assert abs(fast.n_ffn - 2 * slow.n_ffn) <= 2


def test_parse_ratios():
    assert parse_ratios(None, 3) == (1.0, 1.0, 1.0)
    assert parse_ratios("2,1,1", 3) == (2.0, 1.0, 1.0)
    for bad, world in [("1,1", 3), ("1,0,1", 3), ("1,-1", 2), ("a,b", 2), ("1,inf", 2)]:
        with pytest.raises(UsageError):
            parse_ratios(bad, world)
    with pytest.raises(UsageError):
        parse_ratios(None, 0)
