"""reconstruct/attention.py: the value/output alternation on pruned attention, through a prune."""

from __future__ import annotations

import pytest
import torch
from conftest import logits, tiny_model, windows

import structprune as sp


def test_attention_alternation_never_raises_the_block_error(family):
    """--reconstruction admm alternates value and output projections on pruned attention: the kept
    error is at most the one-shot least-squares error, and it falls on every family."""
    model = tiny_model(family)
    cfg = sp.PruneConfig.from_flat(sparsity=0.4, device="cpu", nsamples=8, rho=1.0, reconstruction="admm", admm_iters=3,
                         admm_attn_steps=5)
    res = sp.prune(model, cfg, calib_windows=windows(8), progress=False)
    fits = [lp.recon["attn"] for lp in res.plan.layers if "attn" in lp.recon]
    assert fits, "no layer lost heads"
    for f in fits:
        assert f["admm_error"] <= f["admm_error_start"] * (1 + 1e-9)
        assert f["admm_error_start"] == pytest.approx(f["error"], rel=1e-3)  # iterate 0 is the one-shot re-fit
    assert any(f["admm_error"] < f["admm_error_start"] * 0.999 for f in fits)
    assert torch.isfinite(logits(res.model, windows(2, seed=4))).all()
    off = sp.prune(model, cfg.with_flat(admm_attn_steps=0), calib_windows=windows(8), progress=False)
    assert all("admm_error" not in lp.recon.get("attn", {}) for lp in off.plan.layers)
