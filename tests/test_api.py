"""api.py: the one entry point's own work: holding back windows for the rules that search."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import windows

import structprune as sp


def test_split_holdout_holds_back_the_last_eighth():
    from structprune.api import split_holdout

    cfg = sp.PruneConfig.from_flat(device="cpu")
    ids = windows(17)
    calib, held, same = split_holdout(ids, cfg)
    assert torch.equal(calib, ids[:-2]) and torch.equal(held, ids[-2:]) and same is cfg
    calib, held, one = split_holdout(ids[:1], cfg)  # the default (sensitivity): uniform instead
    assert held is None and (one.allocation.rule, one.allocation.rho) == ("uniform", 1.0)
    calib, held, one = split_holdout(ids[:1], cfg.with_flat(allocation="softmax"))
    assert held is None and (one.allocation.rule, one.allocation.temperature) == ("softmax", math.inf)


def test_only_the_api_splits_held_back_windows_off_given_windows():
    """api.prune holds back the last max(1, n // 8) of the windows it is given when the allocation
    searches and none are passed; pipeline.prune_model takes them as they are and asks for them."""
    from conftest import tiny_model, windows

    import structprune as sp
    from structprune.api import split_holdout
    from structprune.pipeline import prune_model

    cfg = sp.PruneConfig.from_flat(sparsity=0.3, device="cpu")
    ids = windows(9)
    res = sp.prune(tiny_model("llama"), cfg, calib_windows=ids, progress=False)
    calib, held, same = split_holdout(ids, cfg)
    assert len(held) == 1
    model, plan = prune_model(tiny_model("llama"), calib, same, progress=False, holdout=held)
    assert plan.layers == res.plan.layers
    assert all(torch.equal(w, res.model.state_dict()[k]) for k, w in model.state_dict().items())
    with pytest.raises(ValueError, match="held-back"):
        prune_model(tiny_model("llama"), ids, cfg, progress=False)
