"""Reconstruction-aware unit selection (greedy structured OBS) against exact references."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import logits, tiny_model, windows

import structprune as sp
from structprune.config import PruneConfig
from structprune.reconstruct.lstsq import refit_consumer
from structprune.stats import GramAccumulator
from structprune.selection import obs_select_columns, obs_unit_costs

DAMP = 1e-8


def _problem(seed: int = 0, n: int = 10, out: int = 5, tokens: int = 300):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=g, dtype=torch.float64)
    x[:, 4] = x[:, 2] + 0.01 * torch.randn(tokens, generator=g, dtype=torch.float64)  # near-duplicates
    x[:, 7] = 3 * x[:, 1] - x[:, 0] + 0.05 * torch.randn(tokens, generator=g, dtype=torch.float64)
    w = torch.randn(out, n, generator=g, dtype=torch.float64)
    acc = GramAccumulator(n)
    acc.add_batch(x)
    return w, acc


def _refit_error(w, acc, keep) -> float:
    return refit_consumer(w, None, acc, torch.as_tensor(keep), DAMP)[2]["error"]


@pytest.mark.parametrize("keep", [7, 5, 3])
def test_obs_matches_brute_force_and_beats_top_scores(keep):
    w, acc = _problem()
    n = w.shape[1]
    chosen = obs_select_columns(w, acc.gram, keep, DAMP, steps=n)
    assert chosen.numel() == keep and torch.equal(chosen, chosen.sort().values)
    best = min(_refit_error(w, acc, list(c)) for c in itertools.combinations(range(n), keep))
    top = (w.norm(dim=0) * acc.input_norm).topk(keep).indices
    assert _refit_error(w, acc, chosen) <= best * (1 + 1e-6) + 1e-9
    assert _refit_error(w, acc, chosen) <= _refit_error(w, acc, top) + 1e-9


@pytest.mark.parametrize("size", [1, 3])
def test_unit_costs_are_exact_single_removal_errors(size):
    """The OBS cost of a unit (a column, or a head's block) is the re-fit error of removing it alone."""
    w, acc = _problem(seed=2, n=12)
    costs = obs_unit_costs(w, acc.gram, size, DAMP)
    for h in range(12 // size):
        keep = [c for c in range(12) if c // size != h]
        assert float(costs[h]) / acc.count == pytest.approx(_refit_error(w, acc, keep), rel=1e-3)  # sum vs mean


def test_dead_and_constant_columns_never_give_nan():
    x = torch.randn(64, 8, dtype=torch.float64)
    x[:, 1] = 0  # dead
    x[:, 3] = 2.5  # constant (collinear with the bias column)
    x[:, 5] = x[:, 6]  # exact duplicate
    acc = GramAccumulator(8)
    acc.add_batch(x)
    w = torch.randn(4, 8, dtype=torch.float64)
    for bias in (None, torch.randn(4, dtype=torch.float64)):
        chosen = obs_select_columns(w, acc.gram, 5, 0.01, bias=bias)
        assert chosen.numel() == 5 and 1 not in chosen.tolist()
        assert torch.isfinite(obs_unit_costs(w, acc.gram, 2, 0.01, bias=bias)).all()


def test_obs_selection_needs_a_refit():
    with pytest.raises(ValueError, match="selection 'obs'"):
        PruneConfig.from_flat(selection="obs", reconstruction="none")


@pytest.mark.parametrize("rho", [0.0, 1.0])
def test_obs_pipeline_meets_sparsity_on_every_family(family, rho):
    model = tiny_model(family)
    cfg = PruneConfig.from_flat(sparsity=0.3, device="cpu", nsamples=8, selection="obs", allocation="uniform",
                                rho=rho)
    res = sp.prune(model, cfg, calib_windows=windows(8), progress=False)
    assert abs(res.plan.actual_sparsity - 0.3) < 0.03, res.plan.actual_sparsity
    assert torch.isfinite(logits(res.model, windows(2, seed=4))).all()
    base = sp.prune(model, cfg.replace(selection="score"), calib_windows=windows(8), progress=False)
    # layer 0 sees the same inputs under both: the OBS-chosen neurons re-fit at least as well
    assert res.plan.layers[0].recon["mlp"]["error"] <= base.plan.layers[0].recon["mlp"]["error"] * 1.001
