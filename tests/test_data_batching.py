"""Token-budget batching, length filtering and the resumable batch sampler."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bigbatch.data import TokenBudgetSampler, batch_padding_efficiency, filter_by_length, pad_batch, token_budget_batches


def _cost(lengths, b, m=1):
    return len(b) * (-(-int(np.max(lengths[b])) // m) * m)


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.integers(1, 50), min_size=1, max_size=200),
    st.integers(50, 400),
    st.sampled_from([None, 0, 7]),
    st.sampled_from([None, 16]),
    st.sampled_from([1, 4]),
    st.sampled_from([1, 8]),
)
def test_batches_cover_everything_once_within_budget(raw, max_tokens, seed, pool, mult, pad_m):
    lengths = np.array(raw)
    if -(-lengths.max() // pad_m) * pad_m > max_tokens:
        return
    batches = token_budget_batches(lengths, max_tokens, seed=seed, pool_size=pool, batch_size_multiple=mult, pad_to_multiple_of=pad_m)
    got = np.concatenate(batches)
    assert sorted(got.tolist()) == list(range(len(lengths)))
    assert all(_cost(lengths, b, pad_m) <= max_tokens for b in batches)


def test_greedy_is_maximal_in_sorted_order():
    lengths = np.array([3, 1, 4, 1, 5, 9, 2, 6])
    # sorted: 1 1 2 3 4 5 6 9; budget 12: [1 1 2 3] (4·3=12), [4 5] (2·5=10, +6 → 18), [6] (+9 → 18), [9]
    batches = token_budget_batches(lengths, 12)
    assert [sorted(lengths[b].tolist()) for b in batches] == [[1, 1, 2, 3], [4, 5], [6], [9]]
    assert batch_padding_efficiency(lengths, batches) == pytest.approx(31 / (12 + 10 + 6 + 9))
    # max_batch_size and batch_size_multiple bound the count as well as the tokens
    assert max(len(b) for b in token_budget_batches(lengths, 100, max_batch_size=3)) == 3
    assert [len(b) for b in token_budget_batches(np.ones(10, int), 7, batch_size_multiple=4)] == [4, 6]  # the last batch of a pool takes the rest


def test_sorting_beats_random_batches_on_padding():
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(3, 1, 5000).astype(int) + 1, 1, 256)
    sorted_eff = batch_padding_efficiency(lengths, token_budget_batches(lengths, 4096, seed=0))
    pooled_eff = batch_padding_efficiency(lengths, token_budget_batches(lengths, 4096, seed=0, pool_size=500))
    random_batches = np.array_split(rng.permutation(len(lengths)), len(lengths) // 32)
    random_eff = batch_padding_efficiency(lengths, random_batches)
    assert sorted_eff > pooled_eff > random_eff


def test_shuffle_differs_by_seed_and_is_reproducible():
    lengths = np.random.default_rng(1).integers(1, 30, 300)
    a = token_budget_batches(lengths, 120, seed=1)
    b = token_budget_batches(lengths, 120, seed=1)
    c = token_budget_batches(lengths, 120, seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert [x.tolist() for x in a] != [x.tolist() for x in c]


def test_budget_errors():
    with pytest.raises(ValueError, match="max_tokens must be >= the longest .* 9 tokens at index 1, got 8"):
        token_budget_batches([3, 9], 8)
    with pytest.raises(ValueError, match="max_tokens must be a positive integer"):
        token_budget_batches([3], 0)
    with pytest.raises(ValueError, match="lengths must be >= 0"):
        token_budget_batches([-1], 8)
    assert token_budget_batches([], 8) == []


def test_filter_reports_dropped_examples_and_tokens():
    f = filter_by_length([5, 100, 20, 300, 0], max_length=50)
    assert f.kept.tolist() == [0, 2]
    assert (f.kept_examples, f.kept_tokens, f.dropped_examples, f.dropped_tokens) == (2, 25, 3, 400)
    assert f.dropped_token_fraction == pytest.approx(400 / 425)
    assert "dropped 3 of 5 examples (60.00%) and 400 of 425 tokens (94.12%)" in str(f)
    with pytest.raises(ValueError, match="max_length must be a positive integer"):
        filter_by_length([1], 0)
    with pytest.raises(ValueError, match=r"min_length must be an integer in \[0, max_length=5\]"):
        filter_by_length([1], 5, min_length=6)


def test_sampler_epochs_resume_and_dataloader():
    lengths = np.random.default_rng(2).integers(1, 40, 200)
    s = TokenBudgetSampler(lengths, 160, max_length=35, seed=3)
    assert s.filtered.dropped_examples == int((lengths > 35).sum())
    e0 = list(s)
    assert sorted(i for b in e0 for i in b) == sorted(s.filtered.kept.tolist())
    e1 = list(s)
    assert e0 != e1 and s.epoch == 2
    # resume mid-epoch
    t = TokenBudgetSampler(lengths, 160, max_length=35, seed=3)
    it = iter(t)
    head = [next(it) for _ in range(4)]
    state = t.state_dict()
    u = TokenBudgetSampler(lengths, 160, max_length=35, seed=3)
    u.load_state_dict(state)
    assert head + list(u) == e0
    # as a DataLoader batch_sampler with padding collate
    data = [torch.arange(n) for n in lengths]
    dl = torch.utils.data.DataLoader(data, batch_sampler=TokenBudgetSampler(lengths, 160, max_length=35), collate_fn=pad_batch)
    for x, n in dl:
        assert x.numel() <= 160 and x.shape[1] == int(n.max())


def test_pad_batch():
    x, n = pad_batch([torch.tensor([1, 2, 3]), torch.tensor([4])], pad_value=-1, pad_to_multiple_of=4)
    assert x.tolist() == [[1, 2, 3, -1], [4, -1, -1, -1]] and n.tolist() == [3, 1]
    with pytest.raises(ValueError, match="must not be empty"):
        pad_batch([])
