"""A Hugging Face causal language model as a bigbatch workload (``pip install 'bigbatch[hf]'``).

From the command line::

    bigbatch study --workload bigbatch.workloads.hf:causal_lm \\
        -w model=PATH_OR_CONFIG -w data=FILES [-w eval_data=FILES] [-w tokenizer=PATH] ...

and from Python, with your own model, data and collator::

    from bigbatch.workloads.hf import from_hf
    wl = from_hf(lambda: AutoModelForCausalLM.from_config(cfg), train_ds, eval_ds, collator)

The batch unit is one **sequence** (a row of at most ``seq_len`` tokens); the loss is the
cross-entropy *summed* over the tokens that have a target — labels ≠ −100 after the shift
(position t predicts label t+1, as the model's own loss does) — and ``count`` is how many there
are, so the trainer normalises by the tokens of the whole global batch (``count_unit =
"tokens"``). The metric is the validation loss per token in nats (``metric="perplexity"``: its
exponential); lower is better.

On its first call, ``loss`` checks itself against the model: in float32, without autocast and
in eval mode (no dropout), ``loss_sum / count`` must equal the model's own mean loss
(``model(**batch, labels=labels).loss``) on the same batch to a relative 1e-4. A loss function
that returns a mean — which trains, at the wrong scale for every micro-batch size — fails it
with a one-line error.

Everything loads offline: a model from a local directory or a config (a ``config.json`` file, a
directory holding one, or the config's JSON inline); a tokenizer from a local directory, else
the byte-level fallback (UTF-8 bytes, ids 0–255, end of document 256, padding 257). A name that
is not a local path is refused, not downloaded. ``transformers`` and ``datasets`` are imported
here only, when a workload is built.
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from bigbatch._checks import check_choice, check_int_positive
from bigbatch.workloads.base import Batch, EpochSampler, WorkloadDefaults

__all__ = ["HFCausalLM", "ByteTokenizer", "causal_lm", "from_hf", "summed_loss", "IGNORE_INDEX"]

#: The label that has no target (Hugging Face's and PyTorch's ``ignore_index``).
IGNORE_INDEX = -100
_RTOL = 1e-4
_BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_DOCS = "see docs/workloads.md"


def _need(module: str) -> Any:
    try:
        return __import__(module)
    except ImportError:
        raise ValueError(f"workload bigbatch.workloads.hf needs {module}: pip install 'bigbatch[hf]'") from None


class ByteTokenizer:
    """The fallback tokenizer: a text's UTF-8 bytes (ids 0–255); 256 ends a document, 257 pads."""

    eos_token_id = 256
    pad_token_id = 257
    vocab_size = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


def _tokenizer(spec: Any) -> Any:
    """``None`` → the byte fallback; a local directory → its Hugging Face tokenizer (offline); an object as is."""
    if spec is None:
        return ByteTokenizer()
    if not isinstance(spec, (str, Path)):
        return spec
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise ValueError(f"tokenizer {spec!r} is not a local directory: bigbatch loads tokenizers offline only; "
                         f"save one with tokenizer.save_pretrained(DIR) and pass tokenizer=DIR, or leave tokenizer unset "
                         f"for the byte-level fallback")
    transformers = _need("transformers")
    try:
        return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"tokenizer {spec!r}: cannot load a tokenizer from that directory ({str(e).splitlines()[0]})") from None


def _encode(tok: Any, text: str) -> list[int]:
    if isinstance(tok, ByteTokenizer):
        return tok.encode(text)
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _vocab(tok: Any) -> int:
    return len(tok) if hasattr(tok, "__len__") else int(tok.vocab_size)


def _eos_pad(tok: Any) -> tuple[int | None, int]:
    eos = getattr(tok, "eos_token_id", None)
    pad = getattr(tok, "pad_token_id", None)
    return eos, pad if pad is not None else (eos if eos is not None else 0)


def _model_fn(spec: Any, vocab: int) -> tuple[Callable[[], nn.Module], Any]:
    """A model factory from a local path or a config (file, directory, inline JSON), and the config."""
    transformers = _need("transformers")
    text = str(spec).strip()
    if text.startswith("{"):
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"model: the inline config is not valid JSON ({e})") from None
        if "model_type" not in d:
            raise ValueError('model: an inline config needs "model_type" (e.g. {"model_type": "gpt2", "n_layer": 2})')
        model_type = d.pop("model_type")
        d.setdefault("vocab_size", vocab)
        try:
            config = transformers.AutoConfig.for_model(model_type, **d)
        except ValueError as e:
            raise ValueError(f"model: {str(e).splitlines()[0]}") from None
        weights = None
    else:
        path = Path(text).expanduser()
        if not path.exists():
            raise ValueError(f"model {spec!r} is not a local path: bigbatch loads models offline only; download it first "
                             f"(e.g. `hf download NAME --local-dir DIR`) and pass model=DIR, or pass a config "
                             f"(a config.json or its JSON inline)")
        if path.is_file():
            config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
            weights = None
        else:
            if not (path / "config.json").exists():
                raise ValueError(f"model {spec!r}: the directory holds no config.json")
            config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
            has = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
            weights = str(path) if has else None
    if getattr(config, "loss_type", None) is None:
        config.loss_type = "ForCausalLM"  # the model's own loss, named (transformers warns on None)
    if getattr(config, "vocab_size", vocab) < vocab:
        raise ValueError(f"model: its vocab_size {config.vocab_size} is smaller than the tokenizer's {vocab} ids")

    def build() -> nn.Module:
        if weights is not None:  # pretrained weights: the same every call (fine-tuning studies)
            return transformers.AutoModelForCausalLM.from_pretrained(weights, local_files_only=True)
        return transformers.AutoModelForCausalLM.from_config(config)

    return build, config


def _files(spec: Any) -> list[Path]:
    items = spec if isinstance(spec, (list, tuple)) else [x for x in str(spec).split(",") if x.strip()]
    out: list[Path] = []
    for item in items:
        p = Path(str(item).strip()).expanduser()
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.suffix in _BUILDERS))
        elif p.exists():
            out.append(p)
        else:
            raise ValueError(f"data file {str(item)!r} does not exist (data= takes local text, JSON or parquet files)")
    if not out:
        raise ValueError(f"data {spec!r} names no text, JSON or parquet file")
    kinds = {_BUILDERS.get(p.suffix) for p in out}
    if None in kinds or len(kinds) != 1:
        raise ValueError(f"data files must all be one kind of {', '.join(sorted(_BUILDERS))}, got {', '.join(p.name for p in out)}")
    return out


def load_files(spec: Any) -> Any:
    """Local text (one document per line), JSON/JSONL or parquet files as a ``datasets.Dataset`` (offline)."""
    files = _files(spec)
    datasets = _need("datasets")
    builder = _BUILDERS[files[0].suffix]
    return datasets.load_dataset(builder, data_files=[str(p) for p in files], split="train")


def _refuse_iterable(ds: Any, what: str) -> None:
    try:
        import datasets
    except ImportError:
        return
    if isinstance(ds, datasets.IterableDataset) or isinstance(ds, torch.utils.data.IterableDataset):
        raise ValueError(f"{what} is an IterableDataset (streamed): bigbatch draws examples by index, a seeded "
                         f"permutation of the rows per epoch, so every batch size sees the same order and a resumed "
                         f"run continues exactly; load it as a datasets.Dataset (streaming=False), or take the part "
                         f"you train on with Dataset.from_generator(lambda: (yield from stream.take(n)))")


def _documents(ds: Any, tok: Any, text_field: str) -> list[list[int]]:
    """Token ids per document of a ``datasets.Dataset`` (pre-tokenized ``input_ids`` or a text column)."""
    cols = list(getattr(ds, "column_names", []) or [])
    if "input_ids" in cols:
        return [list(map(int, ids)) for ids in ds["input_ids"]]
    if text_field not in cols:
        raise ValueError(f"the data has no {text_field!r} column nor input_ids (columns: {', '.join(cols) or 'none'}); "
                         f"set text_field")
    return [_encode(tok, t) for t in ds[text_field] if t and t.strip()]


def _rows(docs: list[list[int]], seq_len: int, packing: bool, eos: int | None, pad: int) -> dict[str, torch.Tensor]:
    """Documents as rows of ``seq_len`` tokens: padded one per row (truncated), or packed end to end."""
    if packing:
        stream: list[int] = []
        for d in docs:
            stream.extend(d)
            if eos is not None:
                stream.append(eos)
        n = len(stream) // seq_len
        rest = stream[n * seq_len:]
        chunks = [stream[i * seq_len:(i + 1) * seq_len] for i in range(n)] + ([rest] if len(rest) >= 2 else [])
    else:
        chunks = [(d + ([eos] if eos is not None else []))[:seq_len] for d in docs]
    chunks = [c for c in chunks if len(c) >= 2]  # one token predicts nothing
    if not chunks:
        raise ValueError("the data has no document of at least 2 tokens")
    ids = torch.full((len(chunks), seq_len), pad, dtype=torch.long)
    mask = torch.zeros((len(chunks), seq_len), dtype=torch.long)
    for i, c in enumerate(chunks):
        ids[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        mask[i, : len(c)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _with_labels(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if "labels" not in batch:
        labels = batch["input_ids"].clone()
        if "attention_mask" in batch:
            labels[batch["attention_mask"] == 0] = IGNORE_INDEX
        batch = {**batch, "labels": labels}
    return batch


def summed_loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cross-entropy summed over the tokens with a target, their count)`` for a causal LM batch.

    Position t predicts ``labels[t + 1]``; labels of −100 have no target, as in the model's own loss.
    """
    labels = batch["labels"]
    logits = model(**_inputs(model, batch)).logits
    target = labels[:, 1:]
    loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), target.flatten(), reduction="sum", ignore_index=IGNORE_INDEX)
    return loss, (target != IGNORE_INDEX).sum()


def _inputs(model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
    """The batch's tensors that the model's ``forward`` takes, labels left out."""
    try:
        params = inspect.signature(model.forward).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    except (TypeError, ValueError):
        params, takes_any = {}, True
    return {k: v for k, v in batch.items() if k != "labels" and (takes_any or k in params)}


class HFCausalLM:
    """A Hugging Face causal LM and its data as a :class:`bigbatch.workloads.Workload` (module doc).

    ``train`` / ``eval_data`` are either row tensors (``{"input_ids", "attention_mask"}``, fetched
    by index) or a ``datasets.Dataset`` with a ``collator`` (``collator([ds[i] for i in
    indices])``, labels added from ``input_ids`` and ``attention_mask`` when it gives none).
    ``loss_fn(model, batch) -> (sum, count)`` replaces :func:`summed_loss`; the first call is
    checked against the model's own mean loss either way.
    """

    higher_is_better = False
    count_unit = "tokens"

    def __init__(
        self,
        model_fn: Callable[[], nn.Module],
        train: Any,
        eval_data: Any,
        *,
        collator: Callable[[list[Any]], dict[str, torch.Tensor]] | None = None,
        loss_fn: Callable[[nn.Module, Batch], tuple[torch.Tensor, Any]] | None = None,
        metric: str = "val_loss",
        eval_batch_size: int = 16,
        defaults: WorkloadDefaults | None = None,
        name: str = "hf-causal-lm",
        seq_len: int | None = None,
        packing: bool = False,
    ) -> None:
        if not callable(model_fn):
            raise ValueError(f"model_fn must be a callable returning a fresh model, got a {type(model_fn).__name__}")
        self.model_fn = model_fn
        self.name = name
        self.metric = check_choice("metric", metric, ["val_loss", "perplexity"])
        self.metric_name = self.metric
        self.eval_batch_size = check_int_positive("eval_batch_size", eval_batch_size)
        self.collator = collator
        self.loss_fn = loss_fn or summed_loss
        self.seq_len = seq_len
        self.packing = bool(packing)
        self._train, self._eval = train, eval_data
        self.dataset_size = int(len(train["input_ids"]) if isinstance(train, dict) else len(train))
        if self.dataset_size < 1:
            raise ValueError("the training data is empty")
        if (len(eval_data["input_ids"]) if isinstance(eval_data, dict) else len(eval_data)) < 1:
            raise ValueError("the evaluation data is empty")
        self.defaults = defaults or WorkloadDefaults(
            batch_size=16, lr=1e-3, optimizer="adamw", weight_decay=0.1, warmup_samples=16 * 10,
            budget_samples=self.dataset_size, extra={"betas": (0.9, 0.95)})
        self._checked = False

    # -- the Workload methods ---------------------------------------------------------------

    def build_model(self) -> nn.Module:
        return self.model_fn()

    def sampler(self, seed: int) -> EpochSampler:
        return EpochSampler(self.dataset_size, seed)

    def _take(self, data: Any, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        if isinstance(data, dict):
            return _with_labels({k: v[indices] for k, v in data.items()})
        if self.collator is None:
            raise ValueError("a datasets.Dataset given to from_hf needs a collator (or pass token rows)")
        out = self.collator([data[int(i)] for i in indices.tolist()])
        return _with_labels({k: v for k, v in dict(out).items() if torch.is_tensor(v)})

    def fetch(self, indices: torch.Tensor) -> Batch:
        return self._take(self._train, indices)

    def count(self, batch: Batch) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, Any]:
        out = self.loss_fn(model, batch)
        if not self._checked:
            self._check_scaling(model, batch)
            self._checked = True
        return out

    def _check_scaling(self, model: nn.Module, batch: Batch) -> None:
        """``loss_sum / count`` against the model's own mean loss, in float32, eval mode, no autocast."""
        was_training = model.training
        device = batch["labels"].device
        model.eval()
        try:
            with torch.no_grad(), torch.autocast(device.type, enabled=False):
                total, n = self.loss_fn(model, batch)
                own = model(**_inputs(model, batch), labels=batch["labels"]).loss
        finally:
            model.train(was_training)
        n = int(n)
        if n == 0:
            return  # no target in this batch: nothing to compare (the trainer skips it too)
        mine, theirs = float(total) / n, float(own)
        if not math.isfinite(theirs) or abs(mine - theirs) > _RTOL * max(abs(theirs), 1e-12):
            raise ValueError(
                f"workload {self.name}: loss_sum / count = {mine:.6g} but the model's own mean loss on the same batch "
                f"is {theirs:.6g} (relative difference {abs(mine - theirs) / max(abs(theirs), 1e-12):.2g} > {_RTOL:g}): "
                f"loss must return the SUM over the {n} target tokens and their count, not the mean; {_DOCS}")

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device) -> float:
        n_eval = len(self._eval["input_ids"]) if isinstance(self._eval, dict) else len(self._eval)
        total, n = 0.0, 0
        for i in range(0, n_eval, self.eval_batch_size):
            idx = torch.arange(i, min(i + self.eval_batch_size, n_eval))
            batch = {k: v.to(device) for k, v in self._take(self._eval, idx).items()}
            s, c = summed_loss(model, batch)
            total += float(s)
            n += int(c)
        if n == 0:
            raise ValueError("the evaluation data has no target token")
        mean = total / n
        return math.exp(mean) if self.metric == "perplexity" else mean


def _split(rows: dict[str, torch.Tensor], val_fraction: float) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    n = len(rows["input_ids"])
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    k = max(1, round(val_fraction * n))
    if n - k < 1:
        raise ValueError(f"the data has {n} rows: too few to hold out a validation split (give eval_data)")
    return {key: v[: n - k] for key, v in rows.items()}, {key: v[n - k:] for key, v in rows.items()}


def _as_rows(data: Any, tok: Any, seq_len: int, packing: bool, text_field: str, what: str) -> dict[str, torch.Tensor]:
    """Files, a ``datasets.Dataset`` or a token tensor as rows of ``seq_len`` tokens."""
    _refuse_iterable(data, what)
    eos, pad = _eos_pad(tok)
    if isinstance(data, dict) and torch.is_tensor(data.get("input_ids")):  # rows already: {"input_ids", "attention_mask"}
        ids = data["input_ids"]
        if ids.dim() != 2 or ids.shape[1] > seq_len:
            raise ValueError(f"{what}: input_ids must be rows of at most seq_len {seq_len} tokens, got shape {tuple(ids.shape)}")
        return {"input_ids": ids.long(), "attention_mask": data.get("attention_mask", torch.ones_like(ids)).long()}
    if torch.is_tensor(data):
        if data.is_floating_point():
            raise ValueError(f"{what}: a token tensor must hold integer ids, got {data.dtype}")
        if data.dim() == 1:  # a token stream: packed into rows
            return _rows([data.long().tolist()], seq_len, True, None, pad)
        if data.dim() == 2:
            if data.shape[1] > seq_len:
                raise ValueError(f"{what}: rows of {data.shape[1]} tokens exceed seq_len {seq_len}")
            return {"input_ids": data.long(), "attention_mask": torch.ones_like(data, dtype=torch.long)}
        raise ValueError(f"{what}: a token tensor must be 1-D (a stream) or 2-D (rows), got shape {tuple(data.shape)}")
    if isinstance(data, (str, Path, list, tuple)):
        data = load_files(data)
    return _rows(_documents(data, tok, text_field), seq_len, packing, eos, pad)


def causal_lm(
    model: str,
    data: Any,
    eval_data: Any = None,
    tokenizer: str | None = None,
    seq_len: int = 128,
    packing: bool = False,
    text_field: str = "text",
    val_fraction: float = 0.05,
    metric: str = "val_loss",
    eval_batch_size: int = 16,
    batch_size: int = 16,
    lr: float = 1e-3,
    budget_samples: int | None = None,
    target: float | None = None,
) -> HFCausalLM:
    """The ``--workload bigbatch.workloads.hf:causal_lm`` factory (``-w key=value`` for each argument).

    ``model``: a local model directory (its weights when it has them, else a fresh model of its
    config), a ``config.json``, or a config as inline JSON with ``model_type``
    (``{"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 64}``; ``vocab_size``
    defaults to the tokenizer's). ``data`` / ``eval_data``: local text (one document per line),
    JSON/JSONL or parquet files, comma-separated, or directories of them; without ``eval_data``
    the last ``val_fraction`` of the rows is held out. ``tokenizer``: a local tokenizer
    directory; unset, the byte-level fallback. ``packing``: documents joined end to end (an
    end-of-document token between them) and cut into rows of ``seq_len``, as Hugging Face's
    ``run_clm.py`` does (attention crosses documents within a row); otherwise one document per
    row, truncated to ``seq_len`` and padded (padding has no target and no attention).
    ``batch_size``, ``lr``, ``budget_samples`` (default one epoch) and ``target`` (a validation
    loss) are the workload's defaults for ``bigbatch train``/``study``; the batch unit is one row.
    """
    seq_len = check_int_positive("seq_len", seq_len)
    tok = _tokenizer(tokenizer)
    model_fn, config = _model_fn(model, _vocab(tok))
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit is not None and seq_len > int(limit):
        raise ValueError(f"seq_len {seq_len} exceeds the model's {int(limit)} positions")
    train = _as_rows(data, tok, seq_len, packing, text_field, "data")
    if eval_data is None:
        train, evals = _split(train, float(val_fraction))
    else:
        evals = _as_rows(eval_data, tok, seq_len, packing, text_field, "eval_data")
    n = len(train["input_ids"])
    defaults = WorkloadDefaults(batch_size=check_int_positive("batch_size", batch_size), lr=float(lr), optimizer="adamw",
                                weight_decay=0.1, warmup_samples=10 * batch_size,
                                budget_samples=int(budget_samples) if budget_samples else n, target=target,
                                extra={"betas": (0.9, 0.95)})
    return HFCausalLM(model_fn, train, evals, metric=metric, eval_batch_size=eval_batch_size, defaults=defaults,
                      name=f"hf-{getattr(config, 'model_type', 'causal-lm')}", seq_len=seq_len, packing=packing)


def from_hf(
    model_fn: Callable[[], nn.Module],
    train_dataset: Any,
    eval_dataset: Any = None,
    collator: Callable[[list[Any]], dict[str, torch.Tensor]] | None = None,
    *,
    tokenizer: Any = None,
    seq_len: int = 128,
    packing: bool = False,
    text_field: str = "text",
    val_fraction: float = 0.05,
    loss_fn: Callable[[nn.Module, Batch], tuple[torch.Tensor, Any]] | None = None,
    metric: str = "val_loss",
    eval_batch_size: int = 16,
    defaults: WorkloadDefaults | None = None,
    name: str = "hf-causal-lm",
) -> HFCausalLM:
    """Your model factory and data as a workload: ``train(cfg, workload=from_hf(...))``, ``run_study``.

    ``model_fn()`` returns a fresh causal LM (called after the trainer seeds torch).
    ``train_dataset`` / ``eval_dataset``: a ``datasets.Dataset`` — with a ``collator`` it is
    indexed as is (``collator([ds[i] for i in indices])``); without one, its ``input_ids`` (or
    ``text_field``, tokenized by ``tokenizer``, else bytes) are cut into rows of ``seq_len``,
    padded or ``packing`` — or a token tensor (2-D rows, or a 1-D stream packed into rows), or
    local files. No ``eval_dataset``: the last ``val_fraction`` of the rows (token rows only).
    An ``IterableDataset`` is refused (examples are drawn by index). ``loss_fn(model, batch) ->
    (sum, count)`` replaces the summed cross-entropy; its first call is checked against the
    model's own mean loss.
    """
    seq_len = check_int_positive("seq_len", seq_len)
    tok = _tokenizer(tokenizer)
    _refuse_iterable(train_dataset, "train_dataset")
    _refuse_iterable(eval_dataset, "eval_dataset")
    if collator is not None:
        if eval_dataset is None:
            raise ValueError("from_hf with a collator needs an eval_dataset (a held-out split is cut from token rows only)")
        train, evals = train_dataset, eval_dataset
    else:
        train = _as_rows(train_dataset, tok, seq_len, packing, text_field, "train_dataset")
        if eval_dataset is None:
            train, evals = _split(train, float(val_fraction))
        else:
            evals = _as_rows(eval_dataset, tok, seq_len, packing, text_field, "eval_dataset")
    return HFCausalLM(model_fn, train, evals, collator=collator, loss_fn=loss_fn, metric=metric,
                      eval_batch_size=eval_batch_size, defaults=defaults, name=name, seq_len=seq_len, packing=packing)
