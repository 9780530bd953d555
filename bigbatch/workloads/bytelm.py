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
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bigbatch._checks import check_int_positive, check_nonnegative
from bigbatch.workloads.base import Batch, EpochSampler, WorkloadDefaults

__all__ = ["ByteLM", "GPT", "GPTConfig", "read_corpus"]


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

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        p = self.dropout if self.training else 0.0
        if attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        else:  # block-diagonal causal mask (packed documents), shape (b, 1, t, t) or (t, t)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
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

    def forward(self, idx: torch.Tensor, pos: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
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


def read_corpus(paths: Sequence[str | Path], val_fraction: float = 0.05, max_bytes: int | None = None) -> tuple[torch.Tensor, torch.Tensor, list[Path]]:
    """Bytes of the corpus split into (train, val) by a hash of each file's path.

    Directories are searched for ``*.py``, ``*.txt`` and ``*.md`` files. The split is by
    file, deterministic, and independent of the file order, so validation text never appears
    in training. ``max_bytes`` caps the training bytes (files taken in sorted order).
    """
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
    to_tensor = lambda chunks: torch.frombuffer(bytearray(b"\n".join(chunks)), dtype=torch.uint8).clone()  # noqa: E731
    train_t = to_tensor(train)
    if max_bytes is not None:
        train_t = train_t[:max_bytes]
    return train_t, to_tensor(val), files


class ByteLM:
    """Byte-level language modelling. A training example is one window of ``context + 1`` bytes.

    The training stream is cut into non-overlapping windows (one epoch = one pass over the
    training bytes); validation uses ``val_windows`` fixed windows. Loss: summed cross-entropy
    over tokens, normalised by the token count (``count_unit = "tokens"``).
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
        context: int = 128,
        max_bytes: int | None = 4_000_000,
        val_windows: int = 256,
        size: str | None = None,
    ) -> None:
        if size == "gpt2-small":
            self.cfg = GPTConfig.gpt2_small(context)
        elif size is None:
            self.cfg = GPTConfig(n_layer=n_layer, n_head=n_head, d_model=d_model, context=context)
        else:
            raise ValueError(f"size must be one of gpt2-small or unset, got {size!r}")
        self.name = "bytelm"
        paths = list(corpus) if corpus else default_corpus()
        if corpus is None and not paths:
            raise ValueError("the standard library's .py files were not found; pass --corpus PATH")
        self.train_bytes, self.val_bytes, self.files = read_corpus(paths, max_bytes=max_bytes)
        w = self.cfg.context + 1
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
        w = self.cfg.context + 1
        offs = indices[:, None] * w + torch.arange(w)[None]
        chunk = self.train_bytes[offs].long()
        return {"x": chunk[:, :-1], "y": chunk[:, 1:]}

    def count(self, batch: Batch) -> int:
        return int((batch["y"] >= 0).sum())

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
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
