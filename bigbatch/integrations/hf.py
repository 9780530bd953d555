"""Hugging Face ``transformers.Trainer`` adapters: bigbatch optimizers and schedules, the noise scale.

* :func:`optimizer_and_scheduler` — ``Trainer(optimizers=optimizer_and_scheduler(model, args, "lamb",
  schedule=...))``: a bigbatch optimizer with ``param_groups`` and a :class:`SampleLR` advancing by
  the *global* batch (``per_device_train_batch_size × gradient_accumulation_steps × world_size``)
  at each optimizer step. :func:`optimizer_cls_and_kwargs` for ``Trainer(optimizer_cls_and_kwargs=...)``
  keeps HF's own scheduler.
* :class:`NoiseScaleCallback` — B_simple, |G|² and tr Σ from the micro-batches of gradient
  accumulation (and the ranks under DDP), in the Trainer's logs (and its ``report_to`` backends
  when added with :func:`add_callback`).

The batch cannot change during a Trainer run: ``Trainer`` fixes the micro-batches per optimizer
step, the steps per epoch and ``max_steps`` when training starts (``_inner_training_loop``), so a
changed ``gradient_accumulation_steps`` would mis-scale the loss and mis-count epochs.
:class:`NoiseScaleCallback` and the scheduler raise if it changes. Needs ``pip install bigbatch[hf]``.
"""

from __future__ import annotations

from typing import Any

import torch

try:
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import ExportableState
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(f"bigbatch.integrations.hf needs transformers and accelerate: pip install 'bigbatch[hf]' ({e})") from e

from bigbatch._checks import check_int_positive
from bigbatch.integrations.common import MonitorTap, global_batch_size
from bigbatch.noise import NoiseMonitor
from bigbatch.optim import OPTIMIZERS, create_optimizer, param_groups
from bigbatch.recipe import Recipe
from bigbatch.schedules import SampleLR, Schedule

__all__ = ["optimizer_and_scheduler", "optimizer_cls_and_kwargs", "trainer_global_batch", "NoiseScaleCallback",
           "add_callback"]


def trainer_global_batch(args: TrainingArguments) -> int:
    """Examples per optimizer step of a Trainer run: per-device batch × accumulation × world size."""
    return global_batch_size(args.per_device_train_batch_size, args.gradient_accumulation_steps, args.world_size)


class _FixedBatchSampleLR(SampleLR):
    """A :class:`SampleLR` that refuses to keep counting when the Trainer's accumulation changed."""

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: Schedule, *, args: TrainingArguments) -> None:
        self._args, self._accum = args, args.gradient_accumulation_steps
        super().__init__(optimizer, schedule, batch_size=trainer_global_batch(args))

    def step(self, samples: float | None = None) -> None:  # type: ignore[override]
        if getattr(self, "_ready", False) and self._args.gradient_accumulation_steps != self._accum:
            raise ValueError(f"gradient_accumulation_steps changed from {self._accum} to "
                             f"{self._args.gradient_accumulation_steps} during a Trainer run; the Trainer cannot change "
                             "its batch mid-run (see docs/integrations.md)")
        super().step(samples)


def optimizer_and_scheduler(model: torch.nn.Module, args: TrainingArguments, optimizer: str = "lamb", *,
                            schedule: Schedule | Recipe | None = None, lr: float | None = None,
                            weight_decay: float | None = None, **optimizer_kwargs: Any
                            ) -> tuple[torch.optim.Optimizer, SampleLR]:
    """``(optimizer, scheduler)`` for ``Trainer(optimizers=...)``.

    ``schedule``: a :class:`Schedule` in samples, or a :class:`Recipe` with ``dataset_size``,
    already rescaled to the Trainer's global batch; None: a constant LR. The schedule's peak (the
    recipe's ``lr``) is the optimizer's LR, and a recipe's ``weight_decay`` its decay: they win over
    ``args.learning_rate``/``args.weight_decay``, which are used only without them. An explicit
    ``lr=`` (or, with a recipe, ``weight_decay=``) that differs from the schedule's raises, and so
    does a recipe whose ``batch_size`` is not :func:`trainer_global_batch` (rescale it first with
    :func:`bigbatch.integrations.common.rescale_for_global_batch`). The scheduler advances by the
    global batch per optimizer step, so the LR at step ``t`` is ``schedule(t × global batch)``,
    world size included.
    """
    decay = args.weight_decay if weight_decay is None else weight_decay
    if isinstance(schedule, Recipe):
        batch = trainer_global_batch(args)
        if schedule.batch_size != batch:
            raise ValueError(f"the recipe is for a global batch of {schedule.batch_size}, the Trainer runs {batch} "
                             "(per_device_train_batch_size x gradient_accumulation_steps x world size); rescale it "
                             "with rescale_for_global_batch")
        if weight_decay is not None and weight_decay != schedule.weight_decay:
            raise ValueError(f"weight_decay={weight_decay} differs from the recipe's weight_decay={schedule.weight_decay}; "
                             "leave weight_decay out (the recipe's is used)")
        decay = schedule.weight_decay
        schedule = schedule.to_schedule()
    if schedule is None:
        schedule = Schedule(peak_lr=args.learning_rate if lr is None else lr)
    if not isinstance(schedule, Schedule):
        raise ValueError(f"schedule must be a bigbatch Schedule or Recipe, got {type(schedule).__name__}")
    if lr is not None and lr != schedule.peak_lr:
        raise ValueError(f"lr={lr} differs from the schedule's peak lr={schedule.peak_lr}; leave lr out "
                         "(the schedule's is used)")
    opt = create_optimizer(optimizer, model, lr=schedule.peak_lr, weight_decay=decay, **optimizer_kwargs)
    return opt, _FixedBatchSampleLR(opt, schedule, args=args)


def optimizer_cls_and_kwargs(model: torch.nn.Module, optimizer: str = "lamb", *, lr: float,
                             weight_decay: float = 0.0, **optimizer_kwargs: Any) -> tuple[type, dict[str, Any]]:
    """``(cls, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)`` (HF's own LR scheduler stays).

    The layer-wise optimizers get :func:`bigbatch.optim.param_groups` through the ``params`` key,
    which the Trainer uses instead of its own decay groups.
    """
    info = OPTIMIZERS.get(optimizer)
    if info is None:
        create_optimizer(optimizer, model, lr=lr)  # raises the registry's error naming the choices
        raise AssertionError("unreachable")
    if not isinstance(info.build, type):
        raise ValueError(f"optimizer {optimizer!r} is built by a function; use optimizer_and_scheduler()")
    kwargs: dict[str, Any] = {**info.defaults, **optimizer_kwargs, "lr": lr, "weight_decay": weight_decay}
    if info.layerwise:
        groups = param_groups(model, weight_decay)
        for g in groups:
            g.pop("names", None)
        kwargs["params"] = groups
    return info.build, kwargs


def _causal_lm(model: torch.nn.Module) -> bool:
    """Whether the model's loss shifts its labels (counted from what the model computes, not from
    the Trainer's guess: a model with ``loss_type=None`` falls back to the causal LM loss while the
    Trainer then counts ``num_items_in_batch`` unshifted)."""
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss
    except ImportError:  # older transformers: judge by the class name
        return type(model).__name__.endswith("ForCausalLM")
    enc_dec = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
    try:
        fn = model.loss_function
    except Exception:  # a model without HF's loss machinery
        return type(model).__name__.endswith("ForCausalLM") and not enc_dec
    return fn is ForCausalLMLoss and not enc_dec


class NoiseScaleCallback(TrainerCallback, ExportableState):
    """Logs the gradient noise scale of a ``transformers.Trainer`` run from its accumulation micro-batches.

    Hooks on the model read, for every training forward, the loss units of the micro-batch (the
    labels that are not ``-100``, shifted for causal LMs — what the Trainer's ``num_items_in_batch``
    counts) and the model's loss. A hook on that loss reads how the Trainer scaled it before
    ``backward`` (``num_items_in_batch`` or accumulation division, world-size factor, fp16 loss
    scale), and the step's accumulated gradient is read at the end of its last backward, after
    DDP's all-reduce and before the Trainer clips or unscales it. Without labels the unit is the
    example and the model's loss is taken as their mean.

    Logged as ``{prefix}b_simple``, ``{prefix}grad_sqnorm``, ``{prefix}trace_sigma`` (EMA
    estimates, in tokens for a language model) in the Trainer's logs (``trainer.state.log_history``);
    add it with :func:`add_callback` so that ``report_to`` backends see them too. Its state is saved
    in checkpoints (``trainer_state.json``) and restored on ``resume_from_checkpoint`` (with or
    without ``restore_callback_states_from_checkpoint``).

    Args:
        every: measure one optimizer step in ``every``.
        beta: EMA factor per reading.
        prefix: metric name prefix.
    """

    def __init__(self, every: int = 1, beta: float = 0.99, prefix: str = "noise/") -> None:
        self.every = check_int_positive("every", every)
        self.beta = beta
        self.prefix = prefix
        self.tap: MonitorTap | None = None
        self.restored_state: dict[str, Any] | None = None
        self._accum: int | None = None
        self._handles: list[Any] = []
        self._fwd: tuple[Any, Any, Any] | None = None

    @property
    def monitor(self) -> NoiseMonitor | None:
        """The :class:`NoiseMonitor` (from the first training step on)."""
        return None if self.tap is None else self.tap.monitor

    def state(self) -> dict[str, Any]:
        tap_state = self.tap.state_dict() if self.tap is not None else self.restored_state
        return {"args": {"every": self.every, "beta": self.beta, "prefix": self.prefix},
                "attributes": {"restored_state": tap_state}}

    # The Trainer restores stateful callbacks by building a new instance after on_train_begin,
    # so everything is set up lazily at the first step.
    def _setup(self, args: TrainingArguments, state: Any, model: torch.nn.Module) -> None:
        self._accum = args.gradient_accumulation_steps
        if self.restored_state is None:
            # The Trainer rebuilds stateful callbacks only with restore_callback_states_from_checkpoint
            # (off by default), but always reloads the TrainerState that holds our saved state.
            saved = (getattr(state, "stateful_callbacks", None) or {}).get(type(self).__name__)
            saved = saved[0] if isinstance(saved, list) and saved else saved
            if isinstance(saved, dict):
                self.restored_state = saved.get("attributes", {}).get("restored_state")
        self.tap = MonitorTap(NoiseMonitor(model, mode="accumulation", beta=self.beta, every=self.every))
        if self.restored_state:
            self.tap.load_state_dict(self.restored_state)
        self.restored_state = None
        self._shift = _causal_lm(model)
        self._handles = [model.register_forward_pre_hook(self._pre_forward, with_kwargs=True),
                         model.register_forward_hook(self._post_forward, with_kwargs=True)]

    def _pre_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self._fwd = None
        if not (module.training and torch.is_grad_enabled()):
            return
        labels = kwargs.get("shift_labels")
        if labels is None:
            labels = kwargs.get("labels")
            if labels is not None and self._shift:
                labels = labels[..., 1:]
        if isinstance(labels, torch.Tensor):
            count: Any = labels.ne(-100).sum()
            samples = int(labels.shape[0]) if labels.dim() else 1
        else:
            first = next((v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)), None)
            if first is None:
                return
            count = samples = int(first.shape[0]) if first.dim() else 1
        n_items = kwargs.get("num_items_in_batch")
        # The model's loss: sum / num_items_in_batch when the Trainer passes it, else a mean.
        unit_scale = 1.0 / (n_items if n_items is not None else count)
        self._fwd = (count, unit_scale, samples)

    def _post_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        if self._fwd is None or self.tap is None:
            return
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if loss is None and isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor) \
                and output[0].dim() == 0:
            loss = output[0]
        if not isinstance(loss, torch.Tensor):
            return
        from accelerate.state import GradientState

        count, unit_scale, samples = self._fwd
        self._fwd = None
        # The Trainer sets sync_gradients before the forward of the last micro-batch of a step.
        self.tap.micro_batch(loss, count=count, unit_scale=unit_scale, samples=samples,
                             last=GradientState().sync_gradients)

    def on_step_begin(self, args: TrainingArguments, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        if self.tap is None:
            self._setup(args, state, model)
        elif args.gradient_accumulation_steps != self._accum:
            raise ValueError(f"gradient_accumulation_steps changed from {self._accum} to {args.gradient_accumulation_steps} "
                             "during a Trainer run; the Trainer cannot change its batch mid-run (see docs/integrations.md)")

    def on_step_end(self, args: TrainingArguments, state: Any, control: Any, **kw: Any) -> None:
        if self.tap is not None and self.tap.in_step:
            self.tap.abandon()  # the step's last backward was not seen: no reading rather than a mixed one

    def on_log(self, args: TrainingArguments, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kw: Any) -> None:
        if self.tap is None or logs is None or "loss" not in logs:
            return  # evaluation logs, or before the first step
        metrics = self.tap.metrics(self.prefix)
        logs.update(metrics)
        if metrics and state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)

    def on_train_end(self, args: TrainingArguments, state: Any, control: Any, **kw: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self.tap is not None:
            self.tap.monitor.flush()


def add_callback(trainer: Trainer, callback: TrainerCallback) -> None:
    """Add ``callback`` to ``trainer`` *before* its logging callbacks, so ``report_to`` backends see its metrics.

    ``Trainer(callbacks=[...])`` puts user callbacks after the reporting ones, which have already
    sent a log by the time a later callback adds to it; the Trainer also re-appends callbacks whose
    state it restores from a checkpoint, so this moves them to the front again after that.
    """
    trainer.callback_handler.callbacks.insert(0, callback)
    load = trainer._load_callback_state

    def load_and_reorder() -> None:
        load()
        cbs = trainer.callback_handler.callbacks
        mine = [c for c in cbs if type(c) is type(callback)]
        trainer.callback_handler.callbacks = mine + [c for c in cbs if type(c) is not type(callback)]

    trainer._load_callback_state = load_and_reorder  # type: ignore[method-assign]
