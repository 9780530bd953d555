"""A batch-size schedule inside one Hugging Face ``Trainer.train()`` (``pip install 'bigbatch[hf]'``).

:class:`BatchScheduleTrainer` is a ``transformers.Trainer`` whose global batch follows a bigbatch
batch schedule (``"0:16,2000:32,6000:64"``: batch 16 from 0 samples, 32 from 2000, 64 from
6000; the file ``bigbatch plan --write-schedule`` writes, or a :class:`ScheduleController`)::

    trainer = BatchScheduleTrainer(model=model, args=args, train_dataset=ds, data_collator=collator,
                                   batch_schedule="0:16,2000:32,6000:64", lr_schedule=recipe, rule="sqrt")
    trainer.train()

How: one item of the training DataLoader is one *optimizer step*. A batch sampler draws, for
step t, the next ``B_t`` indices of a stream of seeded permutations of the data (a fresh one per
epoch, so every example is seen once per epoch whatever the batch; a batch may straddle two
epochs) and gives each process its ``B_t / world_size`` share; :meth:`training_step` cuts that
share into micro-batches of ``per_device_train_batch_size`` and back-propagates them with DDP's
gradient sync on the last one only. The Trainer thus counts one of its steps per optimizer step
(``global_step``), counts ``num_items_in_batch`` over the whole step (all ranks), and logs the
loss of the step. Because the batch is a pure function of the samples seen, a run resumed from
any checkpoint replays the sampler to exactly the same step (the Trainer's own batch skipping).

The accounting the Trainer would get wrong is replaced: the LR follows ``lr_schedule`` in
samples times the scaling ``rule`` at the running batch (:class:`BatchScheduleLR`, restored from
the checkpoint); the logged ``epoch`` is samples seen / dataset size; the number of steps comes
from the schedule (``max_steps``, or ``num_train_epochs`` × the data set).

Refused with a one-line error (never run with a wrong batch): ``gradient_accumulation_steps`` ≠
1 (the schedule sets the micro-batches), a batch not a multiple of ``per_device_train_batch_size
× world_size``, an adaptive controller (its decisions depend on measurements, which a resumed
run cannot replay), an ``IterableDataset``, ``ignore_data_skip``, ``group_by_length``,
``auto_find_batch_size``, DeepSpeed, ``DataParallel`` (several GPUs in one process), HF's warmup
arguments, and a scheduler passed in ``optimizers``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import torch

try:
    from transformers import Trainer, TrainerCallback
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(f"bigbatch.integrations.hf_schedule needs transformers: pip install 'bigbatch[hf]' ({e})") from e

from bigbatch.adaptive.base import BatchSizeController
from bigbatch.adaptive.schedule import ScheduleController, check_batch_schedule, load_batch_schedule
from bigbatch.recipe import Recipe
from bigbatch.rules import LR_ONLY_RULES
from bigbatch.scaling import lr_factor
from bigbatch.schedules import SampleLR, Schedule
from bigbatch.workloads.base import EpochSampler

__all__ = ["BatchScheduleTrainer", "BatchScheduleLR", "ScheduleBatchSampler", "batch_at"]



def batch_at(schedule: Sequence[tuple[int, int]], samples: float) -> int:
    """The batch of the last threshold ≤ ``samples`` (the threshold form's meaning)."""
    batch = schedule[0][1]
    for s, b in schedule:
        if samples >= s:
            batch = b
        else:
            break
    return batch


def _pairs(batch_schedule: Any) -> list[tuple[int, int]]:
    if isinstance(batch_schedule, ScheduleController):
        return [(int(s), int(b)) for s, b in batch_schedule.schedule]
    if isinstance(batch_schedule, BatchSizeController):
        raise ValueError(
            f"batch_schedule: an adaptive controller ({type(batch_schedule).__name__}) cannot drive a Trainer run: its "
            "batch depends on measurements a resumed run cannot replay; give a schedule (\"0:16,2000:32\", a file, or "
            "a ScheduleController), or use the Lightning BatchSizeCallback (docs/integrations.md)")
    if isinstance(batch_schedule, str):
        return load_batch_schedule(batch_schedule)
    return check_batch_schedule(batch_schedule)


class ScheduleBatchSampler(torch.utils.data.Sampler):
    """Per optimizer step, this process's share of the step's global batch (a list of indices).

    Step t takes the next ``B_t = batch_at(schedule, samples before t)`` indices of
    :class:`~bigbatch.workloads.base.EpochSampler`'s stream (a seeded permutation per epoch) and
    yields the ``rank``-th of ``world_size`` equal contiguous slices. ``len`` is the number of steps.
    """

    def __init__(self, dataset_size: int, schedule: Sequence[tuple[int, int]], steps: int, *, seed: int,
                 rank: int = 0, world_size: int = 1) -> None:
        self.dataset_size, self.schedule, self.steps = int(dataset_size), list(schedule), int(steps)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.batches = []
        samples = 0
        for _ in range(self.steps):
            b = batch_at(self.schedule, samples)
            self.batches.append(b)
            samples += b

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        stream = EpochSampler(self.dataset_size, self.seed)
        for b in self.batches:
            idx = stream.next(b)
            share = b // self.world_size
            yield idx[self.rank * share:(self.rank + 1) * share].tolist()

    def samples_after(self, steps: int) -> int:
        """Global samples seen after ``steps`` optimizer steps."""
        return sum(self.batches[:steps])


class BatchScheduleLR(SampleLR):
    """The LR of a batch schedule: ``schedule(samples) × rule factor(B(samples) / base_batch)``.

    ``step()`` (the Trainer calls it once per optimizer step) adds the batch the step just ran
    — ``batch_at(batch_schedule, samples)``, a pure function of the samples seen — so the state
    to restore is the samples counter (in the Trainer's ``scheduler.pt``).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: Schedule, batch_schedule: Sequence[tuple[int, int]],
                 *, rule: str, base_batch: int) -> None:
        self.batch_schedule, self.rule, self.base_batch = list(batch_schedule), rule, int(base_batch)
        super().__init__(optimizer, schedule)

    @property
    def batch(self) -> int:
        """The global batch of the next optimizer step."""
        return batch_at(self.batch_schedule, self.samples)

    def get_lr(self) -> list[float]:
        f = self.schedule(self.samples) / self.schedule.peak_lr * lr_factor(self.rule, self.batch / self.base_batch)
        return [float(base) * f for base in self.base_lrs]

    def step(self, samples: float | None = None) -> None:  # type: ignore[override]
        if getattr(self, "_ready", False) and samples is None:
            samples = self.samples + self.batch
        super().step(samples)


class _EpochFromSamples(TrainerCallback):
    """Sets ``state.epoch`` to samples seen / dataset size before the Trainer logs or saves it."""

    def __init__(self, trainer: "BatchScheduleTrainer") -> None:
        self.trainer = trainer

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        t = self.trainer
        if t._bb_sampler is not None:
            state.epoch = t._bb_sampler.samples_after(state.global_step) / t._bb_sampler.dataset_size


class BatchScheduleTrainer(Trainer):
    """A ``transformers.Trainer`` whose global batch follows ``batch_schedule`` within one ``train()`` (module doc).

    Args (besides the Trainer's own):
        batch_schedule: the threshold form in samples (``"0:16,2000:32"``), a file holding it, a list
            of ``(samples, batch)`` pairs, or a :class:`~bigbatch.adaptive.ScheduleController`. Every
            batch must be a multiple of ``per_device_train_batch_size × world_size``.
        lr_schedule: a :class:`~bigbatch.schedules.Schedule` in samples (or a :class:`Recipe` with
            ``dataset_size``) tuned at ``base_batch``; default a constant ``args.learning_rate``.
        rule: how the LR follows the batch (``linear``, ``sqrt``, ``none``), relative to ``base_batch``.
        base_batch: the batch the LR was tuned at (default: the schedule's first batch).
    """

    def __init__(self, *args: Any, batch_schedule: Any, lr_schedule: Schedule | Recipe | None = None,
                 rule: str = "sqrt", base_batch: int | None = None, **kwargs: Any) -> None:
        self._bb_schedule = _pairs(batch_schedule)
        if rule not in LR_ONLY_RULES:
            raise ValueError(f"rule must be one of {', '.join(LR_ONLY_RULES)} (LR-only rules apply mid-run), got {rule!r}")
        self._bb_rule = rule
        self._bb_base = int(base_batch) if base_batch is not None else self._bb_schedule[0][1]
        if self._bb_base <= 0:
            raise ValueError(f"base_batch must be > 0, got {base_batch}")
        self._bb_lr_schedule = lr_schedule.to_schedule() if isinstance(lr_schedule, Recipe) else lr_schedule
        if self._bb_lr_schedule is not None and not isinstance(self._bb_lr_schedule, Schedule):
            raise ValueError(f"lr_schedule must be a bigbatch Schedule or Recipe, got {type(lr_schedule).__name__}")
        self._bb_sampler: ScheduleBatchSampler | None = None
        opts = kwargs.get("optimizers")
        if opts is not None and len(opts) == 2 and opts[1] is not None and not isinstance(opts[1], BatchScheduleLR):
            raise ValueError("optimizers: pass (optimizer, None): the LR must follow the batch schedule, so "
                             "BatchScheduleTrainer builds its scheduler from lr_schedule (in samples)")
        super().__init__(*args, **kwargs)
        self._bb_check_args()
        if hasattr(self, "_loss_shifts_labels") and self.model is not None:
            # The Trainer decides from config.loss_type whether num_items_in_batch counts shifted labels; a
            # model with loss_type=None still computes the causal LM loss (transformers falls back to it),
            # so count from the loss the model computes: else every step's loss is divided by too many tokens.
            from bigbatch.integrations.hf import _causal_lm

            self._loss_shifts_labels = _causal_lm(self.accelerator.unwrap_model(self.model))
        # First, so that every other callback, the logs and the checkpoints see the epoch in samples.
        self.callback_handler.callbacks.insert(0, _EpochFromSamples(self))

    # -- checks ------------------------------------------------------------------------------

    def _bb_check_args(self) -> None:
        a = self.args
        bad = [
            (a.gradient_accumulation_steps != 1, f"gradient_accumulation_steps={a.gradient_accumulation_steps}: must "
             "be 1 (the batch schedule sets the micro-batches per step: batch / (per_device_train_batch_size × world size))"),
            (a.ignore_data_skip, "ignore_data_skip=True: a resumed run must replay the sampler to its step"),
            (getattr(a, "group_by_length", False), "group_by_length=True: the schedule's sampler orders the data"),
            (a.auto_find_batch_size, "auto_find_batch_size=True: the schedule fixes the batch"),
            (getattr(a, "deepspeed", None) is not None, "deepspeed: DeepSpeed runs its own accumulation"),
            (a.n_gpu > 1, f"{a.n_gpu} GPUs in one process (DataParallel): launch one process per GPU (torchrun)"),
            ((a.warmup_steps or 0) > 0 or (getattr(a, "warmup_ratio", 0) or 0) > 0,
             "warmup_steps/warmup_ratio: give the warmup in samples in lr_schedule (Schedule(warmup_samples=...))"),
        ]
        for cond, why in bad:
            if cond:
                raise ValueError(f"BatchScheduleTrainer: {why}")
        unit = a.per_device_train_batch_size * a.world_size
        for s, b in self._bb_schedule:
            if b % unit:
                raise ValueError(f"batch_schedule: batch {b} (from {s} samples) is not a multiple of "
                                 f"per_device_train_batch_size × world size = {a.per_device_train_batch_size} × "
                                 f"{a.world_size} = {unit}")

    # -- data --------------------------------------------------------------------------------

    def _bb_steps(self, n: int) -> int:
        if self.args.max_steps > 0:
            return int(self.args.max_steps)
        total = math.ceil(self.args.num_train_epochs * n)
        steps, samples = 0, 0
        while samples < total:
            samples += batch_at(self._bb_schedule, samples)
            steps += 1
        return steps

    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        ds = self.train_dataset
        if ds is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        if isinstance(ds, torch.utils.data.IterableDataset) or not hasattr(ds, "__len__"):
            raise ValueError("BatchScheduleTrainer: train_dataset is an IterableDataset: the schedule's sampler draws "
                             "examples by index (a seeded permutation per epoch); give a map-style dataset")
        collator = self.data_collator
        try:
            import datasets

            is_hf = isinstance(ds, datasets.Dataset)
        except ImportError:
            is_hf = False
        if is_hf:
            ds = self._remove_unused_columns(ds, description="training")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="training")
        a = self.args
        seed = a.data_seed if a.data_seed is not None else a.seed
        self._bb_sampler = ScheduleBatchSampler(len(ds), self._bb_schedule, self._bb_steps(len(ds)), seed=seed,
                                                rank=a.process_index, world_size=a.world_size)
        # Not accelerator.prepare()d: the sampler is rank-aware already (accelerate's BatchSamplerShard would
        # hand out whole steps round-robin); training_step moves the inputs to the device.
        return torch.utils.data.DataLoader(ds, batch_sampler=self._bb_sampler, collate_fn=collator,
                                           num_workers=a.dataloader_num_workers, pin_memory=a.dataloader_pin_memory)

    def set_initial_training_values(self, args: Any, dataloader: Any) -> tuple:
        steps = len(self._bb_sampler)  # type: ignore[arg-type]
        n = self._bb_sampler.dataset_size  # type: ignore[union-attr]
        # One Trainer "epoch" of `steps` items (one item = one optimizer step); data epochs are counted in samples.
        return 1, steps, n, self._bb_sampler.samples_after(steps), self._bb_schedule[0][1], steps, steps  # type: ignore[union-attr]

    # -- optimizer step ----------------------------------------------------------------------

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None) -> Any:
        if self.lr_scheduler is None:
            opt = self.optimizer if optimizer is None else optimizer
            sched = self._bb_lr_schedule or Schedule(peak_lr=self.args.learning_rate)
            self.lr_scheduler = BatchScheduleLR(opt, sched, self._bb_schedule, rule=self._bb_rule, base_batch=self._bb_base)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        """This process's share of one optimizer step, as micro-batches of ``per_device_train_batch_size``."""
        micro = self.args.per_device_train_batch_size
        n = next(int(v.shape[0]) for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim())
        if n % micro:
            raise ValueError(f"BatchScheduleTrainer: a step's share of {n} examples is not a multiple of "
                             f"per_device_train_batch_size {micro}")
        k = n // micro
        self.current_gradient_accumulation_steps = k  # used when the loss is a per-micro-batch mean
        gs = self.accelerator.gradient_state
        total = None
        for i in range(k):
            chunk = {key: (v[i * micro:(i + 1) * micro] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n
                           else v) for key, v in inputs.items()}
            last = i == k - 1
            gs._set_sync_gradients(last)  # what callbacks (NoiseScaleCallback) read as "last micro-batch"
            ctx = contextlib.nullcontext() if last or self.args.world_size == 1 else self.accelerator.no_sync(model)
            with ctx:
                loss = super().training_step(model, chunk, num_items_in_batch)
            total = loss if total is None else total + loss
        self.current_gradient_accumulation_steps = 1
        return total  # type: ignore[return-value]
