"""No cross-contamination: a packed batch gives each document the loss it has alone."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from bigbatch.data import block_causal_mask, cu_seqlens, flex_available, flex_block_mask, pack_sequences, shift_targets
from bigbatch.workloads.bytelm import GPT, GPTConfig


@pytest.fixture(scope="module")
def gpt():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, d_model=32, context=48)).eval()
    return model


def _docs(seed=0, n=9):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 30, (n,), generator=g).tolist()
    return [torch.randint(0, 256, (k,), generator=g) for k in lengths]


def _alone_losses(model, docs):
    out = []
    for d in docs:
        logits = model(d[None, :-1])  # plain causal attention, positions 0..n-2
        out.append(F.cross_entropy(logits[0], d[1:], reduction="sum"))
    return torch.stack(out)


def _packed_losses(model, docs, mask_kind):
    # a document of n tokens gives n-1 next-token targets; rows hold the n tokens, and the
    # targets come from the shifted row with cross-document targets ignored
    rows = pack_sequences(docs, 48 + 1, "bfd")
    x, y = shift_targets(rows.tokens, rows.doc_ids)
    doc, pos = rows.doc_ids[:, :-1], rows.position_ids[:, :-1]
    if mask_kind == "sdpa":
        mask = block_causal_mask(doc)
    elif mask_kind == "flex":
        mask = flex_block_mask(doc)
    else:  # the contaminated control: plain causal attention over the whole row
        mask, pos = None, None
    with torch.no_grad():
        logits = model(x, pos=pos, attn_mask=mask)
    per_tok = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none", ignore_index=-100).view_as(y)
    valid = y >= 0
    return torch.stack([per_tok[(doc == i) & valid].sum() for i in range(len(docs))]), rows


def test_packed_per_document_losses_equal_each_document_alone(gpt):
    docs = _docs()
    with torch.no_grad():
        alone = _alone_losses(gpt, docs)
    packed, rows = _packed_losses(gpt, docs, "sdpa")
    assert rows.packing.n_rows < len(docs)  # several documents share rows
    n_targets = torch.tensor([len(d) - 1 for d in docs], dtype=torch.float32)
    torch.testing.assert_close(packed / n_targets, alone / n_targets, rtol=0, atol=1e-5)


def test_the_check_detects_contamination(gpt):
    docs = _docs()
    with torch.no_grad():
        alone = _alone_losses(gpt, docs)
    leaky, _ = _packed_losses(gpt, docs, "none")
    n_targets = torch.tensor([len(d) - 1 for d in docs], dtype=torch.float32)
    assert ((leaky - alone).abs() / n_targets).max() > 1e-3


@pytest.mark.skipif(not flex_available(), reason="FlexAttention not available")
def test_flex_attention_path_matches(gpt):
    docs = _docs(seed=1)
    with torch.no_grad():
        alone = _alone_losses(gpt, docs)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # eager FlexAttention: unfused, fine for a check
            packed, _ = _packed_losses(gpt, docs, "flex")
    except Exception as e:  # pragma: no cover - backends without a CPU FlexAttention kernel
        pytest.skip(f"FlexAttention cannot run here: {type(e).__name__}: {e}")
    n_targets = torch.tensor([len(d) - 1 for d in docs], dtype=torch.float32)
    torch.testing.assert_close(packed / n_targets, alone / n_targets, rtol=0, atol=1e-5)


def test_mask_and_cu_seqlens_by_hand():
    doc = torch.tensor([[0, 0, 1, 1, 1, -1]])
    m = block_causal_mask(doc)[0, 0].int()
    assert m.tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],  # padding attends to itself only: no fully masked row, no NaN
    ]
    assert cu_seqlens(torch.tensor([[0, 0, 1], [2, 2, 2]])).tolist() == [0, 2, 3, 6]
    x, y = shift_targets(torch.tensor([[5, 6, 7, 8, 0]]), torch.tensor([[0, 0, 1, 1, -1]]))
    assert x.tolist() == [[5, 6, 7, 8]] and y.tolist() == [[6, -100, 8, -100]]
    with pytest.raises(ValueError, match="doc_ids must have shape"):
        block_causal_mask(torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="doc_ids must be an integer tensor"):
        block_causal_mask(torch.zeros(2, 3))


def _bytelm(corpus, **kw):
    from bigbatch.workloads import load_workload

    return load_workload("bytelm", corpus=[str(corpus)], context=32, d_model=32, n_head=2, n_layer=1, max_bytes=None, val_windows=8, **kw)


def test_bytelm_packing_workload(bytelm_corpus):
    wl = _bytelm(bytelm_corpus, packing=True)
    plain = _bytelm(bytelm_corpus)
    assert wl.packing == "bfd" and 0.9 < wl.packing_efficiency <= 1.0
    rows = wl.packed
    # every byte of the training files is in one piece (1-byte pieces, which predict nothing, are dropped)
    assert abs(int((rows["doc"] >= 0).sum()) - len(plain.train_bytes)) <= 2 * len(wl.files)
    torch.manual_seed(0)
    model = wl.build_model().eval()
    n = min(16, wl.dataset_size)
    idx = torch.arange(wl.dataset_size - n, wl.dataset_size)  # the last rows: the short pieces, several per row
    batch = wl.fetch(idx)
    loss_sum, count = wl.loss(model, batch)
    assert int(count) == wl.count(batch) == int((batch["y"] >= 0).sum())
    with torch.no_grad():
        logits = model(batch["x"], pos=batch["pos"], attn_mask=block_causal_mask(batch["doc"]))
        per_tok = F.cross_entropy(logits.flatten(0, 1), batch["y"].flatten(), reduction="none", ignore_index=-100).view_as(batch["y"])
        torch.testing.assert_close(per_tok.sum(), loss_sum)
        checked = 0
        for r in range(n):
            for d in rows["doc"][idx[r]].unique().tolist():
                if d < 0:
                    continue
                piece = rows["tokens"][idx[r]][rows["doc"][idx[r]] == d].long()  # the whole piece, last byte included
                alone = F.cross_entropy(model(piece[None, :-1])[0], piece[1:], reduction="sum")
                got = per_tok[r][(batch["doc"][r] == d) & (batch["y"][r] >= 0)].sum()
                assert abs(float(got - alone)) / (piece.numel() - 1) < 1e-5
                checked += 1
        assert checked > n  # some rows hold several pieces
    with pytest.raises(ValueError, match="unknown packing method 'ffd'"):
        _bytelm(bytelm_corpus, packing="ffd")


def test_bytelm_packing_accumulation_is_token_normalised(tmp_path, bytelm_corpus):
    from bigbatch.train import TrainConfig, train

    args = {"corpus": [str(bytelm_corpus)], "context": 32, "d_model": 32, "n_head": 2, "n_layer": 1, "max_bytes": None, "val_windows": 8, "packing": "spfhp"}
    common = dict(workload="bytelm", workload_args=args, batch_size=8, lr=1e-3, optimizer="adamw", budget_samples=8 * 2, checkpoint_every_samples=0, eval_every_samples=10**6, progress="none")
    big = train(TrainConfig(**common, out=str(tmp_path / "big")))
    acc = train(TrainConfig(**common, micro_batch_size=2, out=str(tmp_path / "acc")))
    flat = lambda m: torch.cat([p.detach().reshape(-1) for p in m.parameters()])  # noqa: E731
    torch.testing.assert_close(flat(big.model), flat(acc.model), rtol=1e-5, atol=1e-6)
    assert big.summary["final_metric"] is not None
