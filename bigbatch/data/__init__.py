"""Data utilities for large-batch training: token-budget batching, length filtering, and
sequence packing without cross-contamination. Core: torch and numpy only."""

from bigbatch.data.batching import (
    LengthFilter,
    TokenBudgetSampler,
    batch_padding_efficiency,
    filter_by_length,
    pad_batch,
    token_budget_batches,
)
from bigbatch.data.masks import block_causal_mask, cu_seqlens, flex_available, flex_block_mask, packed_attention, shift_targets
from bigbatch.data.packing import PACKERS, PackedRows, Packing, pack, pack_bfd, pack_sequences, pack_spfhp, padding_efficiency

__all__ = [
    "LengthFilter",
    "TokenBudgetSampler",
    "batch_padding_efficiency",
    "filter_by_length",
    "pad_batch",
    "token_budget_batches",
    "block_causal_mask",
    "cu_seqlens",
    "flex_available",
    "flex_block_mask",
    "packed_attention",
    "shift_targets",
    "PACKERS",
    "PackedRows",
    "Packing",
    "pack",
    "pack_bfd",
    "pack_sequences",
    "pack_spfhp",
    "padding_efficiency",
]
