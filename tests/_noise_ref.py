"""float64 references for the noise scale of one step, from each micro-batch's own gradient.

Micro-batch ``j`` of a step holds ``n_j`` loss units with summed gradient ``S_j`` and was back-propagated
with factor ``a_j`` on its summed loss; the step's gradient is ``Σ a_j S_j`` and
``E|Σ a_j S_j|² = (Σ a_j n_j)²|G|² + (Σ a_j² n_j) tr Σ`` (McCandlish et al. 2018, App. A.1, with unequal
factors). Written from that equation, independently of ``bigbatch.noise``'s sums.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _sq(vecs: Sequence[torch.Tensor]) -> float:
    return sum(float(v.double().pow(2).sum()) for v in vecs)


def step_inputs_reference(S: Sequence[Sequence[torch.Tensor]], n: Sequence[float], a: Sequence[float]
                          ) -> tuple[float, float, float, float]:
    """``(|G_b|², |G_B|², b, B)`` of a one-process step whose small readings are the micro-batches:
    ``|a_j S_j|²/(a_j n_j)²`` averaged, ``b`` their harmonic-mean count, the big reading
    ``|Σ a_j S_j|²/(Σ a_j n_j)²`` at the effective batch ``B = (Σ a_j n_j)²/Σ a_j² n_j``."""
    k, n_params = len(S), len(S[0])
    small = sum(_sq(S[j]) / float(n[j]) ** 2 for j in range(k)) / k
    b = k / sum(1.0 / float(n[j]) for j in range(k))
    g = [sum(float(a[j]) * S[j][i].double() for j in range(k)) for i in range(n_params)]
    A = sum(float(a[j]) * float(n[j]) for j in range(k))
    Q = sum(float(a[j]) ** 2 * float(n[j]) for j in range(k))
    return small, _sq(g) / A**2, b, A * A / Q


def ema_reference(steps: Sequence[tuple[float, float, float, float]], beta: float) -> list[tuple[float, float, float]]:
    """Bias-corrected EMAs ``(b_simple, |G|², tr Σ)`` after each step of ``steps`` (``step_inputs_reference`` tuples)."""
    from bigbatch.noise import unbiased_estimates

    eg = et = 0.0
    out = []
    for t, (small, big, b, B) in enumerate(steps, 1):
        g2, tr = unbiased_estimates(small, big, b, B)
        eg, et = beta * eg + (1 - beta) * g2, beta * et + (1 - beta) * tr
        c = 1 - beta**t
        out.append((et / eg, eg / c, et / c))
    return out
