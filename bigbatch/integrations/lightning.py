"""Lightning adapters: bigbatch optimizers, the noise scale as a logged metric, an adaptive batch.

* :func:`configure_optimizers` — LARS/LAMB/MERIT (any bigbatch optimizer) with bigbatch's
  ``param_groups`` and an optional :class:`~bigbatch.schedules.SampleLR` stepped per optimizer
  step by the global batch: ``return configure_optimizers(self, "lamb", lr=..., ...)``.
* :class:`NoiseScaleCallback` — B_simple, |G|² and tr Σ from the micro-batches of gradient
  accumulation (and the ranks under DDP), logged with ``pl_module.log`` every ``every`` steps.
* :class:`BatchSizeCallback` — a bigbatch controller drives ``trainer.accumulate_grad_batches``
  mid-epoch, with the LR moved by a scaling rule.

Needs ``pip install bigbatch[lightning]`` (``lightning>=2.2``).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch

try:
    from lightning.pytorch import Callback, LightningModule, Trainer
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(f"bigbatch.integrations.lightning needs lightning: pip install 'bigbatch[lightning]' ({e})") from e

from bigbatch._checks import check_choice, check_int_positive
from bigbatch.adaptive.base import BatchSizeController, ControllerState
from bigbatch.integrations.common import LR_ONLY_RULES, MonitorTap, leading_dim, sample_lr_scheduler, scale_lrs
from bigbatch.noise import NoiseMonitor
from bigbatch.optim import create_optimizer
from bigbatch.recipe import Recipe
from bigbatch.schedules import SampleLR, Schedule

__all__ = ["configure_optimizers", "NoiseScaleCallback", "BatchSizeCallback"]


def configure_optimizers(module: LightningModule, optimizer: str = "lamb", *, lr: float, weight_decay: float = 0.0,
                         schedule: Schedule | Recipe | None = None, global_batch: int | None = None,
                         **optimizer_kwargs: Any) -> Any:
    """What ``LightningModule.configure_optimizers`` returns, in one line.

    ``optimizer``: a bigbatch optimizer name (lars, lamb, merit, sgd, adamw, ...); the layer-wise
    ones get :func:`bigbatch.optim.param_groups` (no decay or adaptation on biases and norms).
    With ``schedule``, a :class:`SampleLR` stepped after every optimizer step by
    ``global_batch`` samples (per-device batch × ``trainer.accumulate_grad_batches`` × world
    size; :class:`BatchSizeCallback` keeps it current when the batch changes).
    """
    opt = create_optimizer(optimizer, module, lr=lr, weight_decay=weight_decay, **optimizer_kwargs)
    if schedule is None:
        return opt
    if global_batch is None:
        raise ValueError("global_batch must be given with schedule= (per-device batch x accumulation x world size)")
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sample_lr_scheduler(opt, schedule, global_batch=global_batch),
                                               "interval": "step", "frequency": 1}}


class NoiseScaleCallback(Callback):
    """Logs the gradient noise scale measured from the micro-batches of gradient accumulation.

    Each micro-batch's gradient is read by tensor hooks during its backward and the step's
    accumulated gradient at the end of the last backward (after DDP's all-reduce), so clipping
    and AMP unscaling, which come later, do not affect it; the GradScaler's scale (read from the
    scaler) and Lightning's division by ``accumulate_grad_batches`` go into the monitor's
    ``loss_scale``. Logs
    ``{prefix}b_simple``, ``{prefix}grad_sqnorm`` and ``{prefix}trace_sigma`` (EMA estimates in
    ``count_fn`` units, McCandlish et al. 2018, App. A.1) with ``pl_module.log`` on every
    measured step. Needs ``accumulate_grad_batches >= 2`` or several processes.

    Args:
        every: measure one optimizer step in ``every``.
        beta: EMA factor per reading.
        count_fn: loss units in a batch (default: its leading dimension, i.e. examples).
        reduction: how ``training_step``'s loss is normalised: ``"mean"`` over ``count_fn``
            units (the default) or ``"sum"``.
        prefix: metric name prefix.
    """

    def __init__(self, *, every: int = 1, beta: float = 0.99, count_fn: Callable[[Any], Any] | None = None,
                 reduction: str = "mean", prefix: str = "noise/") -> None:
        self.every = check_int_positive("every", every)
        self.beta = beta
        self.count_fn = count_fn or leading_dim
        self.reduction = check_choice("reduction", reduction, ("mean", "sum"))
        self.prefix = prefix
        self.tap: MonitorTap | None = None
        self._pending_state: dict[str, Any] | None = None
        self._count: Any = None

    @property
    def monitor(self) -> NoiseMonitor | None:
        """The :class:`NoiseMonitor` (after ``setup``)."""
        return None if self.tap is None else self.tap.monitor

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or self.tap is not None:
            return
        if not pl_module.automatic_optimization:
            raise ValueError("NoiseScaleCallback needs automatic optimization (it follows Lightning's accumulation); "
                             "with manual optimization drive bigbatch.noise.NoiseMonitor in training_step")
        # Accumulation mode on the unwrapped module works under DDP too: the micro-batch hooks
        # see each rank's local gradient, .grad at the end of the step the reduced one.
        self.tap = MonitorTap(NoiseMonitor(pl_module, mode="accumulation", beta=self.beta, every=self.every))
        if self._pending_state is not None:
            self.tap.load_state_dict(self._pending_state)
            self._pending_state = None

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._count = self.count_fn(batch)

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        if self.tap is None or not pl_module.automatic_optimization:
            return
        # ``loss`` is training_step's loss divided by accumulate_grad_batches and, under 16-mixed,
        # already multiplied by the GradScaler's scale (MixedPrecision.pre_backward scales before
        # it calls this hook), so the scale is read from the scaler; the hook on ``loss`` adds any
        # factor applied after this point.
        per_unit = 1.0 if self.reduction == "sum" else 1.0 / self._count
        unit_scale: Any = per_unit / trainer.accumulate_grad_batches
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            scale = getattr(scaler, "_scale", None)  # the device tensor: no host sync per micro-batch
            unit_scale = unit_scale * (scale.detach().reshape(()) if isinstance(scale, torch.Tensor) else scaler.get_scale())
        last = not trainer.fit_loop._should_accumulate()
        self.tap.micro_batch(loss, count=self._count, unit_scale=unit_scale, last=last)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if self.tap is not None and self.tap.in_step:
            self.tap.abandon()  # e.g. the last micro-batch skipped its backward

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.tap is not None:
            metrics = self.tap.metrics(self.prefix)
            if metrics:
                pl_module.log_dict(metrics, on_step=True, on_epoch=False, sync_dist=False)

    def state_dict(self) -> dict[str, Any]:
        if self.tap is None:
            return dict(self._pending_state or {})
        return self.tap.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.tap is None:
            self._pending_state = dict(state_dict)
        else:
            self.tap.load_state_dict(state_dict)


class BatchSizeCallback(Callback):
    """Drives ``trainer.accumulate_grad_batches`` from a bigbatch batch-size controller, mid-epoch.

    After every optimizer step the controller gets the samples seen (global batches summed, world
    size included) and the noise readings of ``noise`` (a :class:`NoiseScaleCallback`, for the
    noise and normtest controllers) and returns the next global batch, which must be a multiple
    of ``micro_batch_size × world size`` (give the controller that ``granularity``). The new
    accumulation takes effect from the next batch, even mid-epoch: Lightning's own test for the
    end of an accumulation window (``batches in epoch % accumulate_grad_batches``) would cut the
    first window after a change short, so the callback counts windows from the last optimizer
    step instead (it replaces two methods of the epoch loop; checked on lightning 2.2-2.6). The
    LR of every param group (and a scheduler's base LRs; a :class:`SampleLR`'s step) moves by
    ``rule`` (``linear``, ``sqrt`` or ``none``) with each change, starting from the batch the
    Trainer was configured with (``micro_batch_size × accumulate_grad_batches × world size``),
    which is the batch the optimizer's LR is taken to be for. Automatic optimization only.

    Args:
        controller: any :class:`BatchSizeController` (``create_controller(...)``).
        micro_batch_size: examples per batch of the train dataloader on each process.
        rule: the LR scaling rule applied at each change.
        noise: the run's :class:`NoiseScaleCallback`, when the controller reads the noise scale.
    """

    def __init__(self, controller: BatchSizeController, *, micro_batch_size: int, rule: str = "none",
                 noise: NoiseScaleCallback | None = None) -> None:
        if not isinstance(controller, BatchSizeController):
            raise ValueError(f"controller must be a bigbatch BatchSizeController, got {type(controller).__name__}")
        self.controller = controller
        self.micro_batch_size = check_int_positive("micro_batch_size", micro_batch_size)
        self.rule = check_choice("rule", rule, LR_ONLY_RULES)
        self.noise = noise
        self.samples = 0
        self.batch_size: int | None = None
        self._window_start = 0
        self._window_examples = 0
        self._last_global_step = 0
        self._world = 1
        self.history: list[tuple[int, int, int]] = []  # (step, samples, global batch) at each change

    # -- the epoch loop's accumulation test, counted from the last step ------------------------
    def _patch(self, trainer: Trainer) -> None:
        loop = trainer.fit_loop.epoch_loop
        auto = getattr(loop, "automatic_optimization", None)
        if not (hasattr(loop, "_accumulated_batches_reached") and hasattr(auto, "_make_zero_grad_fn")
                and hasattr(loop, "batch_progress")):
            raise RuntimeError("BatchSizeCallback: this lightning version's epoch loop has no "
                               "_accumulated_batches_reached/_make_zero_grad_fn (supported: lightning 2.2-2.6)")
        make_zero_grad = type(auto)._make_zero_grad_fn

        def reached() -> bool:
            return (loop.batch_progress.current.ready - self._window_start) % trainer.accumulate_grad_batches == 0

        def zero_grad_fn(batch_idx: int, optimizer: Any) -> Any:
            # Lightning zeroes at batch_idx % accumulate == 0: give it the index within the window.
            return make_zero_grad(auto, batch_idx - self._window_start, optimizer)

        loop._accumulated_batches_reached = reached
        auto._make_zero_grad_fn = zero_grad_fn

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise ValueError("BatchSizeCallback needs automatic optimization (it sets accumulate_grad_batches)")
        self._world = trainer.world_size
        g = self.micro_batch_size * self._world
        if self.controller.granularity % g:
            raise ValueError(f"controller granularity must be a multiple of micro_batch_size x world size = {g}, "
                             f"got {self.controller.granularity}")
        if getattr(self.controller, "needs_noise", False) and self.noise is None:
            raise ValueError(f"controller {self.controller.name!r} reads the noise scale: pass noise=NoiseScaleCallback(...)")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._patch(trainer)
        self._last_global_step = trainer.global_step
        current = self.micro_batch_size * trainer.accumulate_grad_batches * self._world
        if self.batch_size is None:  # fresh run: the controller's starting batch
            self.batch_size = current
            self._decide(trainer)
        else:  # resumed: restore the accumulation the run had reached
            trainer.accumulate_grad_batches = self.batch_size // (self.micro_batch_size * self._world)
        # The scheduler advances by the batch the Trainer really runs from the first step on, whatever
        # global_batch it was built with (e.g. micro x --accum while the controller starts at accumulation 1).
        sched = trainer.lr_scheduler_configs[0].scheduler if trainer.lr_scheduler_configs else None
        if isinstance(sched, SampleLR) and sched.batch_size != self.batch_size:
            warnings.warn(f"BatchSizeCallback: the SampleLR was built for a global batch of {sched.batch_size}, the "
                          f"Trainer runs {self.batch_size} from the first step; the scheduler now advances by "
                          f"{self.batch_size}", RuntimeWarning, stacklevel=2)
            sched.batch_size = self.batch_size

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._window_start = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        self._window_examples = 0

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._window_examples += leading_dim(batch)
        if trainer.global_step == self._last_global_step:
            return  # still accumulating
        self._last_global_step = trainer.global_step
        self.samples += self._window_examples * self._world  # equal shards per rank (DistributedSampler)
        self._window_examples = 0
        self._window_start = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        self._decide(trainer)

    def _decide(self, trainer: Trainer) -> None:
        assert self.batch_size is not None
        est = None
        if self.noise is not None and self.noise.monitor is not None:
            self.noise.monitor.flush()
            est = self.noise.monitor.estimator
        state = ControllerState.from_estimator(est, samples=self.samples, batch_size=self.batch_size,
                                               step=trainer.global_step)
        new = self.controller.next_batch_size(state)
        g = self.micro_batch_size * self._world
        if new % g:
            raise ValueError(f"controller asked for global batch {new}, not a multiple of micro_batch_size x world "
                             f"size = {g}")
        if new != self.batch_size:
            sched = trainer.lr_scheduler_configs[0].scheduler if trainer.lr_scheduler_configs else None
            for opt in trainer.optimizers:
                scale_lrs(opt, sched, self.rule, self.batch_size, new)
            self.history.append((trainer.global_step, self.samples, new))
            self.batch_size = new
        trainer.accumulate_grad_batches = new // g

    def state_dict(self) -> dict[str, Any]:
        return {"controller": self.controller.state_dict(), "samples": self.samples, "batch_size": self.batch_size,
                "history": [list(h) for h in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.controller.load_state_dict(state_dict["controller"])
        self.samples = int(state_dict["samples"])
        self.batch_size = None if state_dict["batch_size"] is None else int(state_dict["batch_size"])
        self.history = [tuple(h) for h in state_dict["history"]]  # type: ignore[misc]
