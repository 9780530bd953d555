"""BatchScheduleTrainer: a batch schedule inside one real transformers.Trainer run (tiny GPT-2, CPU).

Checked against the schedule "0:16,2000:32,6000:64" with accumulation: the global batch and the LR
at every step, global_step, the logged epoch, every example once per epoch, one step's update
equal to the full-batch update with uneven token counts (num_items_in_batch over the whole step),
a resume from a mid-schedule checkpoint giving the same steps as the uninterrupted run, and the
same run on two gloo processes giving the same batches and weights."""

from __future__ import annotations

import math
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback, TrainingArguments  # noqa: E402

from bigbatch.integrations.hf_schedule import BatchScheduleTrainer, batch_at  # noqa: E402
from bigbatch.schedules import Schedule  # noqa: E402

SCHEDULE = "0:16,2000:32,6000:64"
PAIRS = [(0, 16), (2000, 32), (6000, 64)]
SEQ, N, LR = 8, 1000, 2e-3


def _model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=SEQ, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0))


class _Data(torch.utils.data.Dataset):
    """Rows of SEQ tokens; row i has i % 5 padded positions (labels -100): uneven token counts."""

    def __init__(self, n: int = N) -> None:
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, 8, (n, SEQ), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        labels = self.ids[i].clone()
        pad = i % 5
        if pad:
            labels[-pad:] = -100
        return {"input_ids": self.ids[i], "labels": labels, "idx": i}


class _Collate:
    """Stacks the rows and records which examples each process fetched, in order."""

    def __init__(self) -> None:
        self.seen: list[list[int]] = []

    def __call__(self, rows: list[dict]) -> dict:
        self.seen.append([r["idx"] for r in rows])
        return {"input_ids": torch.stack([r["input_ids"] for r in rows]), "labels": torch.stack([r["labels"] for r in rows])}


class _Record(TrainerCallback):
    def __init__(self) -> None:
        self.lrs: dict[int, float] = {}
        self.epochs: dict[int, float] = {}

    def on_step_begin(self, args, state, control, optimizer=None, **kw):
        self.lrs[state.global_step + 1] = optimizer.param_groups[0]["lr"]

    def on_step_end(self, args, state, control, **kw):
        self.epochs[state.global_step] = state.epoch


LR_SCHEDULE = Schedule(peak_lr=LR, warmup_samples=800, total_samples=7000, decay="cosine")


def _trainer(out, *, per_device=4, epochs=7, save_steps=0, world=1, lr_schedule=LR_SCHEDULE, **kw):
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=per_device, num_train_epochs=epochs,
                             learning_rate=LR, logging_steps=10, save_strategy="steps" if save_steps else "no",
                             save_steps=save_steps or 500, report_to=[], use_cpu=True, seed=3, remove_unused_columns=False,
                             disable_tqdm=True, ddp_backend="gloo" if world > 1 else None, **kw)
    collate, rec = _Collate(), _Record()
    tr = BatchScheduleTrainer(model=_model(), args=args, train_dataset=_Data(), data_collator=collate,
                              batch_schedule=SCHEDULE, lr_schedule=lr_schedule, rule="sqrt", callbacks=[rec])
    return tr, collate, rec


def _expected_steps(total: int) -> list[int]:
    out, s = [], 0
    while s < total:
        out.append(batch_at(PAIRS, s))
        s += out[-1]
    return out


def test_the_batch_lr_steps_epochs_and_every_example_once_per_epoch(tmp_path):
    tr, collate, rec = _trainer(tmp_path / "a")
    tr.train()
    want = _expected_steps(7 * N)
    assert len(want) == 125 + 125 + 16 and tr.state.global_step == len(want)
    assert [len(s) for s in collate.seen] == want  # one DataLoader item per optimizer step, the step's whole batch
    samples = 0
    for t, b in enumerate(want, start=1):
        expect = LR_SCHEDULE(samples) * math.sqrt(b / 16)
        assert rec.lrs[t] == pytest.approx(expect, rel=1e-9), t
        samples += b
        assert rec.epochs[t] == pytest.approx(samples / N)
    stream = [i for s in collate.seen for i in s]
    for e in range(7):
        assert sorted(stream[e * N:(e + 1) * N]) == list(range(N)), e  # every example once per epoch
    logged = [h for h in tr.state.log_history if "loss" in h]
    assert logged and all(math.isfinite(h["loss"]) for h in logged) and logged[-1]["epoch"] == pytest.approx(
        sum(want[:logged[-1]["step"]]) / N)


def test_one_step_equals_the_full_batch_update_with_uneven_token_counts(tmp_path):
    tr, collate, _ = _trainer(tmp_path / "one", max_steps=1, lr_schedule=Schedule(peak_lr=LR), max_grad_norm=0.0)
    opt = torch.optim.SGD(tr.model.parameters(), lr=LR)
    tr.optimizer = opt
    tr.train()
    (idx,) = collate.seen
    assert len(idx) == 16
    ref = _model()
    data = _Data()
    ids = torch.stack([data[i]["input_ids"] for i in idx])
    labels = torch.stack([data[i]["labels"] for i in idx])
    logits = ref(input_ids=ids).logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")
    loss = loss / (labels[:, 1:] != -100).sum()  # the mean over the tokens of all 4 micro-batches
    loss.backward()
    lr0 = LR  # constant LR at the first batch (rule factor 1)
    for (name, p), q in zip(ref.named_parameters(), tr.model.parameters()):
        assert torch.allclose(p.detach() - lr0 * p.grad, q.detach(), atol=1e-7, rtol=1e-6), name
    # A mean loss per micro-batch averaged over 4 of them would differ: the token counts are uneven.
    counts = [(labels[i * 4:(i + 1) * 4, 1:] != -100).sum().item() for i in range(4)]
    assert len(set(counts)) > 1


def test_resume_from_a_mid_schedule_checkpoint_gives_the_same_steps(tmp_path):
    full, fc, frec = _trainer(tmp_path / "full", save_steps=75)
    full.train()
    ckpt = tmp_path / "full" / "checkpoint-150"  # 2000 + 25 x 32 samples: inside the second stage
    assert ckpt.is_dir()
    res, rc, rrec = _trainer(tmp_path / "resumed")
    res.train(resume_from_checkpoint=str(ckpt))
    assert res.state.global_step == full.state.global_step
    assert rc.seen == fc.seen[150:]  # the same examples in the same steps after the resume
    assert {t: v for t, v in rrec.lrs.items()} == {t: v for t, v in frec.lrs.items() if t > 150}
    for p, q in zip(full.model.parameters(), res.model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("bad, match", [
    (dict(gradient_accumulation_steps=2), "gradient_accumulation_steps=2: must be 1"),
    (dict(per_device_train_batch_size=5), "batch 16 .* not a multiple of per_device_train_batch_size"),
    (dict(warmup_steps=10), "warmup_steps/warmup_ratio: give the warmup in samples"),
    (dict(ignore_data_skip=True), "ignore_data_skip=True"),
])
def test_what_cannot_be_followed_is_a_one_line_error(tmp_path, bad, match):
    kw = dict(bad)
    per_device = kw.pop("per_device_train_batch_size", 4)
    with pytest.raises(ValueError, match=match):
        _trainer(tmp_path, per_device=per_device, **kw)


def test_an_adaptive_controller_and_a_user_scheduler_are_refused(tmp_path):
    from bigbatch.adaptive import create_controller

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to=[], use_cpu=True)
    ctl = create_controller("ramp", start_batch=16, end_batch=64, ramp_samples=1000, granularity=4)
    with pytest.raises(ValueError, match="adaptive controller .* cannot drive a Trainer run"):
        BatchScheduleTrainer(model=_model(), args=args, train_dataset=_Data(), batch_schedule=ctl)
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"optimizers: pass \(optimizer, None\)"):
        BatchScheduleTrainer(model=m, args=args, train_dataset=_Data(), batch_schedule=SCHEDULE,
                             optimizers=(opt, torch.optim.lr_scheduler.ConstantLR(opt)))


def _ddp_worker(rank: int, out: str) -> dict:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533"})
    tr, collate, rec = _trainer(f"{out}/r{rank}", per_device=4, epochs=3, world=2)
    tr.train()
    params = [p.detach().flatten().tolist() for p in tr.model.parameters()]
    return {"seen": collate.seen, "lrs": rec.lrs, "steps": tr.state.global_step, "params": params}


def test_two_gloo_processes_run_the_same_steps_as_one(tmp_path):
    from _dist import spawn_gloo

    got = spawn_gloo(_ddp_worker, str(tmp_path), world=2, timeout=300)
    one, collate, rec = _trainer(tmp_path / "one", per_device=8, epochs=3)  # same micro-batches per step in total
    one.train()
    assert got[0]["steps"] == got[1]["steps"] == one.state.global_step
    for t, (a, b) in enumerate(zip(got[0]["seen"], got[1]["seen"])):
        assert a + b == collate.seen[t] and len(a) == len(b)  # rank r takes its half of the step's batch
    assert {int(k): v for k, v in got[0]["lrs"].items()} == pytest.approx(rec.lrs, rel=1e-12)
    for a, b, p in zip(got[0]["params"], got[1]["params"], one.model.parameters()):
        assert a == b  # DDP: identical replicas
        assert torch.allclose(torch.tensor(a), p.detach().flatten(), atol=2e-5, rtol=1e-4)
