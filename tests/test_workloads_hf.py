"""bigbatch.workloads.hf with the real transformers and datasets: tiny GPT-2 and Llama from configs
on a local text file, tokens counted after the shift, the summed-loss check, padding and packing,
files of each kind, offline-only loading, IterableDataset refused, and a 3-batch study."""

import json
import math
import random

import pytest
import torch

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from bigbatch.workloads.hf import IGNORE_INDEX, ByteTokenizer, causal_lm, from_hf, summed_loss  # noqa: E402

GPT2 = '{"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 32}'
LLAMA = ('{"model_type": "llama", "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, '
         '"hidden_size": 32, "intermediate_size": 64, "max_position_embeddings": 64}')
WORDS = "the cat sat on a mat while dogs ran past big red barns under blue skies".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("hf") / "corpus.txt"
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) for _ in range(600)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _train(wl, out, **kw):
    from bigbatch.train import TrainConfig, train

    cfg = dict(workload="hf", batch_size=16, lr=3e-3, optimizer="adamw", budget_samples=16 * 30, eval_every_samples=16 * 10,
               device="cpu", progress="none", out=str(out), seed=0)
    cfg.update(kw)
    return train(TrainConfig(**cfg), workload=wl)


@pytest.mark.parametrize("model", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_tiny_models_from_configs_train_on_a_text_file(corpus, tmp_path, model):
    wl = causal_lm(model=model, data=str(corpus), seq_len=32)
    assert wl.count_unit == "tokens" and not wl.higher_is_better and wl.metric_name == "val_loss"
    torch.manual_seed(0)
    before = wl.evaluate(wl.build_model().eval(), torch.device("cpu"))
    assert abs(before - math.log(ByteTokenizer.vocab_size)) < 0.5  # a fresh model: about uniform over 258 ids
    res = _train(wl, tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 30 and res is not None
    after = summary["final_metric"]
    assert after < before - 1.5  # it learned the corpus's characters and words


def test_tokens_are_counted_after_the_shift_and_the_sum_is_the_models_mean_times_count(corpus):
    wl = causal_lm(model=GPT2, data=str(corpus), seq_len=32)
    batch = wl.fetch(torch.arange(8))
    lengths = batch["attention_mask"].sum(1)
    # Padded rows: a document of L tokens (its end-of-document id included) has L - 1 targets.
    assert wl.count(batch) == int((lengths - 1).sum()) == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    torch.manual_seed(0)
    model = wl.build_model().eval()
    with torch.no_grad():
        total, n = summed_loss(model, batch)
        own = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert int(n) == wl.count(batch)
    assert float(total) / int(n) == pytest.approx(float(own), rel=1e-5)


def test_a_mean_loss_is_caught_on_the_first_call(corpus, tmp_path, capsys):
    def mean_loss(model, batch):
        s, n = summed_loss(model, batch)
        return s / n, n  # the trap: trains, divided twice

    rows = causal_lm(model=GPT2, data=str(corpus), seq_len=32)
    wl = from_hf(rows.model_fn, rows._train, rows._eval, loss_fn=mean_loss)
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"loss_sum / count = .* but the model's own mean loss .* not the mean"):
        wl.loss(wl.build_model(), wl.fetch(torch.arange(4)))
    # The summed loss passes, also in train mode with dropout on (the check runs in eval mode).
    ok = from_hf(rows.model_fn, rows._train, rows._eval)
    torch.manual_seed(0)
    model = ok.build_model().train()
    s, n = ok.loss(model, ok.fetch(torch.arange(4)))
    assert s.requires_grad and int(n) == ok.count(ok.fetch(torch.arange(4)))
    # Through the CLI: one line, exit 2.
    from bigbatch.cli import main

    (tmp_path / "meanwl.py").write_text(
        "from bigbatch.workloads.hf import causal_lm, from_hf, summed_loss\n"
        "def make(**kw):\n"
        "    r = causal_lm(**kw)\n"
        "    return from_hf(r.model_fn, r._train, r._eval, loss_fn=lambda m, b: (lambda s, n: (s / n, n))(*summed_loss(m, b)))\n")
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(SystemExit) as e:
            main(["train", "--workload", "meanwl:make", "-w", f"model={GPT2}", "-w", f"data={corpus}", "-w", "seq_len=32",
                  "--budget-samples", "32", "--device", "cpu", "--progress", "none", "--out", str(tmp_path / "cli")])
    finally:
        sys.path.remove(str(tmp_path))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "not the mean" in err[0], err


def test_packing_fills_rows_and_a_token_stream_is_packed(corpus):
    padded = causal_lm(model=GPT2, data=str(corpus), seq_len=32)
    packed = causal_lm(model=GPT2, data=str(corpus), seq_len=32, packing=True)
    full = packed._train["attention_mask"].sum(1)
    assert (full == 32).all()  # every training row full (a partial last row, if any, is in the held-out tail)
    b = packed.fetch(torch.arange(4))
    assert packed.count(b) == 4 * 31
    # Every byte of the corpus (plus one end-of-document id per line) is in the packed rows, in order.
    text = corpus.read_text().splitlines()
    stream = [t for line in text if line.strip() for t in list(line.encode()) + [256]]
    rows = torch.cat([packed._train["input_ids"], packed._eval["input_ids"]])
    mask = torch.cat([packed._train["attention_mask"], packed._eval["attention_mask"]])
    assert rows[mask == 1].tolist() == stream[: int(mask.sum())] and len(stream) - int(mask.sum()) < 2
    # Padding keeps one document per row, truncated to seq_len: fewer tokens than the corpus has.
    kept = int(padded._train["attention_mask"].sum() + padded._eval["attention_mask"].sum())
    assert kept < len(stream) and padded.dataset_size + len(padded._eval["input_ids"]) == len([x for x in text if x.strip()])
    tokens = torch.tensor(stream)
    wl = from_hf(padded.model_fn, tokens, tokens[:200], seq_len=32)
    assert wl.dataset_size == math.ceil(len(stream) / 32) and wl.count(wl.fetch(torch.arange(2))) == 62


def test_json_and_parquet_files_and_a_local_tokenizer_with_a_collator(corpus, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    lines = [x for x in corpus.read_text().splitlines() if x]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    datasets.Dataset.from_dict({"text": lines}).to_parquet(str(tmp_path / "d.parquet"))
    for name in ("d.jsonl", "d.parquet"):
        wl = causal_lm(model=GPT2, data=str(tmp_path / name), seq_len=32)
        assert wl.dataset_size == causal_lm(model=GPT2, data=str(corpus), seq_len=32).dataset_size
    # A word-level tokenizer saved to a directory, loaded offline; a Dataset with HF's collator.
    vocab = {w: i for i, w in enumerate(["[PAD]", "[EOS]", "[UNK]"] + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]")
    fast.save_pretrained(str(tmp_path / "tok"))
    wl = causal_lm(model=GPT2, data=str(corpus), tokenizer=str(tmp_path / "tok"), seq_len=16)
    assert int(wl._train["input_ids"].max()) < len(vocab)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"), local_files_only=True)
    ds = datasets.Dataset.from_dict({"text": lines}).map(lambda b: tok(b["text"]), batched=True, remove_columns=["text"])
    collator = transformers.DataCollatorForLanguageModeling(tok, mlm=False)
    model_fn = lambda: transformers.AutoModelForCausalLM.from_config(  # noqa: E731
        transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=len(vocab), loss_type="ForCausalLM"))
    hf = from_hf(model_fn, ds.select(range(500)), ds.select(range(500, len(ds))), collator)
    batch = hf.fetch(torch.arange(8))
    assert hf.count(batch) == int((batch["labels"][:, 1:] != -100).sum()) > 0
    torch.manual_seed(0)
    s, n = hf.loss(model_fn(), batch)  # the first call checks the sum against the model's mean
    assert math.isfinite(float(s.detach())) and hf.evaluate(model_fn().eval(), torch.device("cpu")) > 0


def test_offline_only_and_iterable_datasets_are_one_line_errors(corpus, tmp_path):
    with pytest.raises(ValueError, match="not a local path: bigbatch loads models offline only"):
        causal_lm(model="gpt2", data=str(corpus))
    with pytest.raises(ValueError, match="tokenizer 'gpt2' is not a local directory"):
        causal_lm(model=GPT2, data=str(corpus), tokenizer="gpt2")
    with pytest.raises(ValueError, match="data file .* does not exist"):
        causal_lm(model=GPT2, data=str(tmp_path / "none.txt"))
    with pytest.raises(ValueError, match="seq_len 4096 exceeds the model's 64 positions"):
        causal_lm(model=LLAMA, data=str(corpus), seq_len=4096)
    stream = datasets.Dataset.from_dict({"text": ["a b c"] * 10}).to_iterable_dataset()
    with pytest.raises(ValueError, match="IterableDataset .* draws examples by index"):
        from_hf(lambda: None, stream)
    # A config directory without weights builds a fresh model; with weights, those weights.
    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=258)
    cfg.save_pretrained(str(tmp_path / "cfg"))
    a = causal_lm(model=str(tmp_path / "cfg"), data=str(corpus), seq_len=32)
    torch.manual_seed(0)
    m = a.build_model()
    m.save_pretrained(str(tmp_path / "weights"))
    b = causal_lm(model=str(tmp_path / "weights"), data=str(corpus), seq_len=32)
    torch.manual_seed(1)
    assert torch.equal(b.build_model().transformer.wte.weight, m.transformer.wte.weight)


def test_a_three_batch_study_fits_or_says_why_not(corpus, tmp_path):
    from bigbatch.study import StudyConfig, run_study

    wa = {"model": GPT2, "data": str(corpus), "seq_len": 32}
    res = run_study(StudyConfig(workload="bigbatch.workloads.hf:causal_lm", workload_args=wa, batch_sizes=[4, 8, 16],
                                lr_grid=[1.0], lr=3e-3, base_batch_size=8, rule="sqrt", target=2.6, budget=2400,
                                budget_steps=200, eval_every_samples=16, eval_every_steps=2, lr_extend=0, bootstrap=20,
                                progress="none", device="cpu", jobs=1, out=str(tmp_path / "study")))
    assert res["complete"] and len(res["cells"]) == 3 and all(c["reached_target"] for c in res["cells"])
    steps = [c["steps_to_target"] for c in sorted(res["cells"], key=lambda c: c["batch_size"])]
    assert steps[0] > steps[1] > steps[2]  # a larger batch reaches the loss in fewer steps
    if res["b_crit"] is None:
        assert res["b_crit_undetermined"]  # an honest reason, not a number
    else:
        assert res["b_crit"] > 0
