"""``bigbatch study``: measure a workload's critical batch size (Shallue et al. 2018; McCandlish et al. 2018).

A study trains the workload at several batch sizes (each at its best learning rate from a small
grid, over one or more seeds), records the steps and examples needed to reach a target metric,
fits ``S(B) = S_min(1 + B_noise/B)`` and ``E(B) = E_min(1 + B/B_noise)``, and writes
``results.json``, PNG plots and a self-contained ``report.html``::

    from bigbatch.study import StudyConfig, run_study
    res = run_study(StudyConfig(out="runs/study"))
    print(res["b_crit"], res["b_crit_interval"])
"""

from bigbatch.study.cells import Cell, run_cell
from bigbatch.study.config import StudyConfig
from bigbatch.study.fit import (
    CriticalBatchFit,
    bootstrap_critical_batch,
    fit_critical_batch,
    regime,
    regime_bounds,
    samples_model,
    steps_model,
    undetermined_reason,
)
from bigbatch.study.runner import PRESETS, load_results, plan_cells, resolve_study, run_study

__all__ = [
    "StudyConfig",
    "run_study",
    "resolve_study",
    "plan_cells",
    "load_results",
    "PRESETS",
    "Cell",
    "run_cell",
    "CriticalBatchFit",
    "fit_critical_batch",
    "bootstrap_critical_batch",
    "steps_model",
    "samples_model",
    "regime",
    "regime_bounds",
    "undetermined_reason",
]
