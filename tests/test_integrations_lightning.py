"""bigbatch.integrations.lightning under a real lightning.Trainer (tiny model, CPU, seconds)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

pytest.importorskip("lightning")
import lightning.pytorch as pl  # noqa: E402

from bigbatch.adaptive import RampController  # noqa: E402
from bigbatch.adaptive.schedule import ScheduleController  # noqa: E402
from bigbatch.integrations.lightning import BatchSizeCallback, NoiseScaleCallback, configure_optimizers  # noqa: E402
from bigbatch.noise import NoiseMonitor  # noqa: E402
from bigbatch.optim import create_optimizer  # noqa: E402
from bigbatch.schedules import Schedule  # noqa: E402

MICRO = 4


def _data(n: int = 96, seed: int = 0) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = x @ torch.randn(6, 1, generator=g) + 0.5 * torch.randn(n, 1, generator=g)
    return torch.utils.data.TensorDataset(x, y)


class Tiny(pl.LightningModule):
    def __init__(self, optimizer: str = "sgd", lr: float = 0.05, schedule: Schedule | None = None,
                 global_batch: int | None = None, n: int = 96) -> None:
        super().__init__()
        self.n = n
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))
        self.opt_name, self.lr, self.schedule, self.global_batch = optimizer, lr, schedule, global_batch
        self.micro_seen = 0
        self.steps: list[tuple[int, float]] = []  # (micro-batches in the step, lr) per optimizer step
        self.closure_calls = 0

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.micro_seen += 1
        return nn.functional.mse_loss(self.net(x), y)

    def on_before_optimizer_step(self, optimizer):
        self.steps.append((self.micro_seen, optimizer.param_groups[0]["lr"]))
        self.micro_seen = 0

    def configure_optimizers(self):
        return configure_optimizers(self, self.opt_name, lr=self.lr, schedule=self.schedule, global_batch=self.global_batch)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(_data(self.n), batch_size=MICRO, shuffle=False)


def _trainer(tmp_path, callbacks, accumulate: int = 4, max_steps: int = -1, max_epochs: int = 1, **kw) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, max_epochs=max_epochs, max_steps=max_steps,
                      accumulate_grad_batches=accumulate, callbacks=callbacks, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=str(tmp_path), **kw)


def _hand_loop(model: nn.Module, steps: int, accumulate: int = 4, lr: float = 0.05) -> list[float]:
    """The reference: the same model, data order and micro-batches, NoiseMonitor driven by hand."""
    ds = _data()
    mon = NoiseMonitor(model, mode="accumulation", beta=0.99)
    opt = create_optimizer("sgd", model, lr=lr)  # what configure_optimizers builds
    out = []
    for s in range(steps):
        opt.zero_grad()
        mon.begin_step()
        for j in range(accumulate):
            i = (s * accumulate + j) * MICRO
            x, y = ds.tensors[0][i:i + MICRO], ds.tensors[1][i:i + MICRO]
            with mon.micro_batch(MICRO):
                (nn.functional.mse_loss(model(x), y) / accumulate).backward()
        out.append(mon.end_step().b_simple)
        opt.step()
    return out


class _Record(pl.Callback):
    def __init__(self, noise: NoiseScaleCallback) -> None:
        self.noise, self.values = noise, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if "noise/b_simple" in trainer.callback_metrics and trainer.global_step > len(self.values):
            self.values.append(float(trainer.callback_metrics["noise/b_simple"]))


def test_noise_callback_matches_hand_loop(tmp_path):
    module = Tiny()
    ref_model = copy.deepcopy(module.net)
    noise = NoiseScaleCallback(every=1, beta=0.99)
    rec = _Record(noise)
    _trainer(tmp_path, [noise, rec], gradient_clip_val=0.01).fit(module)  # clipping must not change the reading
    # 96 examples / (4 x 4) = 6 steps; the reference without clipping diverges in weights, so
    # compare the first step exactly and all steps on an unclipped run below.
    ref = _hand_loop(copy.deepcopy(ref_model), 1)
    assert len(rec.values) == 6
    assert rec.values[0] == pytest.approx(ref[0], rel=1e-5)

    module2 = Tiny()
    noise2 = NoiseScaleCallback()
    rec2 = _Record(noise2)
    _trainer(tmp_path, [noise2, rec2]).fit(module2)
    ref = _hand_loop(copy.deepcopy(ref_model), 6)
    assert all(math.isfinite(v) for v in ref[1:])
    assert rec2.values == pytest.approx(ref, rel=1e-5, nan_ok=True)
    assert noise2.monitor.estimator.b_simple == pytest.approx(ref[-1], rel=1e-5)


def test_noise_callback_accounts_for_the_grad_scaler(tmp_path):
    """16-mixed with a GradScaler: the gradients seen during backward are scaled; the estimates are not."""
    from lightning.pytorch.plugins import MixedPrecision

    est = []
    for init_scale in (1.0, 1024.0):
        noise = NoiseScaleCallback()
        scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=10**6)
        _trainer(tmp_path, [noise], plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)]).fit(Tiny())
        est.append(noise.monitor.estimator)
    assert est[0].n_updates == est[1].n_updates == 6
    for key in ("grad_sqnorm", "trace_sigma", "b_simple"):
        assert getattr(est[1], key) == pytest.approx(getattr(est[0], key), rel=1e-5), key
    # And fp16 autocast stays close to the fp32 hand loop.
    assert est[0].b_simple == pytest.approx(_hand_loop(Tiny().net, 6)[-1], rel=1e-2)


def test_noise_callback_state_survives_checkpoint(tmp_path):
    # 48 examples = 3 steps of 4 x 4 per epoch: the checkpoint is at an epoch boundary, so the
    # resumed run sees the same batches as the uninterrupted one.
    module = Tiny(n=48)
    noise = NoiseScaleCallback()
    trainer = _trainer(tmp_path, [noise], max_epochs=1)
    trainer.fit(module)
    ckpt = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = noise.monitor.state_dict()
    assert saved["estimator"]["n_updates"] == 3

    noise2 = NoiseScaleCallback()
    _trainer(tmp_path, [noise2], max_epochs=1).fit(Tiny(n=48), ckpt_path=str(ckpt))  # restores, trains nothing
    assert noise2.monitor.state_dict() == saved
    assert noise2.tap.steps == 3

    noise3 = NoiseScaleCallback()
    _trainer(tmp_path, [noise3], max_epochs=2).fit(Tiny(n=48), ckpt_path=str(ckpt))
    full = NoiseScaleCallback()
    _trainer(tmp_path, [full], max_epochs=2).fit(Tiny(n=48))
    assert noise3.monitor.estimator.n_updates == full.monitor.estimator.n_updates == 6
    assert noise3.monitor.estimator.b_simple == pytest.approx(full.monitor.estimator.b_simple, rel=1e-5)


def test_lamb_closure_path_and_sample_schedule(tmp_path):
    """Lightning calls optimizer.step(closure): LAMB must run the closure; the LR follows Schedule in samples."""
    sched = Schedule(peak_lr=0.01, warmup_samples=32, decay="cosine", total_samples=96)
    global_batch = MICRO * 2
    module = Tiny("lamb", lr=0.01, schedule=sched, global_batch=global_batch)
    before = [p.detach().clone() for p in module.parameters()]
    _trainer(tmp_path, [], accumulate=2).fit(module)
    assert len(module.steps) == 12
    assert all(n == 2 for n, _ in module.steps)  # the closure ran both micro-batches of every step
    assert [lr for _, lr in module.steps] == pytest.approx([sched(t * global_batch) for t in range(12)], rel=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))


def test_ramp_changes_accumulation_mid_epoch(tmp_path):
    ramp = RampController(start_batch=4, end_batch=16, ramp_samples=40, increment=4, granularity=4)
    cb = BatchSizeCallback(RampController(start_batch=4, end_batch=16, ramp_samples=40, increment=4, granularity=4),
                           micro_batch_size=MICRO, rule="linear")
    module = Tiny(lr=0.04)
    _trainer(tmp_path, [cb], accumulate=1).fit(module)
    # The expected run: the ramp's batch at the samples seen before each step.
    expected, samples = [], 0
    while samples < 96:
        b = min(ramp.batch_size_at(samples), 96 - samples)
        expected.append(b)
        samples += b
    assert [n * MICRO for n, _ in module.steps] == expected
    assert expected[:8] == [4, 4, 4, 4, 8, 8, 12, 16]  # changes inside the one epoch
    # LR moved by the linear rule from the starting batch 4.
    assert [lr for _, lr in module.steps] == pytest.approx([0.04 * min(ramp.batch_size_at(sum(expected[:i])), 16) / 4
                                                            for i in range(len(expected))], rel=1e-6)
    assert [(h[1], h[2]) for h in cb.history] == [(16, 8), (32, 12), (44, 16)]  # (samples, new batch)
    assert cb.samples == 96


def test_sample_threshold_schedule_mid_epoch(tmp_path):
    """A Megatron-style threshold schedule ("samples:batch") through the same callback."""
    make = lambda: ScheduleController(schedule="0:4 24:8 60:16", granularity=4)  # noqa: E731
    cb = BatchSizeCallback(make(), micro_batch_size=MICRO, rule="sqrt")
    module = Tiny(lr=0.04)
    _trainer(tmp_path, [cb], accumulate=1).fit(module)
    ref, expected, samples = make(), [], 0
    while samples < 96:
        b = min(ref.batch_size_at(samples), 96 - samples)
        expected.append(b)
        samples += b
    assert expected == [4] * 6 + [8] * 5 + [16, 16]
    assert [n * MICRO for n, _ in module.steps] == expected
    assert [(h[1], h[2]) for h in cb.history] == [(24, 8), (64, 16)]
    assert module.steps[-1][1] == pytest.approx(0.04 * 2.0)  # sqrt(16 / 4)


def test_batch_size_callback_resumes(tmp_path):
    """Checkpoint after epoch 1 of a ramp, resume for epoch 2: the same steps as an uninterrupted run."""
    make = lambda: BatchSizeCallback(RampController(start_batch=4, end_batch=12, ramp_samples=40, granularity=4),  # noqa: E731
                                     micro_batch_size=MICRO, rule="linear")
    full, full_cb = Tiny(lr=0.04, n=48), make()
    _trainer(tmp_path, [full_cb], accumulate=1, max_epochs=2).fit(full)

    first, cb1 = Tiny(lr=0.04, n=48), make()
    trainer = _trainer(tmp_path, [cb1], accumulate=1, max_epochs=1)
    trainer.fit(first)
    trainer.save_checkpoint(tmp_path / "e1.ckpt")
    second, cb2 = Tiny(lr=0.04, n=48), make()
    _trainer(tmp_path, [cb2], accumulate=1, max_epochs=2).fit(second, ckpt_path=str(tmp_path / "e1.ckpt"))
    resumed = first.steps + second.steps
    assert [n for n, _ in resumed] == [n for n, _ in full.steps] == [1] * 5 + [2] * 3 + [1] + [3] * 4
    assert [lr for _, lr in resumed] == pytest.approx([lr for _, lr in full.steps], rel=1e-6)
    assert cb2.state_dict() == full_cb.state_dict()


def test_batch_size_callback_rejects_bad_granularity(tmp_path):
    cb = BatchSizeCallback(RampController(start_batch=2, end_batch=4, ramp_samples=8, granularity=2), micro_batch_size=MICRO)
    with pytest.raises(ValueError, match="granularity"):
        _trainer(tmp_path, [cb], accumulate=1).fit(Tiny())


def test_callbacks_refuse_manual_optimization(tmp_path):
    class Manual(Tiny):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(ValueError, match="automatic optimization"):
        _trainer(tmp_path, [NoiseScaleCallback()], accumulate=1).fit(Manual())


# ---- tokens of unequal counts, a per-batch mean loss (issue 26, A.1) -----------------------------
class Masked(pl.LightningModule):
    """Sequences of 5 positions with a random number of valid ones: training_step's loss is the mean over
    the batch's valid positions (count_fn = tokens, reduction='mean'), so the micro-batches' factors differ."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))
        g = torch.Generator().manual_seed(3)
        x = torch.randn(64, 5, 6, generator=g)
        y = x.sum(-1, keepdim=True) * 0.3 + 0.5 * torch.randn(64, 5, 1, generator=g)
        mask = (torch.arange(5) < torch.randint(1, 6, (64, 1), generator=g)).float()
        self.ds = torch.utils.data.TensorDataset(x, y, mask)
        self.seen: list[tuple[dict, tuple]] = []  # (weights, batch) of every micro-batch

    @staticmethod
    def sum_loss(net, batch):
        x, y, mask = batch
        return ((net(x) - y).squeeze(-1).pow(2) * mask).sum()

    def training_step(self, batch, batch_idx):
        self.seen.append(({k: v.detach().clone() for k, v in self.net.state_dict().items()}, batch))
        return self.sum_loss(self.net, batch) / batch[2].sum()

    def configure_optimizers(self):
        return configure_optimizers(self, "sgd", lr=0.05)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.ds, batch_size=MICRO, shuffle=False)


def test_noise_callback_token_mean_matches_float64_per_micro_batch_reference(tmp_path):
    import warnings

    from _noise_ref import ema_reference, step_inputs_reference

    class Record(pl.Callback):
        def __init__(self):
            self.values = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            m = trainer.callback_metrics
            if "noise/b_simple" in m and trainer.global_step > len(self.values):
                self.values.append(tuple(float(m[f"noise/{k}"]) for k in ("b_simple", "grad_sqnorm", "trace_sigma")))

    module, accum = Masked(), 4
    noise, rec = NoiseScaleCallback(count_fn=lambda b: b[2].sum(), reduction="mean"), Record()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(tmp_path, [noise, rec], accumulate=accum).fit(module)
    ref64 = copy.deepcopy(module.net).double()
    params = list(ref64.parameters())
    inputs = []
    for s in range(len(module.seen) // accum):
        micro = module.seen[s * accum:(s + 1) * accum]
        ref64.load_state_dict(micro[0][0])
        S = [torch.autograd.grad(Masked.sum_loss(ref64, [t.double() for t in b]), params) for _, b in micro]
        n = [float(b[2].sum()) for _, b in micro]
        assert len(set(n)) > 1
        inputs.append(step_inputs_reference(S, n, [1.0 / (c * accum) for c in n]))
    ref = ema_reference(inputs, 0.99)
    assert len(rec.values) == len(ref) == 4
    for i, key in enumerate(("b_simple", "grad_sqnorm", "trace_sigma")):
        assert [v[i] for v in rec.values] == pytest.approx([r[i] for r in ref], rel=1e-5), key
    assert sum("weights their units unequally" in str(w.message) for w in caught) == 1


def test_batch_size_callback_sets_the_scheduler_batch_at_the_first_step(tmp_path):
    """issue 26 A.5: a SampleLR built for micro x 4 while the Trainer starts at accumulation 1 ran 4x fast."""
    sched = Schedule(peak_lr=0.04, warmup_samples=48, decay="cosine", total_samples=96)
    cb = BatchSizeCallback(ScheduleController(schedule="0:4 48:8", granularity=4), micro_batch_size=MICRO, rule="none")
    module = Tiny(lr=0.04, schedule=sched, global_batch=MICRO * 4)
    with pytest.warns(RuntimeWarning, match="built for a global batch of 16, the Trainer runs 4"):
        _trainer(tmp_path, [cb], accumulate=1).fit(module)
    batches = [n * MICRO for n, _ in module.steps]
    assert batches == [4] * 12 + [8] * 6
    seen = [sum(batches[:i]) for i in range(len(batches))]
    assert [lr for _, lr in module.steps] == pytest.approx([sched(n) for n in seen], rel=1e-6)
