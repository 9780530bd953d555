"""Token-budget batching and length filtering (Popel & Bojar 2018, "Training Tips for the
Transformer Model", §4.3–4.4).

A batch is bounded by tokens, not examples: ``n × padded_length ≤ max_tokens``, padding
counted, because memory and compute scale with the padded tensor. Sorting by length before
cutting batches keeps padding low; shuffling the examples inside pools before sorting, and
the batches afterwards, keeps the order random between epochs (the tensor2tensor/fairseq
scheme). Dropping the few longest examples (``max_length``) lets the token budget hold more
examples per batch — Popel & Bojar's trade-off — so the filter reports what it costs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch

from bigbatch._checks import check_int_positive

__all__ = ["LengthFilter", "filter_by_length", "token_budget_batches", "TokenBudgetSampler", "pad_batch", "batch_padding_efficiency"]


@dataclass(frozen=True, slots=True)
class LengthFilter:
    """What ``filter_by_length`` kept and what it dropped."""

    kept: np.ndarray
    """Indices of the examples kept, in input order."""
    kept_examples: int
    kept_tokens: int
    dropped_examples: int
    dropped_tokens: int
    max_length: int

    @property
    def dropped_example_fraction(self) -> float:
        total = self.kept_examples + self.dropped_examples
        return self.dropped_examples / total if total else 0.0

    @property
    def dropped_token_fraction(self) -> float:
        total = self.kept_tokens + self.dropped_tokens
        return self.dropped_tokens / total if total else 0.0

    def __str__(self) -> str:
        return (
            f"max_length {self.max_length}: dropped {self.dropped_examples:,} of "
            f"{self.kept_examples + self.dropped_examples:,} examples ({100 * self.dropped_example_fraction:.2f}%) "
            f"and {self.dropped_tokens:,} of {self.kept_tokens + self.dropped_tokens:,} tokens "
            f"({100 * self.dropped_token_fraction:.2f}%)"
        )


def _lengths(lengths: Sequence[int] | np.ndarray) -> np.ndarray:
    lens = np.asarray(lengths)
    if lens.ndim != 1:
        raise ValueError(f"lengths must be a 1-D sequence of integers, got shape {lens.shape}")
    lens = lens.astype(np.int64)
    if lens.size and lens.min() < 0:
        raise ValueError(f"lengths must be >= 0, got {int(lens.min())} at index {int(np.argmin(lens))}")
    return lens


def filter_by_length(lengths: Sequence[int] | np.ndarray, max_length: int, min_length: int = 1) -> LengthFilter:
    """Keep examples with ``min_length <= length <= max_length``; count what is dropped."""
    lens = _lengths(lengths)
    max_length = check_int_positive("max_length", max_length)
    if isinstance(min_length, bool) or not isinstance(min_length, (int, np.integer)) or not 0 <= min_length <= max_length:
        raise ValueError(f"min_length must be an integer in [0, max_length={max_length}], got {min_length!r}")
    keep = (lens >= min_length) & (lens <= max_length)
    return LengthFilter(
        kept=np.flatnonzero(keep),
        kept_examples=int(keep.sum()),
        kept_tokens=int(lens[keep].sum()),
        dropped_examples=int((~keep).sum()),
        dropped_tokens=int(lens[~keep].sum()),
        max_length=max_length,
    )


def _round_up(x: np.ndarray | int, m: int) -> np.ndarray | int:
    return (x + m - 1) // m * m


def token_budget_batches(
    lengths: Sequence[int] | np.ndarray,
    max_tokens: int,
    *,
    seed: int | None = None,
    pool_size: int | None = None,
    max_batch_size: int | None = None,
    batch_size_multiple: int = 1,
    pad_to_multiple_of: int = 1,
    indices: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Batches of example indices with ``len(batch) × padded_max_length <= max_tokens``.

    The examples (``indices``, default all) are shuffled with ``seed`` (no shuffle when
    ``None``), cut into pools of ``pool_size`` (default: one pool, i.e. a global sort), sorted
    by length inside each pool (stably, so equal lengths stay in random order), cut greedily
    into the largest batches the budget allows, and the batch order is shuffled. The padded
    length is the batch's longest example rounded up to ``pad_to_multiple_of``; batch sizes
    are rounded down to a multiple of ``batch_size_multiple`` (tensor-core friendly) when
    the budget allows at least one multiple, except the last batch of each pool, which
    takes what is left.
    """
    lens = _lengths(lengths)
    max_tokens = check_int_positive("max_tokens", max_tokens)
    pad_m = check_int_positive("pad_to_multiple_of", pad_to_multiple_of)
    mult = check_int_positive("batch_size_multiple", batch_size_multiple)
    cap = None if max_batch_size is None else check_int_positive("max_batch_size", max_batch_size)
    idx = np.arange(lens.size) if indices is None else np.asarray(indices, dtype=np.int64)
    if idx.size == 0:
        return []
    longest = int(_round_up(lens[idx].max(), pad_m))
    if longest > max_tokens:
        i = int(idx[np.argmax(lens[idx])])
        raise ValueError(
            f"max_tokens must be >= the longest (padded) example, {longest} tokens at index {i}, got {max_tokens}; "
            "drop long examples first with filter_by_length"
        )
    rng = np.random.default_rng(seed) if seed is not None else None
    if rng is not None:
        idx = idx[rng.permutation(idx.size)]
    pool = idx.size if pool_size is None else check_int_positive("pool_size", pool_size)
    batches: list[np.ndarray] = []
    for p0 in range(0, idx.size, pool):
        chunk = idx[p0 : p0 + pool]
        chunk = chunk[np.argsort(lens[chunk], kind="stable")]
        padded = _round_up(lens[chunk], pad_m).tolist()
        start = 0
        # ascending lengths: the newest example is the batch's longest, so the cost is n × w
        for j, w in enumerate(padded):
            while (j - start + 1) * w > max_tokens or (cap is not None and j - start + 1 > cap):
                n = j - start  # >= 1: a single example always fits (checked above)
                if mult > 1 and n >= mult:
                    n -= n % mult
                batches.append(chunk[start : start + n])
                start += n
        if start < chunk.size:
            batches.append(chunk[start:])
    if rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def batch_padding_efficiency(lengths: Sequence[int] | np.ndarray, batches: Sequence[np.ndarray], pad_to_multiple_of: int = 1) -> float:
    """Fraction of real tokens in the padded batches: Σ lengths / Σ n_b · padded_max_b."""
    lens = _lengths(lengths)
    real = sum(int(lens[b].sum()) for b in batches)
    slots = sum(len(b) * int(_round_up(lens[b].max(), pad_to_multiple_of)) for b in batches if len(b))
    return real / slots if slots else 1.0


class TokenBudgetSampler:
    """A ``batch_sampler`` for ``torch.utils.data.DataLoader``: token-budget batches, a new
    shuffle every epoch, resumable mid-epoch (``state_dict``).

    Epoch e's batches are ``token_budget_batches(..., seed=seed * 1_000_003 + e)`` (no
    shuffle when ``shuffle=False``); ``max_length`` filters first and keeps the report in
    ``self.filtered``.
    """

    def __init__(
        self,
        lengths: Sequence[int] | np.ndarray,
        max_tokens: int,
        *,
        max_length: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        pool_size: int | None = None,
        max_batch_size: int | None = None,
        batch_size_multiple: int = 1,
        pad_to_multiple_of: int = 1,
    ) -> None:
        self.lengths = _lengths(lengths)
        self.max_tokens = check_int_positive("max_tokens", max_tokens)
        self.filtered = filter_by_length(self.lengths, max_length) if max_length is not None else None
        self.indices = self.filtered.kept if self.filtered is not None else np.arange(self.lengths.size)
        self.shuffle, self.seed = bool(shuffle), int(seed)
        self._kw = dict(pool_size=pool_size, max_batch_size=max_batch_size, batch_size_multiple=batch_size_multiple, pad_to_multiple_of=pad_to_multiple_of)
        self.epoch = 0
        self.position = 0
        self._cache: tuple[int, list[np.ndarray]] | None = None
        self._batches(0)  # validate the arguments now, not at the first iteration

    def _batches(self, epoch: int) -> list[np.ndarray]:
        if self._cache is None or self._cache[0] != epoch:
            seed = self.seed * 1_000_003 + epoch if self.shuffle else None
            self._cache = (epoch, token_budget_batches(self.lengths, self.max_tokens, seed=seed, indices=self.indices, **self._kw))
        return self._cache[1]

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = int(epoch), 0

    def __len__(self) -> int:
        return len(self._batches(self.epoch))

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._batches(self.epoch)
        while self.position < len(batches):
            b = batches[self.position]
            self.position += 1
            yield b.tolist()
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), int(state["position"])
        self._cache = None


def pad_batch(sequences: Sequence[torch.Tensor], pad_value: int = 0, pad_to_multiple_of: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(n, T)`` tensor and the ``(n,)`` lengths; T is the longest rounded up."""
    if not sequences:
        raise ValueError("sequences must not be empty")
    m = check_int_positive("pad_to_multiple_of", pad_to_multiple_of)
    lens = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    t = int(_round_up(int(lens.max()), m))
    out = torch.full((len(sequences), t), pad_value, dtype=torch.as_tensor(sequences[0]).dtype)
    for i, s in enumerate(sequences):
        out[i, : len(s)] = torch.as_tensor(s)
    return out, lens
