"""An optimizer defined outside the bigbatch package, for tests/test_optim_registry.py.

Signum: signSGD with momentum (Bernstein et al. 2018, "signSGD: Compressed Optimisation for
Non-Convex Problems", Algorithm 3): ``m ← β m + (1−β)(g + λw)``; ``w ← w − lr · sign(m)``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch


class Signum(torch.optim.Optimizer):
    """signSGD with momentum (Bernstein et al. 2018, Alg. 3)."""

    last: "Signum | None" = None
    """The most recently built instance (lets a test look at what the trainer built)."""

    def __init__(self, params: Iterable, lr: float = 1e-3, momentum: float = 0.9, weight_decay: float = 0.0) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        Signum.last = self

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] else p.grad
                st = self.state[p]
                if "momentum_buffer" not in st:
                    st["momentum_buffer"] = torch.zeros_like(p)
                buf = st["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(d, alpha=1 - group["momentum"])
                p.add_(buf.sign(), alpha=-group["lr"])
        return loss


def not_an_optimizer() -> None:
    """A module attribute that is no optimizer (for the error test)."""
