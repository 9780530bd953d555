"""Integrations with training frameworks: Hugging Face ``transformers.Trainer`` and Lightning.

``bigbatch.integrations.hf`` and ``bigbatch.integrations.lightning`` import their framework when
they are imported (``pip install bigbatch[hf]`` / ``bigbatch[lightning]``); this package and
``bigbatch.integrations.common`` import only torch and bigbatch, and the core never imports any
of them. A loop under Accelerate needs no adapter: see ``examples/accelerate_loop.py``.
"""

from bigbatch.integrations.common import global_batch_size, rescale_for_global_batch, sample_lr_scheduler

__all__ = ["global_batch_size", "rescale_for_global_batch", "sample_lr_scheduler"]
