"""Allocation: how much of each prunable module (one layer's attention or MLP) to keep.

Pure functions: per-module parameter counts (and importances) in, kept fractions out.
A module is one (layer, kind) pair, kind in {"attn", "mlp"}. A kept fraction is the
fraction of that module's prunable linear weight parameters that survive. The budget is
met when sum(kept_m * params_m) == (1 - sparsity) * sum(params_m) over all modules.

Rules (derivations and the choices made where the paper is silent: docs/method.md):
    uniform           every module keeps 1 - sparsity
    softmax_energy    r_m = r L softmax(-I_m / T)          (STRUPRUNE Algorithm 1)
    softmax_modular   separate softmaxes for attention and MLP, ratio rho, depth decay gamma
                      (Algorithm 2)
    closed_form       retention = mean_j clip(s_j, 0, 1), s_j from the relaxed-mask
                      Lagrangian of the layer's reconstruction problem (Algorithm 4)
    sensitivity_split minimise the summed measured loss increases (one curve per module,
                      measured with the re-fit: sensitivity.py) under the budget
Every rule ends in `meet_budget`, which clips to [1 - max_sparsity, 1 - min_sparsity] and
redistributes the excess so the budget holds to float precision.
`search_temperature` picks T for the softmax rules from a proxy on calibration data.

Where each part lives:
    projection.py    meet_budget: kept fractions onto the budget
    rules.py         uniform, kind_split, softmax_energy, softmax_modular, sensitivity_split
    closed_form.py   unit_contributions, closed_form_unit_scores, closed_form
    search.py        search_temperature
    budget.py        the model's budget: parameter counts per module, reachable sparsity, and
                     the `Budget` that turns kept fractions into per-layer targets
"""

from .closed_form import closed_form, closed_form_unit_scores, relaxed_mask, unit_contributions
from .projection import BUDGET_METHODS, meet_budget
from .rules import (
    KINDS,
    depth_factor,
    kind_split,
    normalise_importance,
    score_scale,
    sensitivity_split,
    softmax_energy,
    softmax_modular,
    uniform,
)
from .search import SEARCH_MODES, search_temperature

__all__ = [
    "BUDGET_METHODS", "KINDS", "SEARCH_MODES", "closed_form", "closed_form_unit_scores", "depth_factor", "kind_split",
    "meet_budget", "normalise_importance", "relaxed_mask", "score_scale", "search_temperature", "sensitivity_split",
    "softmax_energy", "softmax_modular", "uniform", "unit_contributions",
]
