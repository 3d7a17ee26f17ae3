"""Every named method runs end to end on a tiny model of every family and meets the sparsity."""

from __future__ import annotations

import pytest
import torch
from conftest import logits, tiny_model, windows

import structprune as sp
from structprune.methods import METHODS, method_config


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_end_to_end_meets_sparsity(family, method):
    model = tiny_model(family)
    res = sp.prune(model, method_config(method, sparsity=0.3, device="cpu", nsamples=8), calib_windows=windows(8),
                   progress=False)
    assert abs(res.plan.actual_sparsity - 0.3) < 0.03, res.plan.actual_sparsity
    assert torch.isfinite(logits(res.model, windows(2, seed=4))).all()
    assert res.plan.decoder_params_pruned < res.plan.decoder_params_dense


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ValueError, match="flap"):
        method_config("nope")
