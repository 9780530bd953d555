"""A run's counters (``RunState``) and the checkpoint file's schema, with its format version.

A checkpoint is one ``torch.save`` of a dict::

    {"format_version": 1, "state": RunState fields, "model", "optimizer", "sampler", "rng",
     "controller", "ema", "noise", "config", "step", "samples"}

``step`` and ``samples`` repeat ``state``'s for readers that only want to know where it is
(``bigbatch average``). Files written before the version existed (no ``format_version``) hold
the same layout and are read as version 0; any other version is refused with one line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = ["FORMAT_VERSION", "RunState", "Checkpoint", "RESUMABLE_FIELDS", "check_resume_config"]

#: The checkpoint layout this trainer writes. Version 0: the same layout without the key.
FORMAT_VERSION = 1
_READABLE = (0, 1)

#: TrainConfig fields that may differ between a checkpoint and the run resuming it (docs/training.md).
#: They say where, how long and how to report; none changes what one optimizer step computes.
RESUMABLE_FIELDS = (
    "out", "resume", "overwrite", "progress", "device", "nproc", "max_restarts", "nnodes", "node_rank", "rdzv_endpoint", "fsdp", "compile",
    "max_steps", "budget_samples", "budget_epochs", "target", "eval_every_samples",
    "checkpoint_every_samples", "keep_checkpoints", "log_every_steps", "average_last", "target_resolution",
    "record_targets", "stall_fraction",
)


@dataclass(slots=True)
class RunState:
    """Where a run is: counters, evaluation results and the noise log (saved in every checkpoint)."""

    step: int = 0
    samples: int = 0
    next_eval: int = 0
    next_ckpt: int | None = None
    best_metric: float | None = None
    last_metric: float | None = None
    ema_metric: float | None = None
    steps_to_target: int | None = None
    samples_to_target: int | None = None
    b_simple_at_target: float | None = None
    wall_before: float = 0.0
    batch_size: int = 0
    batch_changes: int = 0
    b_simple_log: list[float] = field(default_factory=list)
    initial_metric: float | None = None
    """The evaluation at step 0 (what ``stall_fraction`` compares with)."""
    last_eval_step: int | None = None
    last_eval_samples: int | None = None
    crossings: list[dict[str, Any]] = field(default_factory=list)
    """First crossing of each target (``target`` and ``record_targets``): ``target``, ``steps``,
    ``samples``, ``resolution`` (gap to the evaluation before it, as a fraction of ``samples``),
    ``resolution_steps``, ``b_simple_at_target``."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "checkpoint") -> "RunState":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{where}: unknown run state field(s) {', '.join(unknown)}; written by another bigbatch version?")
        return cls(**{k: (list(v) if k in ("b_simple_log", "crossings") else v) for k, v in d.items()})


@dataclass(slots=True)
class Checkpoint:
    """Everything a resumed run needs, as written to ``ckpt_<step>.pt``."""

    state: RunState
    model: dict[str, Any]
    optimizer: dict[str, Any]
    sampler: dict[str, Any]
    rng: dict[str, Any]
    config: dict[str, Any]
    controller: dict[str, Any] | None = None
    ema: dict[str, Any] | None = None
    noise: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        blob = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        blob["state"] = self.state.to_dict()
        return {"format_version": FORMAT_VERSION, **blob, "step": self.state.step, "samples": self.state.samples}

    @classmethod
    def from_dict(cls, blob: Any, where: str = "checkpoint") -> "Checkpoint":
        """Validate a loaded file (version and keys); a mismatch is one ``ValueError`` line naming ``where``."""
        if not isinstance(blob, Mapping):
            raise ValueError(f"{where} is not a bigbatch training checkpoint (a {type(blob).__name__}, not a dict)")
        version = blob.get("format_version", 0)
        if version not in _READABLE:
            raise ValueError(f"{where} has checkpoint format version {version!r}; this bigbatch reads versions "
                             f"{', '.join(map(str, _READABLE))} (use the bigbatch that wrote it)")
        required = ("state", "model", "optimizer", "sampler", "rng", "config")
        missing = [k for k in required if k not in blob]
        if missing:
            raise ValueError(f"{where} is not a bigbatch training checkpoint: missing {', '.join(missing)}")
        return cls(state=RunState.from_dict(blob["state"], where), model=blob["model"], optimizer=blob["optimizer"],
                   sampler=blob["sampler"], rng=blob["rng"], config=dict(blob["config"]),
                   controller=blob.get("controller"), ema=blob.get("ema"), noise=blob.get("noise"))


def check_resume_config(saved: Mapping[str, Any], current: Mapping[str, Any], defaults: Mapping[str, Any]) -> None:
    """Refuse a resume whose config differs from the checkpoint's outside ``RESUMABLE_FIELDS``.

    A field the checkpoint lacks (written before the field existed) counts as its default.
    """
    for name, now in current.items():
        if name in RESUMABLE_FIELDS:
            continue
        was = saved.get(name, defaults.get(name))
        if was != now:
            raise ValueError(f"resume: {name} was {was!r} in the checkpoint, now {now!r}; a resumed run keeps its "
                             "settings except budgets, targets, intervals and where it runs (docs/training.md lists "
                             "them); overwrite starts afresh instead")
