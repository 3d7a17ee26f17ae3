"""Every named method runs end to end on a tiny model of every family and meets the sparsity."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import logits, tiny_model, windows

import structprune as sp
from structprune.methods import PRESETS, method_config


@pytest.mark.parametrize("method", sorted(PRESETS))
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


def test_every_preset_selects_a_registered_method():
    from structprune.methods import PRESETS, get_method, registered

    assert sorted(registered()) == ["flap", "global", "structprune"]
    picked = {name: method_config(name).method for name in PRESETS}
    assert picked == {"structprune": "structprune", "wanda-sp": "structprune", "magnitude": "structprune",
                      "random": "structprune", "flap": "flap", "global": "global"}
    assert get_method("flap").sink and not get_method("flap").masks
    assert get_method("global").whole_model and not get_method("global").sink
    with pytest.raises(ValueError, match="structprune"):
        get_method("nope")


def test_register_method_refuses_a_name_twice():
    from structprune.methods import get_method, register_method

    get_method("flap")  # the built-in methods are registered
    with pytest.raises(ValueError, match="twice"):
        register_method("flap")(lambda *args: None)


def test_split_holdout_holds_back_the_last_eighth():
    from structprune.api import split_holdout

    cfg = sp.PruneConfig.from_flat(device="cpu")
    ids = windows(17)
    calib, held, same = split_holdout(ids, cfg)
    assert torch.equal(calib, ids[:-2]) and torch.equal(held, ids[-2:]) and same is cfg
    calib, held, one = split_holdout(ids[:1], cfg)
    assert held is None and (one.allocation.rho, one.allocation.temperature) == (1.0, math.inf)
    with pytest.raises(ValueError, match="sensitivity"):
        split_holdout(ids[:1], cfg.with_flat(allocation="sensitivity"))


def test_arguments_a_method_cannot_honour_are_refused():
    cfg = method_config("global", sparsity=0.2, device="cpu", nsamples=4)
    with pytest.raises(ValueError, match="masks"):
        sp.prune(tiny_model("llama"), cfg, calib_windows=windows(4), progress=False, masks=object())
    with pytest.raises(ValueError, match="sink"):
        sp.prune(tiny_model("llama"), cfg, calib_windows=windows(4), progress=False, sink=object())


@pytest.mark.parametrize("name", ["structprune", "flap", "global"])
def test_registered_flags_agree_with_the_config_rules(name):
    """round_to and distributed are enforced where the config is built (config.py, distributed.py);
    the registry's flags say the same."""
    from structprune import distributed
    from structprune.methods import PRESETS, get_method

    method = get_method(name)
    cfg = method_config(name)
    assert cfg.method == name and PRESETS[name]
    try:
        cfg.replace(round_to=64)
        rounds = True
    except ValueError:
        rounds = False
    assert method.round_to == rounds
    assert method.distributed == (not any("scope" in why for why in distributed.unsupported(cfg)))
