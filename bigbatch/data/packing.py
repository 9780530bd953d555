"""Sequence packing without cross-contamination (Krell et al. 2021, arXiv:2107.02027).

Variable-length sequences are packed into rows of ``capacity`` tokens so that far fewer
tokens are padding; each row carries per-token document ids and position ids that restart
at every document, from which ``bigbatch.data.masks`` builds a block-diagonal causal mask,
so no token attends across documents and each document's loss is what it would be alone.

Two packers, both working on the length histogram so 1M sequences take seconds:

* ``pack_bfd``: best-fit decreasing — longest first, each into the open row with the least
  room that still fits (the classical bin-packing heuristic, ≤ 11/9·OPT + 6/9 rows).
* ``pack_spfhp``: shortest-pack-first histogram packing, Krell et al. §4.2 / Alg. 1 — longest
  first, each into the row with the *most* room (the shortest pack), at most
  ``max_per_row`` sequences per row; when none fits, the remaining sequences of that length
  open new rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from bigbatch._checks import check_choice, check_int_positive

__all__ = ["Packing", "PackedRows", "pack_bfd", "pack_spfhp", "pack", "pack_sequences", "padding_efficiency", "PACKERS"]


@dataclass(slots=True)
class Packing:
    """Which row each sequence went to. ``rows[r]`` lists a row's sequences in placement order."""

    row_of: np.ndarray
    """Row index of each input sequence (int64, same order as the lengths given)."""
    lengths: np.ndarray
    """The input lengths."""
    capacity: int
    """Row length L."""
    n_rows: int
    """Number of rows used."""
    placed: np.ndarray = field(repr=False)
    """Sequence indices in the order they were placed (longest first)."""

    @property
    def rows(self) -> list[np.ndarray]:
        """Per row, the indices of its sequences (placement order: longest first)."""
        by_row = self.placed[np.argsort(self.row_of[self.placed], kind="stable")]
        counts = np.bincount(self.row_of, minlength=self.n_rows)
        return np.split(by_row, np.cumsum(counts)[:-1])

    @property
    def row_tokens(self) -> np.ndarray:
        """Real (non-pad) tokens in each row."""
        return np.bincount(self.row_of, weights=self.lengths, minlength=self.n_rows).astype(np.int64)

    @property
    def efficiency(self) -> float:
        """Fraction of the ``n_rows × capacity`` token slots that hold real tokens."""
        return float(self.lengths.sum()) / (self.n_rows * self.capacity) if self.n_rows else 1.0


def padding_efficiency(lengths: Sequence[int] | np.ndarray, pad_to: int | None = None) -> float:
    """Non-pad fraction when every sequence is padded to ``pad_to`` (default: the longest)."""
    lens = np.asarray(lengths, dtype=np.int64)
    if lens.size == 0:
        return 1.0
    width = int(lens.max()) if pad_to is None else int(pad_to)
    return float(lens.sum()) / (lens.size * width)


def _validate(lengths: Sequence[int] | np.ndarray, capacity: int) -> tuple[np.ndarray, int]:
    capacity = check_int_positive("capacity", capacity)
    lens = np.asarray(lengths)
    if lens.ndim != 1:
        raise ValueError(f"lengths must be a 1-D sequence of integers, got shape {lens.shape}")
    if lens.size and not np.issubdtype(lens.dtype, np.integer):
        if not np.all(np.equal(np.mod(lens, 1), 0)):
            raise ValueError("lengths must be integers")
    lens = lens.astype(np.int64)
    if lens.size and lens.min() < 1:
        i = int(np.argmin(lens))
        raise ValueError(f"lengths must be >= 1, got {int(lens[i])} at index {i}")
    if lens.size and lens.max() > capacity:
        i = int(np.argmax(lens))
        raise ValueError(
            f"lengths must be <= capacity {capacity}, got {int(lens[i])} at index {i} "
            "(split or filter long sequences first: bigbatch.data.filter_by_length)"
        )
    return lens, capacity


def _groups(lens: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """Indices sorted by decreasing length (ties by index) and (length, start, stop) runs."""
    order = np.argsort(-lens, kind="stable")
    sl = lens[order]
    if sl.size == 0:
        return order, []
    cuts = np.flatnonzero(np.diff(sl)) + 1
    starts = np.concatenate(([0], cuts))
    stops = np.concatenate((cuts, [sl.size]))
    return order, [(int(sl[a]), int(a), int(b)) for a, b in zip(starts, stops)]


def pack_bfd(lengths: Sequence[int] | np.ndarray, capacity: int) -> Packing:
    """Best-fit decreasing packing of ``lengths`` into rows of ``capacity`` tokens.

    Exact BFD computed per length class: rows are bucketed by remaining room r. For an item
    of length s the best fit is the smallest non-empty bucket r ≥ s; the chosen row keeps
    being the best fit until its room drops below s, so it takes ⌊r/s⌋ items at once, and
    the other rows of bucket r follow — whole runs are placed with numpy.
    """
    lens, L = _validate(lengths, capacity)
    order, groups = _groups(lens)
    row_of = np.full(lens.size, -1, dtype=np.int64)
    buckets: list[list[int]] = [[] for _ in range(L + 1)]
    count = np.zeros(L + 1, dtype=np.int64)
    n_rows = 0
    for s, a, b in groups:
        pos = a
        while pos < b:
            need = b - pos
            nz = np.flatnonzero(count[s:])
            if nz.size == 0:  # nothing fits: new rows, each filled with ⌊L/s⌋ items
                m = L // s
                full, rest = divmod(need, m)
                ids = np.arange(n_rows, n_rows + full + (rest > 0))
                row_of[order[pos:b]] = np.repeat(ids, m)[:need]
                if full:
                    buckets[L - m * s].extend(ids[:full].tolist())
                    count[L - m * s] += full
                if rest:
                    buckets[L - rest * s].append(int(ids[-1]))
                    count[L - rest * s] += 1
                n_rows += full + (rest > 0)
                break
            r = s + int(nz[0])
            m = r // s
            bucket = buckets[r]
            full = min(len(bucket), need // m)
            if full:
                ids = bucket[len(bucket) - full :]
                del bucket[len(bucket) - full :]
                row_of[order[pos : pos + full * m]] = np.repeat(np.asarray(ids, dtype=np.int64), m)
                buckets[r - m * s].extend(ids)
                count[r] -= full
                count[r - m * s] += full
                pos += full * m
            if pos < b and bucket and b - pos < m:  # the last few items share one row
                k = b - pos
                rid = bucket.pop()
                row_of[order[pos:b]] = rid
                buckets[r - k * s].append(rid)
                count[r] -= 1
                count[r - k * s] += 1
                pos = b
    return Packing(row_of=row_of, lengths=lens, capacity=L, n_rows=n_rows, placed=order)


def pack_spfhp(lengths: Sequence[int] | np.ndarray, capacity: int, max_per_row: int | None = None) -> Packing:
    """Shortest-pack-first histogram packing (Krell et al. 2021, §4.2, Algorithm 1).

    Lengths are processed longest first; a sequence goes into the open row with the most
    remaining room (the shortest pack) if it fits, else every remaining sequence of that
    length opens a row of its own. Rows holding ``max_per_row`` sequences or no room are
    closed. The paper limits rows to 3 sequences for BERT at L=512, where few short
    sequences exist; the default ``None`` (no limit) suits long-tailed corpora, where a
    limit of 3 leaves most of a row empty (see docs/bench_packing.md).
    """
    lens, L = _validate(lengths, capacity)
    limit = None if max_per_row is None else check_int_positive("max_per_row", max_per_row)
    order, groups = _groups(lens)
    row_of = np.full(lens.size, -1, dtype=np.int64)
    buckets: list[list[int]] = [[] for _ in range(L + 1)]
    count = np.zeros(L + 1, dtype=np.int64)
    members = np.zeros(0, dtype=np.int64)
    n_rows = 0

    def reopen(ids: np.ndarray, room: int) -> None:
        keep = ids if limit is None else ids[members[ids] < limit]
        if room > 0 and keep.size:
            buckets[room].extend(keep.tolist())
            count[room] += keep.size

    for s, a, b in groups:
        pos = a
        while pos < b:
            nz = np.flatnonzero(count[s:])
            if nz.size == 0:
                k = b - pos
                ids = np.arange(n_rows, n_rows + k)
                members = np.concatenate((members, np.ones(k, dtype=np.int64)))
                row_of[order[pos:b]] = ids
                n_rows += k
                reopen(ids, L - s)
                break
            r = s + int(nz[-1])  # the most room: the shortest pack
            bucket = buckets[r]
            k = min(len(bucket), b - pos)
            ids = np.asarray(bucket[len(bucket) - k :], dtype=np.int64)
            del bucket[len(bucket) - k :]
            count[r] -= k
            row_of[order[pos : pos + k]] = ids
            members[ids] += 1
            pos += k
            reopen(ids, r - s)
    return Packing(row_of=row_of, lengths=lens, capacity=L, n_rows=n_rows, placed=order)


PACKERS = {"bfd": pack_bfd, "spfhp": pack_spfhp}


def pack(lengths: Sequence[int] | np.ndarray, capacity: int, method: str = "bfd", **kw: int | None) -> Packing:
    """``pack_bfd`` or ``pack_spfhp`` by name."""
    return PACKERS[check_choice("packing method", method, PACKERS)](lengths, capacity, **kw)


@dataclass(slots=True)
class PackedRows:
    """Packed token rows with what the model needs to keep documents apart."""

    tokens: torch.Tensor
    """``(rows, capacity)`` tokens, ``pad_value`` after the last document of a row."""
    doc_ids: torch.Tensor
    """``(rows, capacity)`` index of each token's sequence in the input; -1 on padding."""
    position_ids: torch.Tensor
    """``(rows, capacity)`` position inside its document (0 at every document start and on padding)."""
    packing: Packing
    """The row assignment."""

    @property
    def efficiency(self) -> float:
        return self.packing.efficiency


def pack_sequences(
    sequences: Sequence[torch.Tensor | Sequence[int]],
    capacity: int,
    method: str = "bfd",
    *,
    pad_value: int = 0,
    max_per_row: int | None = None,
) -> PackedRows:
    """Pack 1-D token sequences into ``(rows, capacity)`` tensors with document and position ids."""
    seqs = [torch.as_tensor(s).reshape(-1) for s in sequences]
    lengths = np.fromiter((s.numel() for s in seqs), dtype=np.int64, count=len(seqs))
    kw = {"max_per_row": max_per_row} if method == "spfhp" else {}
    p = pack(lengths, capacity, method, **kw)
    dtype = seqs[0].dtype if seqs else torch.long
    tokens = torch.full((p.n_rows, p.capacity), pad_value, dtype=dtype)
    doc = torch.full((p.n_rows, p.capacity), -1, dtype=torch.long)
    pos = torch.zeros((p.n_rows, p.capacity), dtype=torch.long)
    if seqs:
        # one scatter for all tokens: each sequence's slot is row·L + (tokens before it in its row)
        order = p.placed[np.argsort(p.row_of[p.placed], kind="stable")]
        lens, rows = lengths[order], p.row_of[order]
        before = np.cumsum(lens) - lens
        first = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
        row_start = np.repeat(before[first], np.diff(np.r_[first, len(order)]))
        within = np.arange(int(lens.sum())) - np.repeat(before, lens)
        dest = torch.from_numpy(np.repeat(rows * p.capacity + before - row_start, lens) + within)
        tokens.view(-1)[dest] = torch.cat([seqs[i] for i in order.tolist()]).to(dtype)
        doc.view(-1)[dest] = torch.from_numpy(np.repeat(order, lens))
        pos.view(-1)[dest] = torch.from_numpy(within)
    return PackedRows(tokens=tokens, doc_ids=doc, position_ids=pos, packing=p)
