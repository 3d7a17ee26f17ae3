"""allocation="sensitivity" (sensitivity/): measured, re-fit-aware curves and the split they give."""

from __future__ import annotations

import pytest
import torch
from conftest import spy_stream_tokens, tiny_model, windows

import structprune as sp
from structprune.arch import get_adapter


def test_sensitivity_measures_a_dead_mlp_as_free_and_allocates_by_the_curves():
    """Layer 1's MLP nearly dead: removing its neurons moves the held-back loss by almost nothing,
    unlike the live layers (on a random model their removal moves it either way). The plan's
    fractions are `sensitivity_split` of the recorded curves. A candidate that keeps every unit
    (re-fit on all columns) leaves the held-back loss exactly as it was."""
    from structprune import allocation as A
    from structprune import sensitivity
    from structprune.allocation.budget import module_params
    from structprune.runtime.hooks import calibration_mode
    from structprune.runtime.stream import LayerStream

    model = tiny_model("llama")
    ad = get_adapter(model.config)
    layers = ad.decoder_layers(model)
    with torch.no_grad():
        ad.down_proj(layers[1]).weight.mul_(1e-3)
    cfg = sp.PruneConfig.from_flat(sparsity=0.3, nsamples=12, seqlen=24, batch_size=4, device="cpu", allocation="sensitivity",
                         prune_attention=False)
    res = sp.prune(model, cfg, calib_windows=windows(12), progress=False)
    info = res.plan.allocation
    curves = info["curves"]
    live = max(abs(d) for _, d in curves["0.mlp"] + curves["2.mlp"])
    assert max(abs(d) for _, d in curves["1.mlp"]) < 0.01 * live, curves
    params = module_params(ad)
    want = A.sensitivity_split([curves[f"{i}.mlp"] for i in range(3)], [params[(i, "mlp")] for i in range(3)],
                               info["prunable_sparsity"], cfg.max_layer_sparsity)
    n = res.plan.layers[0].dense_shape["intermediate_size"]
    assert [len(lp.kept_neurons) for lp in res.plan.layers] == pytest.approx([k * n for k in want], abs=1.5)

    with calibration_mode(model), torch.no_grad():
        calib = LayerStream.capture(model, layers, windows(8), 4)
        hold_ids = windows(4, seed=2)
        hold = LayerStream.capture(model, layers, hold_ids, 4)
        keys = [(i, "mlp") for i in range(len(layers))] + [(0, "attn")]
        none_removed, base = sensitivity.exact.measure(cfg, ad, model, lambda i: layers[i], calib, hold, hold_ids,
                                                       keys, [1e-9], progress=False)
    assert all(abs(c[0][1]) < 1e-4 * base for c in none_removed.values()), none_removed


def test_sensitivity_with_one_calibration_window_falls_back_to_uniform(caplog):
    """One window cannot be split into calibration and held-back text: the default rule falls back
    to the uniform allocation and says so, naming the fix."""
    cfg = sp.PruneConfig.from_flat(sparsity=0.3, nsamples=1, seqlen=24, device="cpu")
    with caplog.at_level("WARNING"):
        res = sp.prune(tiny_model("llama"), cfg, calib_windows=windows(1), progress=False)
    assert "nsamples >= 2" in caplog.text and res.plan.allocation["rule"] == "uniform"
    assert abs(res.plan.actual_sparsity - 0.3) < 0.02


@pytest.mark.parametrize("how", ["linear", "exact"])
def test_candidates_are_refitted_on_a_token_prefix(monkeypatch, how):
    """The candidates' re-fits read the first candidates.TOKENS calibration tokens (whole batches),
    whatever the calibration size: the measurement's cost does not grow with nsamples."""
    from structprune.sensitivity import candidates

    seen = spy_stream_tokens(monkeypatch, candidates, "dense_consumer_stats", 2)
    monkeypatch.setattr(candidates, "TOKENS", 4 * 24)
    cfg = sp.PruneConfig.from_flat(sparsity=0.2, nsamples=16, seqlen=24, batch_size=4, device="cpu", sensitivity=how)
    res = sp.prune(tiny_model("llama"), cfg, calib_windows=windows(16), progress=False)
    assert seen == [4 * 24] and abs(res.plan.actual_sparsity - 0.2) < 0.03
