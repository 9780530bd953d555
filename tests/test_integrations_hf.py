"""bigbatch.integrations.hf under a real transformers.Trainer (tiny GPT-2 from a config, CPU, seconds)."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from bigbatch.integrations.hf import (  # noqa: E402
    NoiseScaleCallback, add_callback, optimizer_and_scheduler, optimizer_cls_and_kwargs, trainer_global_batch,
)
from bigbatch.noise import NoiseMonitor  # noqa: E402
from bigbatch.optim import LAMB, create_optimizer  # noqa: E402
from bigbatch.schedules import Schedule  # noqa: E402

SEQ, PER_DEVICE, ACCUM = 12, 2, 4


def _model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=SEQ, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 64) -> None:
        g = torch.Generator().manual_seed(1)
        # Skewed tokens (8 of 64, each followed by its successor half the time): a gradient
        # signal well above the noise at initialisation, so |G|^2 and B_simple are positive.
        start = torch.randint(0, 8, (n, SEQ), generator=g)
        follow = torch.rand(n, SEQ, generator=g) < 0.5
        self.ids = start.clone()
        self.ids[:, 1:] = torch.where(follow[:, 1:], (start[:, :-1] + 1) % 8, start[:, 1:])

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _args(tmp_path, **kw) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=PER_DEVICE, gradient_accumulation_steps=ACCUM,
                max_steps=4, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", seed=0,
                learning_rate=0.05, weight_decay=0.0, max_grad_norm=0.5, disable_tqdm=True, dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


class _Batches(TrainerCallback):
    """Records the input_ids of every training forward (the data order the Trainer used) and each step's LR."""

    def __init__(self) -> None:
        self.batches: list[torch.Tensor] = []
        self.lrs: list[float] = []
        self._h = None

    def on_train_begin(self, args, state, control, model=None, **kw):
        self._h = model.register_forward_pre_hook(
            lambda m, a, k: self.batches.append(k["input_ids"].clone()) if m.training else None, with_kwargs=True)

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kw):
        self.lrs.append(optimizer.param_groups[0]["lr"])

    def on_train_end(self, args, state, control, **kw):
        self._h.remove()


def _hand_loop(batches: list[torch.Tensor], steps: int, every: int = 1) -> list[float]:
    """Reference: the same model, micro-batches and order; the loss a mean over tokens; clip after reading."""
    model = _model()
    mon = NoiseMonitor(model, mode="accumulation", beta=0.99, every=every)
    opt = create_optimizer("sgd", model, lr=0.05)
    out = []
    for s in range(steps):
        mon.begin_step()
        for ids in batches[s * ACCUM:(s + 1) * ACCUM]:
            with mon.micro_batch(ids.shape[0] * (SEQ - 1)):
                (model(input_ids=ids, labels=ids).loss / ACCUM).backward()
        out.append(mon.end_step().b_simple)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        opt.zero_grad()
    return out


def _run(tmp_path, callbacks, **kw):
    model = _model()
    args = _args(tmp_path, **kw)
    trainer = Trainer(model=model, args=args, train_dataset=_Tokens(),
                      optimizers=optimizer_and_scheduler(model, args, "sgd"))
    for cb in callbacks:
        add_callback(trainer, cb)
    return trainer


def test_noise_callback_matches_hand_loop(tmp_path):
    noise, rec = NoiseScaleCallback(), _Batches()
    trainer = _run(tmp_path, [noise, rec])
    trainer.train()
    logged = [h["noise/b_simple"] for h in trainer.state.log_history if "noise/b_simple" in h]
    assert len(logged) == 4 and len(rec.batches) == 16
    ref = _hand_loop(rec.batches, 4)
    assert all(math.isfinite(v) for v in ref)
    # Equal to the hand loop's although the Trainer normalises by num_items_in_batch and clips
    # (max_grad_norm=0.5 is active: the reading would differ after clipping).
    assert logged == pytest.approx(ref, rel=1e-5)
    grad = [h["noise/grad_sqnorm"] for h in trainer.state.log_history if "noise/grad_sqnorm" in h]
    assert grad[-1] == pytest.approx(noise.monitor.estimator.grad_sqnorm, rel=1e-5)


def test_noise_callback_sees_loss_divided_by_accumulation(tmp_path):
    """Without num_items_in_batch the Trainer divides a mean loss by the accumulation steps: same values."""
    noise, rec = NoiseScaleCallback(), _Batches()
    trainer = _run(tmp_path, [noise, rec])
    trainer.model_accepts_loss_kwargs = False  # the Trainer then passes no num_items_in_batch
    trainer.train()
    logged = [h["noise/b_simple"] for h in trainer.state.log_history if "noise/b_simple" in h]
    assert logged == pytest.approx(_hand_loop(rec.batches, 4), rel=1e-5)


def test_noise_every_n_steps(tmp_path):
    noise, rec = NoiseScaleCallback(every=2), _Batches()
    trainer = _run(tmp_path, [noise, rec])
    trainer.train()
    logged = [(h["step"], h["noise/b_simple"]) for h in trainer.state.log_history if "noise/b_simple" in h]
    ref = _hand_loop(rec.batches, 4, every=2)
    assert [s for s, _ in logged] == [1, 3]  # steps 0 and 2 are measured, logged after them
    assert [v for _, v in logged] == pytest.approx([ref[0], ref[2]], rel=1e-5)
    assert noise.monitor.estimator.n_updates == 2


def test_noise_reading_waits_for_the_next_log(tmp_path):
    """Measured every 3 steps, logged every 2: each reading is logged at the first log after it
    (it used to be dropped when the log did not fall on the measured step)."""
    noise, rec = NoiseScaleCallback(every=3), _Batches()
    trainer = _run(tmp_path, [noise, rec], logging_steps=2)
    trainer.train()
    logged = [(h["step"], h["noise/b_simple"]) for h in trainer.state.log_history if "noise/b_simple" in h]
    ref = _hand_loop(rec.batches, 4, every=3)
    assert [s for s, _ in logged] == [2, 4]  # steps 0 and 3 (0-based) are measured
    assert [v for _, v in logged] == pytest.approx([ref[0], ref[3]], rel=1e-5)


def test_lr_follows_schedule_in_samples(tmp_path):
    sched = Schedule(peak_lr=0.05, warmup_samples=16, decay="cosine", total_samples=64)
    model = _model()
    args = _args(tmp_path)
    opt, lr_sched = optimizer_and_scheduler(model, args, "lamb", schedule=sched)
    assert isinstance(opt, LAMB) and trainer_global_batch(args) == PER_DEVICE * ACCUM
    rec = _Batches()
    Trainer(model=model, args=args, train_dataset=_Tokens(), optimizers=(opt, lr_sched), callbacks=[rec]).train()
    assert rec.lrs == pytest.approx([sched(t * PER_DEVICE * ACCUM) for t in range(4)], rel=1e-6)


def test_optimizer_cls_and_kwargs_uses_param_groups(tmp_path):
    model = _model()
    cls, kw = optimizer_cls_and_kwargs(model, "lamb", lr=1e-3, weight_decay=0.1)
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=1), train_dataset=_Tokens(),
                      optimizer_cls_and_kwargs=(cls, kw))
    trainer.train()
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # Accelerate's wrapper
    assert isinstance(opt, LAMB)
    decays = sorted({g["weight_decay"] for g in opt.param_groups})
    assert decays == [0.0, 0.1]  # biases and norms excluded from decay by bigbatch's param_groups


@pytest.mark.parametrize("restore_flag", [False, True])
def test_noise_state_survives_checkpoint_resume(tmp_path, restore_flag):
    out = tmp_path / "run"
    noise = NoiseScaleCallback()
    trainer = _run(out, [noise], max_steps=4, save_strategy="steps", save_steps=2)
    trainer.train()
    saved = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["stateful_callbacks"]
    assert saved["NoiseScaleCallback"]["attributes"]["restored_state"]["monitor"]["estimator"]["n_updates"] == 2

    noise2 = NoiseScaleCallback()
    trainer2 = _run(out, [noise2], max_steps=4, save_strategy="no", restore_callback_states_from_checkpoint=restore_flag)
    trainer2.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    restored = next(c for c in trainer2.callback_handler.callbacks if isinstance(c, NoiseScaleCallback))
    assert trainer2.callback_handler.callbacks[0] is restored  # still ahead of the reporters
    assert restored.monitor.estimator.n_updates == 4
    # The resumed run ends on the uninterrupted run's estimate (same batches: the Trainer skips
    # the ones already seen).
    assert restored.monitor.estimator.b_simple == pytest.approx(noise.monitor.estimator.b_simple, rel=1e-5)


def test_changing_accumulation_mid_run_is_an_error(tmp_path):
    class Grow(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 1:
                args.gradient_accumulation_steps = 2

    trainer = _run(tmp_path, [NoiseScaleCallback(), Grow()])
    with pytest.raises(ValueError, match="gradient_accumulation_steps changed from 4 to 2"):
        trainer.train()


# ---- padded tokens, a per-micro-batch mean loss (issue 26, A.1) ----------------------------------
class _Padded(_Tokens):
    """Labels -100 past a random length per sequence: the micro-batches hold unequal token counts."""

    def __init__(self, n: int = 64) -> None:
        super().__init__(n)
        self.lengths = torch.randint(3, SEQ + 1, (n,), generator=torch.Generator().manual_seed(2))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        labels = self.ids[i].clone()
        labels[int(self.lengths[i]):] = -100
        return {"input_ids": self.ids[i], "labels": labels}


class _Steps(TrainerCallback):
    """The weights at the start of each optimizer step and the (input_ids, labels) of its micro-batches."""

    def __init__(self) -> None:
        self.steps: list[tuple[dict, list]] = []
        self._h = None

    def on_train_begin(self, args, state, control, model=None, **kw):
        def pre(m, a, k):
            if m.training:
                self.steps[-1][1].append((k["input_ids"].clone(), k["labels"].clone()))

        self._h = model.register_forward_pre_hook(pre, with_kwargs=True)
        self._model = model

    def on_step_begin(self, args, state, control, **kw):
        self.steps.append(({k: v.detach().clone() for k, v in self._model.state_dict().items()}, []))

    def on_train_end(self, args, state, control, **kw):
        self._h.remove()


@pytest.mark.parametrize("loss_kwargs", [False, True], ids=["mean-per-micro-batch", "num_items_in_batch"])
def test_noise_callback_with_padding_matches_float64_per_micro_batch_reference(tmp_path, loss_kwargs):
    """Unequal token counts per micro-batch. Without num_items_in_batch each micro-batch's loss is its
    own mean, divided by the accumulation: the factors differ (B_simple was 31-62% low); with it they
    are equal. Against float64 per-micro-batch gradients of the same weights and tokens."""
    import warnings

    from _noise_ref import ema_reference, step_inputs_reference

    noise, rec = NoiseScaleCallback(), _Steps()
    model = _model()
    args = _args(tmp_path)
    trainer = Trainer(model=model, args=args, train_dataset=_Padded(),
                      optimizers=optimizer_and_scheduler(model, args, "sgd"))
    for cb in (noise, rec):
        add_callback(trainer, cb)
    trainer.model_accepts_loss_kwargs = loss_kwargs
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    ref64 = _model().double()
    params = list(ref64.parameters())
    inputs = []
    for weights, micro in rec.steps:
        assert len(micro) == ACCUM
        ref64.load_state_dict(weights)
        S, n = [], []
        for ids, labels in micro:
            logits = ref64(input_ids=ids).logits
            target = labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                     ignore_index=-100, reduction="sum")
            S.append(torch.autograd.grad(loss, params))
            n.append(float(target.ne(-100).sum()))
        assert len(set(n)) > 1  # the point of the test: unequal counts
        a = [1.0 / sum(n)] * ACCUM if loss_kwargs else [1.0 / (c * ACCUM) for c in n]
        inputs.append(step_inputs_reference(S, n, a))
    ref = ema_reference(inputs, 0.99)
    logs = [h for h in trainer.state.log_history if "noise/b_simple" in h]
    assert len(logs) == len(ref) == 4
    for key, i in (("noise/b_simple", 0), ("noise/grad_sqnorm", 1), ("noise/trace_sigma", 2)):
        assert [h[key] for h in logs] == pytest.approx([r[i] for r in ref], rel=1e-5), key
    warned = [w for w in caught if "weights their units unequally" in str(w.message)]
    assert len(warned) == (0 if loss_kwargs else 1)  # said once, and only when the factors differ


def test_optimizer_and_scheduler_takes_the_recipe_lr_and_decay(tmp_path):
    """issue 26 A.4: the peak came from args.learning_rate (57x off) and the decay from args.weight_decay."""
    from bigbatch.recipe import Recipe

    args = _args(tmp_path, learning_rate=5e-5, weight_decay=0.0)
    batch = trainer_global_batch(args)
    recipe = Recipe(batch_size=batch, lr=2.83e-3, optimizer="lamb", weight_decay=0.02, dataset_size=64)
    opt, sched = optimizer_and_scheduler(_model(), args, "lamb", schedule=recipe)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2.83e-3] * len(opt.param_groups))
    assert max(g["weight_decay"] for g in opt.param_groups) == pytest.approx(0.02)
    optimizer_and_scheduler(_model(), args, "lamb", schedule=recipe, lr=2.83e-3)  # the same lr is fine
    with pytest.raises(ValueError, match=r"lr=0\.1 differs from the schedule's peak lr=0\.00283"):
        optimizer_and_scheduler(_model(), args, "lamb", schedule=recipe, lr=0.1)
    with pytest.raises(ValueError, match=r"weight_decay=0\.5 differs from the recipe's weight_decay=0\.02"):
        optimizer_and_scheduler(_model(), args, "lamb", schedule=recipe, weight_decay=0.5)
    other = Recipe(batch_size=4 * batch, lr=2.83e-3, dataset_size=64)
    with pytest.raises(ValueError, match=rf"global batch of {4 * batch}, the Trainer runs {batch}"):
        optimizer_and_scheduler(_model(), args, "lamb", schedule=other)
    with pytest.raises(ValueError, match=r"lr=0\.1 differs from the schedule's peak lr=0\.05"):
        optimizer_and_scheduler(_model(), args, "lamb", schedule=Schedule(peak_lr=0.05), lr=0.1)
