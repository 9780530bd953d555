"""What checkpoint averaging and the EMA share: the dtype a running average is kept in."""

from __future__ import annotations

import torch

__all__ = ["acc_dtype"]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to accumulate an average of ``dtype`` tensors in.

    bf16/fp16 averages are accumulated in fp32 and cast back once at the end: a running mean
    in bf16 loses the small increments (x − avg)/k after a few terms.
    """
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
