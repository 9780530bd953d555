"""bigbatch.integrations' framework-free helpers: the global batch, rescaling to it, the samples scheduler."""

from __future__ import annotations

import pytest
import torch

from bigbatch.integrations import global_batch_size, rescale_for_global_batch, sample_lr_scheduler
from bigbatch.integrations.common import leading_dim, scale_lrs
from bigbatch.scaling import Recipe, rescale
from bigbatch.schedules import SampleLR, Schedule


def test_global_batch_counts_every_process():
    assert global_batch_size(32, 4, 8) == 1024
    with pytest.raises(ValueError, match="world_size"):
        global_batch_size(32, 4, 0)


def test_rescale_for_global_batch_is_rescale_at_the_global_batch():
    tuned = Recipe(batch_size=256, lr=2e-3, optimizer="lamb", dataset_size=10_000, warmup_epochs=0.5,
                   budget_epochs=3, schedule="cosine")
    got = rescale_for_global_batch(tuned, per_device_batch=32, accumulation=4, world_size=8)
    assert got.recipe == rescale(tuned, 1024).recipe
    assert got.recipe.lr == pytest.approx(2e-3 * 2)  # sqrt rule for LAMB, k = 4


def test_sample_lr_scheduler_steps_by_the_global_batch():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = Schedule(peak_lr=0.1, warmup_samples=100, decay="cosine", total_samples=1000)
    s = sample_lr_scheduler(opt, sched, global_batch=64)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    assert lrs == pytest.approx([sched(64 * t) for t in range(10)])
    with pytest.raises(ValueError, match="global_batch"):
        sample_lr_scheduler(opt, sched, global_batch=0)


def test_scale_lrs_moves_groups_and_scheduler():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    s = SampleLR(opt, Schedule(peak_lr=0.1), batch_size=64)
    assert scale_lrs(opt, s, "linear", 64, 256) == 4
    opt.step()
    s.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.4)  # the scheduler keeps the new base LR
    assert s.batch_size == 256 and s.samples == 256
    with pytest.raises(ValueError, match="rule must be one of linear, sqrt, none"):
        scale_lrs(opt, s, "legw", 64, 128)


def test_leading_dim():
    assert leading_dim({"x": torch.zeros(5, 3), "y": torch.zeros(5)}) == 5
    assert leading_dim((torch.zeros(7, 2), torch.zeros(7))) == 7
    with pytest.raises(ValueError, match="count_fn"):
        leading_dim({"a": "text"})
