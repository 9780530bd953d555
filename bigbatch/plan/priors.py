"""Published estimates of the optimal batch size and learning rate, before any study.

A study (``bigbatch study``) measures B_crit for *your* model and data. Before one has been run,
the published fits below give a starting point from the model size N (non-embedding
parameters), the training tokens D or the loss the run is meant to reach; one rule (token
horizons) moves an LR tuned on a shorter run to the run's horizon instead. Each :class:`Prior`
records its formula, the paper and place it comes from, the unit of its output, the conditions
it was fitted under, and the range of inputs it was fitted on; :func:`estimate_priors` evaluates
every prior on the inputs given and says which inputs fall outside that range.

Only fits whose constants could be checked are listed: against the paper itself, in independent
places that agree (the token-horizon exponent, whose paper text was not reachable), or against the
authors' released data (Zhang et al.'s critical batch size along the Chinchilla path: the reviews of
the paper quote 93.20 * N^0.47 without units; the authors' notebook gives N in millions and B* in
sequences of 512, and its steps-to-target data reproduce the five fitted CBS, tests/test_plan_priors.py).
The numbers are the papers'; they are not re-fitted here (docs/plan.md, "Priors before any study").
Two more papers (Shuai et al. 2024, Su et al. 2024) are left out until their constants and units can
be read from their text (docs/plan.md, "Left out").

A fitted range can also bound a ratio of two inputs (``FittedRange(per=...)``): a fit made only
along D = 20 N flags a --tokens far from that path.

Related, but not a prior for a number: for Adam-style optimizers the best LR peaks at
B = B_noise and falls beyond it (Li et al. 2024, "Surge Phenomenon", Eq. 2 and 15); that
is :func:`bigbatch.scaling.surge_lr_factor`, and ``bigbatch scale --b-noise`` warns about it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from bigbatch._checks import check_int_positive, check_positive

__all__ = ["FittedRange", "Prior", "Estimate", "PRIORS", "INPUTS", "estimate_priors", "SURGE_NOTE"]

INPUTS: dict[str, tuple[str, str]] = {
    "params": ("--params", "non-embedding parameters"),
    "tokens": ("--tokens", "training tokens"),
    "target_loss": ("--target-loss", "C4 loss the run should reach"),
    "ref_lr": ("--ref-lr", "peak LR tuned on a shorter run"),
    "ref_tokens": ("--ref-tokens", "training tokens of the run --ref-lr was tuned on"),
}
"""Input name → (its flag, what it is)."""


@dataclass(frozen=True, slots=True)
class FittedRange:
    """The span of one input that a fit saw; ``None`` for an end the paper's text does not fix.

    With ``per`` set the span is of the ratio ``input / per`` (e.g. training tokens per parameter,
    for a fit made only along one path through (N, D)); it is checked when both inputs are given."""

    input: str
    """A key of :data:`INPUTS` (``params``, ``tokens``, ``target_loss``, ``ref_tokens``)."""
    low: float | None
    high: float | None
    what: str
    """Where the range comes from, in a few words."""
    per: str | None = None
    """A key of :data:`INPUTS` that ``input`` is divided by, or None for ``input`` itself."""

    def value(self, inputs: Mapping[str, float | None]) -> float | None:
        """The checked quantity from the inputs given (None when one it needs is missing)."""
        v = inputs.get(self.input)
        if v is None:
            return None
        if self.per is None:
            return float(v)
        d = inputs.get(self.per)
        return None if d is None else float(v) / float(d)

    def label(self) -> tuple[str, str]:
        """(the flag or flags, what the quantity is)."""
        flag, unit = INPUTS[self.input]
        if self.per is None:
            return flag, unit
        per_flag, per_unit = INPUTS[self.per]
        return f"{flag} / {per_flag}", f"{unit} / {per_unit}"

    def outside(self, value: float) -> str | None:
        """A sentence when ``value`` is outside the range, else None."""
        flag, unit = self.label()
        if self.low is not None and value < self.low:
            return f"{flag} {value:.3g} is below the fitted range ({self.text()} {unit}; {self.what})"
        if self.high is not None and value > self.high:
            return f"{flag} {value:.3g} is above the fitted range ({self.text()} {unit}; {self.what})"
        return None

    def text(self) -> str:
        if self.low is not None and self.high is not None:
            return f"{self.low:.3g} to {self.high:.3g}"
        if self.high is not None:
            return f"up to {self.high:.3g}"
        return f"from {self.low:.3g}"


@dataclass(frozen=True, slots=True)
class Prior:
    """One published fit for the optimal batch size or learning rate."""

    key: str
    quantity: str
    """``batch_size`` or ``lr``."""
    name: str
    """Short name, e.g. ``Step Law``."""
    source: str
    """Paper (authors, year, title, arXiv id) and where in it: equation, section, table or figure."""
    formula: str
    unit: str
    """What the number is: tokens per optimizer step, or which LR for which optimizer."""
    conditions: str
    """Optimizer, architecture, schedule and data the fit was made under."""
    needs: tuple[str, ...]
    """The inputs the formula reads (keys of :data:`INPUTS`)."""
    ranges: tuple[FittedRange, ...]
    fn: Callable[[Mapping[str, float]], float]
    notes: tuple[str, ...] = ()

    def __call__(self, **inputs: float) -> float:
        missing = [k for k in self.needs if inputs.get(k) is None]
        if missing:
            raise ValueError(f"{self.key} needs {', '.join(INPUTS[k][0] for k in missing)}")
        return self.fn(inputs)


@dataclass(frozen=True, slots=True)
class Estimate:
    """A prior evaluated on the given inputs (``value`` None when an input it needs is missing)."""

    prior: Prior
    value: float | None
    sequences: float | None
    """For a batch in tokens: ``value / seq_len`` when a sequence length was given."""
    outside: tuple[str, ...]
    missing: tuple[str, ...]

    def to_dict(self, seq_len: int | None = None) -> dict[str, Any]:
        p = self.prior
        return {
            "key": p.key, "quantity": p.quantity, "name": p.name, "value": self.value, "unit": p.unit,
            "sequences": self.sequences, "seq_len": seq_len if self.sequences is not None else None,
            "formula": p.formula, "source": p.source, "conditions": p.conditions,
            "fitted_range": [{"input": r.input, "per": r.per, "low": r.low, "high": r.high, "what": r.what}
                             for r in p.ranges],
            "outside_range": list(self.outside), "in_range": self.value is not None and not self.outside,
            "missing_inputs": [INPUTS[k][0] for k in self.missing], "notes": list(p.notes),
        }


# -- the fits ----------------------------------------------------------------------------------
# Step Law (Li et al. 2025): optimal LR and batch from a grid search over (LR, batch) at every
# (N, D); the batch is in tokens (the authors' fitting code multiplies sequences by the sequence
# length before fitting, and their prediction tool divides by it to give sequences).
_STEP_SOURCE = ("Li et al. 2025, \"Predictable Scale: Part I — Optimal Hyperparameter Scaling Law in Large "
                "Language Model Pretraining\" (Step Law), arXiv:2503.04715: the Step Law fit")
_STEP_CONDITIONS = ("AdamW; decoder-only transformers with pre-RMSNorm, SwiGLU and ALiBi (dense, also checked on "
                    "MoE); LR decayed to a fixed final value of 1e-5; N = non-embedding parameters, D = training "
                    "tokens; optimum of a grid search over LR and batch size at each (N, D)")
_STEP_RANGES = (
    FittedRange("params", 5.9e7, 1.0e9, "models of 59M to 1B parameters"),
    FittedRange("tokens", None, 1.0e11, "largest run: the held-out 1B-parameter, 100B-token test point"),
)

STEP_LAW_BATCH = Prior(
    key="step-law-batch", quantity="batch_size", name="Step Law", source=_STEP_SOURCE,
    formula="B = 0.58 * D^0.571", unit="tokens per optimizer step", conditions=_STEP_CONDITIONS,
    needs=("tokens",), ranges=_STEP_RANGES, fn=lambda x: 0.58 * x["tokens"] ** 0.571,
    notes=("fitted on D alone: the paper finds the optimal batch primarily dependent on D, not on N",),
)
STEP_LAW_LR = Prior(
    key="step-law-lr", quantity="lr", name="Step Law", source=_STEP_SOURCE,
    formula="eta = 1.79 * N^-0.713 * D^0.307", unit="peak LR of AdamW", conditions=_STEP_CONDITIONS,
    needs=("params", "tokens"), ranges=_STEP_RANGES,
    fn=lambda x: 1.79 * x["params"] ** -0.713 * x["tokens"] ** 0.307,
    notes=("the LR rises with D at fixed N here; fits made with a horizon-independent schedule "
           "(e.g. WSD) may differ",),
)

# MiniCPM (Hu et al. 2024): batch as a function of the C4 loss to reach; "optimal" minimises the
# tokens spent to reach that loss on a fixed number of GPUs (their App. A.2), not Kaplan's trade-off.
_MINICPM = "Hu et al. 2024, \"MiniCPM: Unveiling the Potential of Small Language Models\", arXiv:2404.06395"
MINICPM_BATCH = Prior(
    key="minicpm-batch", quantity="batch_size", name="MiniCPM", source=f"{_MINICPM}, §3.2 (Figure 2)",
    formula="bs = 1.21e9 / L^6.24", unit="tokens per optimizer step",
    conditions=("Adam; MiniCPM's Tensor Program (muP) width and depth scaling (their Table 7); LR 0.01, cosine "
                "schedule; L = loss on C4 (MiniCPM tokenizer); optimal = fewest tokens to reach L on a fixed "
                "number of GPUs (their App. A.2)"),
    needs=("target_loss",),
    ranges=(FittedRange("params", 9e6, 1.66e8, "models of 0.009B, 0.036B and 0.17B, 6 batch sizes each"),),
    fn=lambda x: 1.21e9 / x["target_loss"] ** 6.24,
    notes=("the paper trained MiniCPM-2.4B at 3.93M tokens per batch (§6.2)",
           "the C4 losses the fit spans are shown only in the paper's Figure 2; no loss range is checked here"),
)
MINICPM_LR = Prior(
    key="minicpm-lr", quantity="lr", name="MiniCPM", source=f"{_MINICPM}, §3.3 (Figure 3)",
    formula="eta = 0.01, the same at every N", unit="base LR of Adam under MiniCPM's muP (2-D tensors get 1/(d_m/d_base) of it)",
    conditions=("Adam with MiniCPM's Tensor Program parameterization (Table 7: scale_emb 12, scale_depth 1.4, "
                "init_std 0.1); the optimum stayed near 0.01 from 0.04B to 0.5B and was confirmed at 2.1B; "
                "without muP this number does not apply"),
    needs=(), ranges=(FittedRange("params", 4e7, 2.1e9, "swept at 0.04B-0.5B, checked at 2.1B"),),
    fn=lambda x: 0.01,
)

# Critical batch size (Zhang et al. 2024), Chinchilla path: per model, steps to a target C4 loss at
# batches of 64 to 16,384 sequences are fitted as S(B) = a + b/B (least squares on log S), and the
# CBS is the batch whose steps exceed linear scaling from B = 256 by 20%: a + b/B = 1.2 (a + b/256) 256/B,
# so B* = b/(5a) + 1.2 * 256. The five CBS are then fitted as 93.20 * N^0.47. Neither the abstract nor
# the reviews that quote the law state its units; the authors' notebook (plots/chinchilla.ipynb of
# github.com/hlzhang109/critical-batch-size) does: N in millions of parameters ("Model Size (in M)")
# and B* in sequences of 512 tokens; tests/test_plan_priors.py recomputes the five CBS from its data.
ZHANG_SEQ_LEN = 512
"""Context length of every run behind the Zhang et al. fit; its B* counts sequences of this length."""

ZHANG_CBS = Prior(
    key="zhang-cbs-chinchilla", quantity="batch_size", name="Critical batch size (Chinchilla path)",
    source=("Zhang et al. 2024, \"How Does Critical Batch Size Scale in Pre-training?\" (ICLR 2025), "
            "arXiv:2410.21676: the fit of the critical batch size against model size along the Chinchilla path "
            "(B* = 93.20 * N^0.47, N in millions, B* in sequences of 512 tokens); units from the authors' "
            "notebook plots/chinchilla.ipynb (github.com/hlzhang109/critical-batch-size), whose released "
            "steps-to-target data reproduce the five fitted CBS"),
    formula="B* = 512 * 93.20 * (N / 1e6)^0.47", unit="tokens per optimizer step",
    conditions=("AdamW without weight decay (beta1 0.9; beta2 and the weight-averaging decay tuned per batch), "
                "constant LR after warmup with exponential weight averaging, grad-norm clip 1.0; OLMo-style "
                "decoder transformers; C4 (GPT-NeoX-20B tokenizer), context 512; N = non-embedding parameters "
                "(85M = 12 layers of width 768); model and data grown together, D = 20 N tokens; target = one "
                "C4 validation loss per model (3.42 at 85M to 2.736 at 1.2B), which batch 256 reaches in about "
                "20 N tokens; CBS = the batch whose steps to it exceed linear scaling from batch 256 by 20%"),
    needs=("params",),
    ranges=(FittedRange("params", 8.5e7, 1.2e9, "models of 85M, 151M, 302M, 604M and 1.2B parameters"),
            FittedRange("tokens", 10.0, 40.0, "Chinchilla path only: every run trains on about 20 tokens per "
                        "parameter; this law holds where D grows with N", per="params")),
    fn=lambda x: ZHANG_SEQ_LEN * 93.20 * (x["params"] / 1e6) ** 0.47,
    notes=("this CBS is where the steps exceed perfect linear scaling from batch 256 by 20%, not McCandlish "
           "et al.'s B_crit = B_noise (the knee of S(B) = S_min (1 + B_noise / B)) that a study measures: on "
           "that same curve B* = 0.2 B_noise + 1.2 x 256, a quarter to a third of B_noise for the paper's models",
           "fitted along the Chinchilla path (D = 20 N), where N and D grow together: the paper finds the CBS "
           "depends mainly on D rather than N, so this law does not say how it moves with D at a fixed model; "
           "--tokens more than 2x away from 20 x --params is flagged",
           "the paper's quoted constants; the authors' notebook fit is 93.197 * N^0.4683, within 2% at 85M-1.2B",
           "fitted at context 512: the tokens per step are 512 x B*; at another --seq-len the sequences column "
           "assumes the critical batch is a number of tokens, which this fit does not test"),
)

# Token horizons (Bjorck et al. 2024): at a fixed model the optimal LR falls with the training
# horizon as LR*(D) = B * D^-beta. The paper fits B and beta per model size and gives practitioners
# beta = 0.32 with B taken from an LR tuned at a shorter horizon. Only that exponent is used here:
# its joint fit in N and D (LR* = C N^-alpha D^-beta) is left out, because its constant C could not be
# checked against the paper's text (docs/plan.md, "Left out").
HORIZON_BETA = 0.32
"""Exponent of the token-horizon rule of thumb (Bjorck et al. 2024): LR* ∝ D^-0.32."""

TOKEN_HORIZON_LR = Prior(
    key="token-horizon-lr", quantity="lr", name="Token horizons",
    source=("Bjorck et al. 2024, \"Scaling Optimal LR Across Token Horizons\" (ICLR 2025), arXiv:2409.19913: "
            "the rule of thumb LR*(D) = B * D^-beta with beta = 0.32, B from an LR tuned at a shorter horizon"),
    formula="eta = ref_lr * (D / ref_tokens)^-0.32",
    unit="peak LR, for the optimizer and schedule of the run --ref-lr was tuned on",
    conditions=("AdamW; GPT-3-style decoder transformers (also checked on LLaMA-1-style models and under muP); "
                "a transfer along the token horizon only: same model, batch size and schedule shape as the "
                "reference run, whose LR must be the tuned optimum at --ref-tokens"),
    needs=("tokens", "ref_lr", "ref_tokens"),
    ranges=(FittedRange("params", None, 2.7e9, "largest model in the paper's runs: 2.7B parameters"),
            FittedRange("tokens", None, 8e11, "longest horizon in the paper's runs: 800B tokens"),
            FittedRange("ref_tokens", None, 8e11, "longest horizon in the paper's runs: 800B tokens")),
    fn=lambda x: x["ref_lr"] * (x["tokens"] / x["ref_tokens"]) ** -HORIZON_BETA,
    notes=("a transfer rule, not an absolute estimate: it moves an LR tuned at --ref-tokens to --tokens",
           "the paper fits beta per model size and finds it varies with size; 0.32 is the value it recommends",
           "the sign disagrees with the Step Law's LR, which rises with D: there the batch is re-optimised "
           "with D, here it is held fixed"),
)

PRIORS: tuple[Prior, ...] = (STEP_LAW_BATCH, MINICPM_BATCH, ZHANG_CBS, STEP_LAW_LR, MINICPM_LR, TOKEN_HORIZON_LR)
"""Every prior, batch sizes first."""

SURGE_NOTE = ("Adam-style optimizers: the best LR peaks at B = B_noise and falls for larger batches (Li et al. "
              "2024, \"Surge Phenomenon in Optimal Learning Rate and Batch Size Scaling\", arXiv:2405.14578, "
              "Eq. 2 and 15); `bigbatch scale --b-noise B` warns when sqrt scaling goes past it")


def estimate_priors(
    *,
    params: float | None = None,
    tokens: float | None = None,
    target_loss: float | None = None,
    seq_len: int | None = None,
    ref_lr: float | None = None,
    ref_tokens: float | None = None,
) -> list[Estimate]:
    """Every prior of :data:`PRIORS` on the given inputs; ValueError naming the field on bad input.

    ``ref_lr``/``ref_tokens`` (given together) are an LR tuned on a run of ``ref_tokens`` tokens, for the
    priors that transfer an LR along the token horizon rather than estimate one from nothing."""
    inputs = {"params": params, "tokens": tokens, "target_loss": target_loss, "ref_lr": ref_lr,
              "ref_tokens": ref_tokens}
    for name, v in inputs.items():
        if v is not None:
            check_positive(name, v)
    if seq_len is not None:
        check_int_positive("seq_len", seq_len)
    if params is None and tokens is None and target_loss is None:
        raise ValueError("priors need --params N, --tokens D or --target-loss L")
    if (ref_lr is None) != (ref_tokens is None):
        raise ValueError("--ref-lr and --ref-tokens go together: the LR tuned on a shorter run and that run's tokens")
    out = []
    for p in PRIORS:
        missing = tuple(k for k in p.needs if inputs[k] is None)
        value = None if missing else p(**{k: v for k, v in inputs.items() if v is not None})
        outside = tuple(m for r in p.ranges for v in [r.value(inputs)] if v is not None
                        for m in [r.outside(v)] if m)
        seqs = value / seq_len if (value is not None and seq_len and p.unit.startswith("tokens")) else None
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{p.key}: the formula overflowed for these inputs")
        out.append(Estimate(p, value, seqs, outside, missing))
    return out
