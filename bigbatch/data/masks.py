"""Attention masks that keep packed documents apart (Krell et al. 2021, §3: no cross-contamination).

From per-token document ids (``-1`` on padding) of a packed row:

* ``block_causal_mask``: a boolean ``(rows, 1, T, T)`` mask, True where attention is
  allowed — same document and not in the future — for ``F.scaled_dot_product_attention``'s
  ``attn_mask`` (any backend, any device; O(T²) memory per row).
* ``flex_block_mask``: the same pattern as a FlexAttention ``BlockMask``
  (``torch.nn.attention.flex_attention``), which skips fully masked tiles; ``None`` where
  FlexAttention is unavailable.
* ``cu_seqlens``: cumulative document lengths, the input of variable-length kernels
  (flash-attn's ``*_varlen_func``).

Padding is treated as a document of its own: a pad token attends to earlier pads only, so
no query row is fully masked (a fully masked row would give NaN in SDPA and poison the
backward pass), and no real token ever sees a pad.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["block_causal_mask", "flex_block_mask", "flex_available", "packed_attention", "cu_seqlens", "shift_targets"]


def _check_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    if doc_ids.dim() == 1:
        doc_ids = doc_ids[None]
    if doc_ids.dim() != 2:
        raise ValueError(f"doc_ids must have shape (rows, T) or (T,), got {tuple(doc_ids.shape)}")
    if doc_ids.dtype.is_floating_point:
        raise ValueError(f"doc_ids must be an integer tensor, got {doc_ids.dtype}")
    return doc_ids


def block_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Boolean ``(rows, 1, T, T)``: query i may attend to key j iff doc[i] == doc[j] and j <= i."""
    d = _check_doc_ids(doc_ids)
    t = d.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=d.device).tril()
    return ((d[:, :, None] == d[:, None, :]) & causal)[:, None]


def flex_available() -> bool:
    """Whether ``torch.nn.attention.flex_attention`` can be imported."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def flex_block_mask(doc_ids: torch.Tensor, n_heads: int | None = None) -> Any:
    """The document-causal pattern as a FlexAttention ``BlockMask`` (or ``None`` if unavailable).

    ``n_heads=None`` broadcasts over heads. T is padded internally by FlexAttention to its
    block size (128); the mask function reads ``doc_ids`` only inside [0, T).
    """
    if not flex_available():
        return None
    from torch.nn.attention.flex_attention import create_block_mask

    d = _check_doc_ids(doc_ids)
    rows, t = d.shape

    def document_causal(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return (d[b, q] == d[b, kv]) & (kv <= q)

    return create_block_mask(document_causal, rows, n_heads, t, t, device=d.device)


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any, dropout_p: float = 0.0) -> torch.Tensor:
    """Attention of ``(rows, heads, T, dh)`` tensors under a bool mask or a FlexAttention ``BlockMask``."""
    if isinstance(mask, torch.Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    if dropout_p:
        raise ValueError(f"dropout_p must be 0 with a FlexAttention BlockMask, got {dropout_p}")
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(q, k, v, block_mask=mask)


def cu_seqlens(doc_ids: torch.Tensor) -> torch.Tensor:
    """Int32 cumulative lengths of the runs of equal ids in the flattened rows (padding runs included).

    A new run starts at every row start and wherever the id changes; this is the
    ``cu_seqlens`` argument of variable-length attention kernels.
    """
    d = _check_doc_ids(doc_ids)
    flat = d.reshape(-1)
    t = d.shape[1]
    idx = torch.arange(flat.numel(), device=d.device)
    start = (idx % t == 0) | torch.cat([torch.ones(1, dtype=torch.bool, device=d.device), flat[1:] != flat[:-1]])
    starts = torch.nonzero(start).reshape(-1)
    return torch.cat([starts, torch.tensor([flat.numel()], device=d.device)]).to(torch.int32)


def shift_targets(tokens: torch.Tensor, doc_ids: torch.Tensor, ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token inputs and targets of packed rows: a target crossing a document boundary is ignored.

    ``tokens`` and ``doc_ids`` are ``(rows, T + 1)``; returns ``(inputs, targets)`` of
    ``(rows, T)`` with ``targets = ignore_index`` where token t+1 belongs to another document
    or to padding — the last token of a document predicts nothing.
    """
    d = _check_doc_ids(doc_ids)
    if tokens.shape != d.shape:
        raise ValueError(f"tokens {tuple(tokens.shape)} and doc_ids {tuple(d.shape)} must have the same shape")
    y = tokens[:, 1:].clone()
    y[(d[:, 1:] != d[:, :-1]) | (d[:, 1:] < 0)] = ignore_index
    return tokens[:, :-1], y
