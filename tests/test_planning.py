"""The allocation stage wired into the pipeline: every rule meets the budget end to end."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import spy_stream_tokens, tiny_model, windows

import structprune as sp
from structprune.arch import get_adapter


@pytest.mark.parametrize("rule", ["closed-form", "softmax", "softmax-modular", "sensitivity"])
def test_every_rule_meets_sparsity_and_records_why(family, rule):
    model = tiny_model(family)
    cfg = sp.PruneConfig.from_flat(sparsity=0.35, nsamples=12, seqlen=24, batch_size=4, device="cpu", allocation=rule,
                         temperature="auto" if rule != "softmax-modular" else "0.5", rho=0.8, gamma=0.3)
    res = sp.prune(model, cfg, calib_windows=windows(12), progress=False)
    assert abs(res.plan.actual_sparsity - 0.35) < 0.04
    assert all(lp.rule.startswith(rule) for lp in res.plan.layers)
    if rule == "softmax":
        info = res.plan.allocation
        assert info["temperature_source"] == "auto" and len(info["search"]) >= 4
        assert all(math.isfinite(v) for _, v in info["search"])
    if rule == "sensitivity":  # one measured curve per prunable module, at the documented fractions
        from structprune.sensitivity import fractions

        curves = res.plan.allocation["curves"]
        assert len(curves) == 2 * len(res.plan.layers)
        want = fractions(res.plan.allocation["prunable_sparsity"], cfg.max_layer_sparsity)
        assert len(want) == 3 and want[1] == pytest.approx(res.plan.allocation["prunable_sparsity"])
        assert all([f for f, _ in c] == want and all(math.isfinite(d) for _, d in c) for c in curves.values())


def test_allocation_is_not_uniform_when_layers_differ():
    """Make layer 1's MLP nearly dead: the importance-driven rules must prune it hardest."""
    model = tiny_model("llama")
    ad = get_adapter(model.config)
    with torch.no_grad():
        ad.down_proj(ad.decoder_layers(model)[1]).weight.mul_(1e-3)
    cfg = sp.PruneConfig.from_flat(sparsity=0.3, nsamples=8, seqlen=24, device="cpu", allocation="softmax", temperature="0.05")
    res = sp.prune(model, cfg, calib_windows=windows(8), progress=False)
    kept = [len(lp.kept_neurons) for lp in res.plan.layers]
    assert kept[1] < min(kept[0], kept[2]), kept


def test_relative_temperature_is_a_multiple_of_the_score_scale():
    model = tiny_model("llama")
    base = dict(sparsity=0.3, nsamples=8, seqlen=24, device="cpu", allocation="softmax")
    rel = sp.prune(model, sp.PruneConfig.from_flat(**base, temperature="2x"), calib_windows=windows(8), progress=False)
    info = rel.plan.allocation
    assert info["temperature"] == pytest.approx(2 * info["score_scale"])
    same = sp.prune(model, sp.PruneConfig.from_flat(**base, temperature=repr(info["temperature"])), calib_windows=windows(8),
                    progress=False)
    assert [lp.kept_neurons for lp in same.plan.layers] == [lp.kept_neurons for lp in rel.plan.layers]
    with pytest.raises(ValueError, match="score scale"):
        sp.PruneConfig.from_flat(temperature="fastx")


def test_relative_layer_importance_divides_by_the_stream_rms():
    """layer_importance="relative" scales each layer's importance by 1 / RMS of its input stream."""
    model = tiny_model("llama")
    base = dict(sparsity=0.3, nsamples=8, seqlen=24, device="cpu", allocation="softmax", temperature="1x")
    raw = sp.prune(model, sp.PruneConfig.from_flat(**base, layer_importance="raw"), calib_windows=windows(8),
                   progress=False).plan.allocation
    rel = sp.prune(model, sp.PruneConfig.from_flat(**base, layer_importance="relative"), calib_windows=windows(8),
                   progress=False).plan.allocation
    assert rel["layer_importance"] == "relative" and raw["layer_importance"] == "raw"
    ratio = {k: rel["importance"][k] / raw["importance"][k] for k in raw["importance"]}
    by_layer = {}
    for key, r in ratio.items():
        by_layer.setdefault(key.split(".")[0], []).append(r)
    assert all(max(v) == pytest.approx(min(v)) for v in by_layer.values())  # one factor per layer
    assert len({round(v[0], 6) for v in by_layer.values()}) > 1  # and it differs between layers
    with pytest.raises(ValueError, match="layer_importance"):
        sp.PruneConfig.from_flat(layer_importance="deep")


@pytest.mark.parametrize("rule", ["uniform", "softmax-modular"])
def test_rho_auto_picks_the_split_with_the_lowest_held_back_loss(rule):
    """rho='auto' tries 0, 0.5 and 1 on held-back calibration windows and keeps the best; with rho 0
    no head is removed. softmax-modular then searches its temperature with that rho."""
    model = tiny_model("llama")
    cfg = sp.PruneConfig.from_flat(sparsity=0.2, nsamples=12, seqlen=24, batch_size=4, device="cpu", allocation=rule,
                         rho="auto", temperature="auto")
    res = sp.prune(model, cfg, calib_windows=windows(12), progress=False)
    info = res.plan.allocation
    assert info["rho_source"] == "auto" and len(info["rho_search"]) >= 2
    best = min(info["rho_search"], key=lambda rv: rv[1])
    assert info["rho"] == best[0] and best[0] in (0.0, 0.5, 1.0)
    if info["rho"] == 0.0:
        assert all(len(lp.kept_heads) == lp.dense_shape["num_heads"] for lp in res.plan.layers)
    if rule == "softmax-modular":
        assert info["temperature_source"] == "auto"
    assert abs(res.plan.actual_sparsity - 0.2) < 0.03


def test_rho_search_scores_units_on_a_token_prefix(monkeypatch):
    """The uniform rule's rho search ranks units on at most RHO_SEARCH_TOKENS calibration tokens (whole
    batches); the adaptive rules score on the whole stream."""
    from structprune import planning

    seen = spy_stream_tokens(monkeypatch, planning, "importance_pass", 2)
    monkeypatch.setattr(planning, "RHO_SEARCH_TOKENS", 4 * 24)
    model = tiny_model("llama")
    base = dict(sparsity=0.2, nsamples=16, seqlen=24, batch_size=4, device="cpu", rho="auto", allocation="uniform")
    sp.prune(model, sp.PruneConfig.from_flat(**base), calib_windows=windows(16), progress=False)
    sp.prune(model, sp.PruneConfig.from_flat(**{**base, "allocation": "softmax"}), calib_windows=windows(16),
             progress=False)
    assert seen == [4 * 24, 14 * 24]  # one batch of 4 windows; all 14 pruning windows (2 held back)


def test_attention_only_pruning_keeps_every_neuron(family):
    """prune_mlp=False: the attention's rounding to whole heads is not carried into the MLP."""
    model = tiny_model(family)
    res = sp.prune(model, sp.PruneConfig.from_flat(sparsity=0.1, nsamples=8, seqlen=24, device="cpu", prune_mlp=False, rho=1.0),
                   calib_windows=windows(8), progress=False)
    assert all(len(lp.kept_neurons) == lp.dense_shape["intermediate_size"] for lp in res.plan.layers)
    assert any(len(lp.kept_heads) < lp.dense_shape["num_heads"] for lp in res.plan.layers)


def test_robust_layer_importance_ignores_massive_activation_tokens():
    """A few tokens with a huge residual norm (massive activations) inflate a layer's stream RMS,
    so "relative" undervalues every layer after them; "robust" divides by the median token RMS,
    which they do not move."""
    from structprune.planning import dense_consumer_stats
    from structprune.runtime.hooks import calibration_mode
    from structprune.runtime.stream import LayerStream

    model = tiny_model("llama")
    ad = get_adapter(model.config)
    layers = ad.decoder_layers(model)
    with calibration_mode(model), torch.no_grad():
        stream = LayerStream.capture(model, layers, windows(4, 24), 4)
    spiked = stream.with_hidden([h.clone() for h in stream.hidden])
    spiked.hidden[0][0, 3] *= 1e3  # one token of 96
    stats = {}
    for name, xs in (("plain", stream), ("spiked", spiked)):
        with torch.no_grad():
            stats[name] = [scale for _, _, _, _, scale in dense_consumer_stats(
                ad, lambda i: layers[i], xs, progress=False)]
    rms_plain, median_plain = stats["plain"][0]
    rms_spiked, median_spiked = stats["spiked"][0]
    assert rms_spiked > 10 * rms_plain
    assert median_spiked == pytest.approx(median_plain, rel=0.05)
    base = dict(sparsity=0.3, nsamples=8, seqlen=24, device="cpu", allocation="softmax", temperature="1x")
    rob = sp.prune(model, sp.PruneConfig.from_flat(**base, layer_importance="robust"), calib_windows=windows(8),
                   progress=False).plan.allocation
    raw = sp.prune(model, sp.PruneConfig.from_flat(**base, layer_importance="raw"), calib_windows=windows(8),
                   progress=False).plan.allocation
    assert rob["layer_importance"] == "robust" == sp.PruneConfig().allocation.layer_importance  # the default
    assert rob["importance"] != raw["importance"]
