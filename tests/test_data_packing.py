"""Packers (BFD, SPFHP) against item-by-item references written from the definitions."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bigbatch.data import pack, pack_bfd, pack_sequences, pack_spfhp, padding_efficiency


def _bfd_reference(lengths, L):
    """Best-fit decreasing, one item at a time: the fullest row that still fits, else a new row."""
    rooms = []
    for s in sorted(lengths, reverse=True):
        fits = [i for i, r in enumerate(rooms) if r >= s]
        if fits:
            i = min(fits, key=lambda i: rooms[i])
            rooms[i] -= s
        else:
            rooms.append(L - s)
    return sorted(rooms)


def _spfhp_reference(lengths, L):
    """Krell et al. Alg. 1 without a sequence limit, one item at a time: longest first, into the
    row with the most room; when nothing fits, all remaining items of that length open rows."""
    rooms = []
    values = sorted(set(lengths), reverse=True)
    for s in values:
        left = lengths.count(s)
        while left:
            fits = [i for i, r in enumerate(rooms) if r >= s]
            if not fits:
                rooms += [L - s] * left
                break
            i = max(fits, key=lambda i: rooms[i])
            rooms[i] -= s
            left -= 1
    return sorted(rooms)


def _check_valid(p, lengths, L):
    assert (p.row_of >= 0).all() and p.row_of.max() == p.n_rows - 1
    tokens = np.bincount(p.row_of, weights=lengths, minlength=p.n_rows)
    assert (tokens <= L).all() and (tokens > 0).all()
    assert sorted(np.concatenate(p.rows).tolist()) == list(range(len(lengths)))
    assert p.efficiency == pytest.approx(sum(lengths) / (p.n_rows * L))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.lists(st.integers(1, 40), min_size=1, max_size=120))
def test_bfd_matches_item_by_item_reference(L, raw):
    lengths = [min(x, L) for x in raw]
    p = pack_bfd(lengths, L)
    _check_valid(p, lengths, L)
    # rows with equal room are interchangeable, so the multiset of rooms is tie-break free
    assert sorted((L - p.row_tokens).tolist()) == _bfd_reference(lengths, L)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.lists(st.integers(1, 40), min_size=1, max_size=120))
def test_spfhp_matches_item_by_item_reference(L, raw):
    lengths = [min(x, L) for x in raw]
    p = pack_spfhp(lengths, L)
    _check_valid(p, lengths, L)
    assert sorted((L - p.row_tokens).tolist()) == _spfhp_reference(lengths, L)


@pytest.mark.parametrize("limit", [1, 2, 3])
def test_spfhp_row_limit(limit):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 30, 500)
    p = pack_spfhp(lengths, 64, max_per_row=limit)
    _check_valid(p, lengths, 64)
    assert np.bincount(p.row_of).max() <= limit
    if limit == 1:
        assert p.n_rows == 500


def test_known_packings():
    # BFD by hand: 6 | 5 | 4 → fullest fit is the 6-row (room 4) | 3 → the 5-row | 2 → room 2 of that row
    p = pack_bfd([2, 6, 3, 5, 4], 10)
    assert p.n_rows == 2 and p.efficiency == 1.0
    assert sorted(sorted(r.tolist()) for r in p.rows) == [[0, 2, 3], [1, 4]]
    # SPFHP: 6 | 5 | 4 → the most room, the 5-row | 3 → the 6-row | 2 fits nowhere (rooms 1, 1): a third row
    q = pack_spfhp([2, 6, 3, 5, 4], 10)
    assert q.n_rows == 3
    # halves fill rows exactly; padding to the max wastes nothing either
    assert pack_bfd([8] * 10, 16).n_rows == 5
    assert padding_efficiency([8] * 10) == 1.0
    assert padding_efficiency([1, 3]) == pytest.approx(4 / 6)


def test_errors_name_the_parameter():
    with pytest.raises(ValueError, match=r"lengths must be <= capacity 8, got 9 at index 1"):
        pack_bfd([3, 9], 8)
    with pytest.raises(ValueError, match="lengths must be >= 1, got 0"):
        pack_spfhp([0, 3], 8)
    with pytest.raises(ValueError, match="capacity must be a positive integer"):
        pack_bfd([1], 0)
    with pytest.raises(ValueError, match="lengths must be integers"):
        pack_bfd([1.5], 4)
    with pytest.raises(ValueError, match="unknown packing method 'bdf'.*did you mean bfd"):
        pack([1], 4, "bdf")
    with pytest.raises(ValueError, match="max_per_row must be a positive integer"):
        pack_spfhp([1], 4, max_per_row=0)
    assert pack_bfd([], 4).n_rows == 0


def test_pack_sequences_rows_doc_and_position_ids():
    seqs = [torch.arange(10, 10 + n) for n in (5, 3, 7, 2, 6)]
    pr = pack_sequences(seqs, 8, "bfd", pad_value=-1)
    assert pr.tokens.shape == (pr.packing.n_rows, 8) == pr.doc_ids.shape == pr.position_ids.shape
    for i, s in enumerate(seqs):
        where = pr.doc_ids == i
        assert int(where.sum()) == len(s)
        assert torch.equal(pr.tokens[where], s)
        assert torch.equal(pr.position_ids[where], torch.arange(len(s)))
    pad = pr.doc_ids < 0
    assert (pr.tokens[pad] == -1).all() and (pr.position_ids[pad] == 0).all()
    assert pr.efficiency == pytest.approx(23 / (8 * pr.packing.n_rows))


def test_million_sequences_pack_quickly_enough_to_run_here():
    # not a timing assertion (see benchmarks/packing.py): only that the histogram packers scale
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(4.5, 1.0, 200_000).astype(np.int64) + 1, 1, 512)
    for packer in (pack_bfd, pack_spfhp):
        p = packer(lengths, 512)
        assert p.efficiency > 0.99
        assert np.bincount(p.row_of, weights=lengths).max() <= 512
