"""A small GPT on raw bytes of a text corpus; metric: validation bits per byte.

Default corpus: the ``.py`` files of the running Python's standard library (present on every
machine), split train/validation deterministically by file path. The model is a pre-norm
GPT-style decoder with causal attention through ``scaled_dot_product_attention``. The loss is
normalised by tokens (bytes).
"""

from __future__ import annotations

import math
import sysconfig
import zlib
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bigbatch._checks import check_choice, check_int_positive, check_nonnegative
from bigbatch.data.masks import block_causal_mask, packed_attention, shift_targets
from bigbatch.data.packing import pack_sequences
from bigbatch.workloads.base import Batch, EpochSampler, WorkloadDefaults

__all__ = ["ByteLM", "GPT", "GPTConfig", "read_corpus", "pack_documents"]


class GPTConfig:
    """Shape of the decoder. ``GPTConfig.gpt2_small()`` is GPT-2 small's 12×768 with 12 heads."""

    def __init__(self, n_layer: int = 2, n_head: int = 4, d_model: int = 128, context: int = 128, vocab: int = 256, dropout: float = 0.0) -> None:
        self.n_layer = check_int_positive("n_layer", n_layer)
        self.n_head = check_int_positive("n_head", n_head)
        self.d_model = check_int_positive("d_model", d_model)
        self.context = check_int_positive("context", context)
        self.vocab = check_int_positive("vocab", vocab)
        self.dropout = check_nonnegative("dropout", dropout)
        if self.d_model % self.n_head:
            raise ValueError(f"d_model must be a multiple of n_head, got d_model={d_model}, n_head={n_head}")

    @classmethod
    def gpt2_small(cls, context: int = 1024) -> "GPTConfig":
        return cls(n_layer=12, n_head=12, d_model=768, context=context)


class _Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.fc_out = nn.Linear(4 * cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor, attn_mask: Any = None) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        p = self.dropout if self.training else 0.0
        if attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        else:  # packed documents: a bool (b, 1, t, t) block-causal mask or a FlexAttention BlockMask
            y = packed_attention(q, k, v, attn_mask, dropout_p=p)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.fc_out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """Pre-norm decoder with learned positions and tied input/output embeddings."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos = nn.Embedding(cfg.context, cfg.d_model)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)
        self.head.weight = self.tok.weight
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("fc_out.weight"):
                # GPT-2's scaled init of residual projections.
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx: torch.Tensor, pos: torch.Tensor | None = None, attn_mask: Any = None) -> torch.Tensor:
        t = idx.shape[1]
        if pos is None:
            pos = torch.arange(t, device=idx.device)
        x = self.tok(idx) + self.pos(pos)
        for block in self.blocks:
            x = block(x, attn_mask)
        return self.head(self.ln_f(x))


def default_corpus() -> list[Path]:
    """The ``.py`` files of the running Python's standard library, sorted (tests excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
    files = [p for p in root.rglob("*.py") if not (set(p.relative_to(root).parts[:-1]) & skip)]
    return sorted(files)


def _split_corpus(paths: Sequence[str | Path], val_fraction: float, max_bytes: int | None) -> tuple[list[bytes], list[bytes], list[Path]]:
    """Files' bytes split into (train, val) documents; see ``read_corpus``."""
    files: list[Path] = []
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise FileNotFoundError(f"corpus path does not exist: {path}")
        if path.is_dir():
            files.extend(sorted(q for ext in ("*.py", "*.txt", "*.md") for q in path.rglob(ext)))
        else:
            files.append(path)
    if not files:
        raise ValueError(f"corpus has no text files under {', '.join(map(str, paths))}")
    buckets = 1000
    cut = max(1, round(val_fraction * buckets))
    train: list[bytes] = []
    val: list[bytes] = []
    n_train = 0
    for f in files:
        data = f.read_bytes()
        if not data:
            continue
        is_val = zlib.crc32(f.name.encode() + str(len(data)).encode()) % buckets < cut
        if is_val:
            val.append(data)
        elif max_bytes is None or n_train < max_bytes:
            train.append(data)
            n_train += len(data)
    if not val:  # tiny corpora: hold out the last file's tail
        last = train[-1]
        k = max(1, len(last) // 10)
        train[-1], val = last[:-k], [last[-k:]]
    return train, val, files


def _to_tensor(chunks: list[bytes]) -> torch.Tensor:
    return torch.frombuffer(bytearray(b"\n".join(chunks)), dtype=torch.uint8).clone()


def read_corpus(paths: Sequence[str | Path], val_fraction: float = 0.05, max_bytes: int | None = None) -> tuple[torch.Tensor, torch.Tensor, list[Path]]:
    """Bytes of the corpus split into (train, val) by a hash of each file's path.

    Directories are searched for ``*.py``, ``*.txt`` and ``*.md`` files. The split is by
    file, deterministic, and independent of the file order, so validation text never appears
    in training. ``max_bytes`` caps the training bytes (files taken in sorted order).
    """
    train, val, files = _split_corpus(paths, val_fraction, max_bytes)
    train_t = _to_tensor(train)
    if max_bytes is not None:
        train_t = train_t[:max_bytes]
    return train_t, _to_tensor(val), files


def pack_documents(docs: Sequence[bytes], window: int, method: str = "bfd", max_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """Documents cut into pieces of at most ``window`` bytes and packed into rows of ``window``.

    Returns ``tokens`` (uint8, rows × window), ``doc`` (int32 piece index, -1 on padding),
    ``pos`` (int32 position within the piece) and the packing ``efficiency``. Pieces of one byte have no
    next-byte target and are dropped; ``max_bytes`` caps the total bytes, as in ``read_corpus``.
    """
    pieces: list[bytes] = []
    total = 0
    for d in docs:
        for i in range(0, len(d), window):
            piece = d[i : i + window]
            if max_bytes is not None and total + len(piece) > max_bytes:
                piece = piece[: max_bytes - total]
            if len(piece) >= 2:
                pieces.append(piece)
                total += len(piece)
            if max_bytes is not None and total >= max_bytes:
                break
        if max_bytes is not None and total >= max_bytes:
            break
    if not pieces:
        raise ValueError("corpus has no document of at least 2 bytes to pack")
    rows = pack_sequences([torch.frombuffer(bytearray(x), dtype=torch.uint8) for x in pieces], window, method)
    eff = torch.tensor(rows.efficiency, dtype=torch.float64)
    return {"tokens": rows.tokens, "doc": rows.doc_ids.to(torch.int32), "pos": rows.position_ids.to(torch.int32), "efficiency": eff}


class ByteLM:
    """Byte-level language modelling. A training example is one window of ``context + 1`` bytes.

    The training stream is cut into non-overlapping windows (one epoch = one pass over the
    training bytes); validation uses ``val_windows`` fixed windows. Loss: summed cross-entropy
    over tokens, normalised by the token count (``count_unit = "tokens"``).

    ``packing="bfd"`` or ``"spfhp"`` (``True`` means bfd): each file is a document, cut into
    pieces of at most ``context + 1`` bytes that are packed into rows (``bigbatch.data``,
    Krell et al. 2021); an example is one row. Attention is block-diagonal causal per piece,
    positions restart at each piece, and a piece's last byte predicts nothing, so no byte
    sees or predicts another file. The loss stays a sum over target bytes with their count,
    so the trainer normalises by the global token count whatever the padding per row.
    Validation is unchanged, so packed and unpacked runs report comparable bits per byte.

    ``size="gpt2-small"`` gives 12 layers, 12 heads, width 768 and context 1024 (``context``
    overrides the last); otherwise the shape is ``n_layer``/``n_head``/``d_model``, context 128.
    """

    metric_name = "val_bpb"
    higher_is_better = False
    count_unit = "tokens"

    def __init__(
        self,
        corpus: Sequence[str | Path] | None = None,
        n_layer: int = 2,
        n_head: int = 4,
        d_model: int = 128,
        context: int | None = None,
        max_bytes: int | None = 4_000_000,
        val_windows: int = 256,
        size: str | None = None,
        packing: bool | str = False,
    ) -> None:
        if size == "gpt2-small":
            # GPT-2 small's shape includes its 1024-token context unless the caller sets one.
            self.cfg = GPTConfig.gpt2_small(1024 if context is None else context)
        elif size is None:
            self.cfg = GPTConfig(n_layer=n_layer, n_head=n_head, d_model=d_model, context=128 if context is None else context)
        else:
            raise ValueError(f"size must be one of gpt2-small or unset, got {size!r}")
        self.name = "bytelm"
        paths = list(corpus) if corpus else default_corpus()
        if corpus is None and not paths:
            raise ValueError("the standard library's .py files were not found; pass --corpus PATH")
        train_docs, val_docs, self.files = _split_corpus(paths, 0.05, max_bytes)
        self.train_bytes = _to_tensor(train_docs)[:max_bytes] if max_bytes is not None else _to_tensor(train_docs)
        self.val_bytes = _to_tensor(val_docs)
        w = self.cfg.context + 1
        self.packing = None if packing is False or packing is None else ("bfd" if packing is True else check_choice("packing method", str(packing), ["bfd", "spfhp"]))
        self.packed: dict[str, torch.Tensor] | None = None
        self.packing_efficiency = 1.0
        if self.packing is not None:
            self.packed = pack_documents(train_docs, w, self.packing, max_bytes)
            self.packing_efficiency = float(self.packed.pop("efficiency"))
            self.dataset_size = len(self.packed["tokens"])
        else:
            self.dataset_size = len(self.train_bytes) // w
        if self.dataset_size < 1:
            raise ValueError(f"corpus too small: {len(self.train_bytes)} training bytes for context {self.cfg.context}")
        n_val = max(1, min(check_int_positive("val_windows", val_windows), len(self.val_bytes) // w))
        if len(self.val_bytes) < w:
            raise ValueError(f"validation split too small ({len(self.val_bytes)} bytes) for context {self.cfg.context}")
        starts = torch.linspace(0, len(self.val_bytes) - w, n_val).long()
        self.val = torch.stack([self.val_bytes[s : s + w] for s in starts.tolist()]).long()
        self.defaults = WorkloadDefaults(
            batch_size=64,
            lr=2e-3,
            optimizer="adamw",
            weight_decay=0.1,
            warmup_samples=64 * 20,
            budget_samples=64 * 300,
            extra={"betas": (0.9, 0.95)},
        )

    def build_model(self) -> nn.Module:
        return GPT(self.cfg)

    def sampler(self, seed: int) -> EpochSampler:
        return EpochSampler(self.dataset_size, seed)

    def fetch(self, indices: torch.Tensor) -> Batch:
        if self.packed is not None:
            doc = self.packed["doc"][indices]
            x, y = shift_targets(self.packed["tokens"][indices].long(), doc)
            return {"x": x, "y": y, "pos": self.packed["pos"][indices, :-1].long(), "doc": doc[:, :-1]}
        w = self.cfg.context + 1
        offs = indices[:, None] * w + torch.arange(w)[None]
        chunk = self.train_bytes[offs].long()
        return {"x": chunk[:, :-1], "y": chunk[:, 1:]}

    def count(self, batch: Batch) -> int:
        return int((batch["y"] >= 0).sum())

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        if "doc" in batch:  # packed rows: no attention across documents
            logits = model(batch["x"], pos=batch["pos"], attn_mask=block_causal_mask(batch["doc"]))
        else:
            logits = model(batch["x"])
        y = batch["y"]
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum", ignore_index=-100)
        return loss, (y >= 0).sum()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device) -> float:
        total, n = 0.0, 0
        for i in range(0, len(self.val), 64):
            chunk = self.val[i : i + 64].to(device)
            logits = model(chunk[:, :-1])
            total += float(F.cross_entropy(logits.float().flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum"))
            n += chunk[:, 1:].numel()
        return total / n / math.log(2)
