"""bigbatch with Hugging Face ``transformers.Trainer``: LAMB, a schedule in samples, the noise scale logged.

    python examples/hf_trainer.py                           # tiny GPT-2 on CPU, 10-30 s
    python examples/hf_trainer.py --gpu --bf16 --n-layer 12 --n-embd 768 --seq 1024 --steps 200
    python examples/hf_trainer.py ... --no-noise            # the same run without the callback

A GPT-2 built from a config (no download) learns a synthetic token stream. The recipe is rescaled
to the global batch (per-device batch × accumulation × world size), LAMB gets bigbatch's
param_groups, the LR follows the schedule in samples, and the noise callback logs B_simple, |G|²
and tr Σ (in tokens) from the accumulation micro-batches into the Trainer's logs.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from bigbatch.integrations import rescale_for_global_batch
from bigbatch.integrations.hf import NoiseScaleCallback, add_callback, optimizer_and_scheduler, trainer_global_batch
from bigbatch.scaling import Recipe


class Tokens(torch.utils.data.Dataset):
    """A learnable stream: each token is followed by its successor (mod 16) most of the time."""

    def __init__(self, n: int, seq: int, vocab: int) -> None:
        g = torch.Generator().manual_seed(0)
        start = torch.randint(0, 16, (n, 1), generator=g)
        jumps = (torch.rand(n, seq, generator=g) < 0.3).long() * torch.randint(0, 16, (n, seq), generator=g)
        self.ids = ((start + torch.arange(seq) + jumps.cumsum(1)) % 16) % vocab

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class StepTimer(TrainerCallback):
    """Wall time per optimizer step after ``skip`` warm-up steps (synchronised only at the two ends)."""

    def __init__(self, skip: int) -> None:
        self.skip, self.t0, self.n, self.per_step = skip, None, 0, math.nan

    def _sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.skip:
            self._sync()
            self.t0 = time.perf_counter()
        elif self.t0 is not None:
            self.n += 1

    def on_train_end(self, args, state, control, **kw):
        if self.t0 is not None and self.n:
            self._sync()
            self.per_step = (time.perf_counter() - self.t0) / self.n


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--per-device-batch", type=int, default=4)
    p.add_argument("--accum", type=int, default=4)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--n-layer", type=int, default=1)
    p.add_argument("--n-embd", type=int, default=32)
    p.add_argument("--every", type=int, default=1, help="measure the noise scale every N optimizer steps")
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--no-noise", action="store_true", help="run without the noise callback (overhead baseline)")
    p.add_argument("--output-dir", default="/tmp/bigbatch_hf_example")
    return p.parse_args(argv)


def run(a: argparse.Namespace) -> dict:
    """One training run; returns the step time (seconds), the recipe and the last noise reading logged."""
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=a.n_layer, n_embd=a.n_embd, n_head=max(1, a.n_embd // 64) if a.n_embd >= 64 else 2,
                     vocab_size=64 if a.n_embd < 256 else 50257, n_positions=a.seq, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg)
    args = TrainingArguments(output_dir=a.output_dir, per_device_train_batch_size=a.per_device_batch,
                             gradient_accumulation_steps=a.accum, max_steps=a.steps, logging_steps=5,
                             report_to=[], use_cpu=not a.gpu, bf16=a.bf16, save_strategy="no", max_grad_norm=1.0,
                             disable_tqdm=True, seed=0, dataloader_num_workers=0)
    batch = trainer_global_batch(args)
    data = Tokens(batch * a.steps, a.seq, cfg.vocab_size)
    tuned = Recipe(batch_size=16, lr=2e-3, optimizer="lamb", dataset_size=len(data), warmup_epochs=0.1,
                   budget_epochs=1.0, schedule="cosine", weight_decay=0.01)
    recipe = rescale_for_global_batch(tuned, per_device_batch=a.per_device_batch, accumulation=a.accum,
                                      world_size=args.world_size).recipe
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      optimizers=optimizer_and_scheduler(model, args, "lamb", schedule=recipe, lr=recipe.lr,
                                                         weight_decay=recipe.weight_decay))
    timer = StepTimer(skip=min(5, a.steps - 1))
    trainer.add_callback(timer)
    if not a.no_noise:
        add_callback(trainer, NoiseScaleCallback(every=a.every))
    trainer.train()
    logged = [h for h in trainer.state.log_history if "noise/b_simple" in h]
    return {"global_batch": batch, "lr": recipe.lr, "step_time": timer.per_step,
            "main_process": trainer.args.process_index == 0, "logged": logged[-1] if logged else None}


def main() -> None:
    r = run(parse_args())
    if r["main_process"]:
        print(f"global batch {r['global_batch']}, lr {r['lr']:.3g}, step time {r['step_time'] * 1e3:.1f} ms")
        if r["logged"]:
            last = r["logged"]
            print(f"b_simple (logged at step {last['step']}): {last['noise/b_simple']:.2f} tokens "
                  f"(|G|^2 {last['noise/grad_sqnorm']:.4g}, tr Sigma {last['noise/trace_sigma']:.4g})")


if __name__ == "__main__":
    main()
