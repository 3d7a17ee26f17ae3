"""FLAP baseline: maths, invariants on tiny models of every family, save/load."""

from __future__ import annotations

import pytest
import torch
from conftest import logits, tiny_model, windows

import structprune as sp
from structprune.arch import get_adapter
from structprune.methods.flap import compensation, standardise, unit_scores
from structprune.methods import method_config


def test_standardise_constant_row_is_zero_not_nan():
    x = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    z = standardise(x, dim=1)
    assert torch.isfinite(z).all()
    assert torch.allclose(z[1], torch.zeros(3))
    assert torch.allclose(z[0].mean(), torch.tensor(0.0)) and torch.allclose(z[0].std(), torch.tensor(1.0))


def test_unit_scores_layer_and_kind():
    g = torch.Generator().manual_seed(0)
    attn = [torch.rand(8, generator=g) * s for s in (1.0, 100.0)]
    mlp = [torch.rand(6, generator=g) * s for s in (1.0, 100.0)]
    heads, neurons = unit_scores(attn, mlp, head_dim=4, per="layer")
    assert [h.shape for h in heads] == [torch.Size([2])] * 2
    for n in neurons:  # each layer on its own scale
        assert abs(float(n.mean())) < 1e-5
    heads_k, neurons_k = unit_scores(attn, mlp, head_dim=4, per="kind")
    assert float(neurons_k[1].mean()) > float(neurons_k[0].mean())  # the large layer ranks above
    with pytest.raises(ValueError, match="per="):
        unit_scores(attn, mlp, head_dim=4, per="global")


def test_compensation_is_removed_columns_times_mean():
    g = torch.Generator().manual_seed(0)
    w, mean = torch.randn(5, 7, generator=g), torch.randn(7, generator=g)
    removed = torch.tensor([1, 4])
    assert torch.allclose(compensation(w, mean, removed).float(), w[:, removed] @ mean[removed], atol=1e-6)
    assert torch.equal(compensation(w, mean, torch.tensor([], dtype=torch.long)), torch.zeros(5, dtype=torch.float64))


@pytest.mark.parametrize("sparsity,square", [(0.2, False), (0.5, False), (0.5, True)])
def test_flap_every_family_meets_sparsity(family, sparsity, square):
    model = tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = method_config("flap", sparsity=sparsity, device="cpu", flap_square_attention=square)
    res = sp.prune(model, cfg, calib_windows=windows(8), progress=False)
    assert abs(res.plan.actual_sparsity - sparsity) < 0.03
    assert torch.isfinite(logits(res.model, windows(2, seed=7))).all()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # input untouched
    assert res.plan.allocation["rule"] == "flap"


def test_flap_sparsity_zero_changes_nothing():
    model = tiny_model("llama")
    res = sp.prune(model, method_config("flap", sparsity=0.0, device="cpu"), calib_windows=windows(4),
                   progress=False)
    ids = windows(2, seed=3)
    assert torch.allclose(logits(res.model, ids), logits(model, ids), atol=1e-5)


def _mean_output(layer, module, hidden, call_kwargs):
    sink: list[torch.Tensor] = []

    def hook(_m, _args, out):
        sink.append(out.detach().reshape(-1, out.shape[-1]))

    h = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            layer(hidden, **call_kwargs)
    finally:
        h.remove()
    return sink[0].double().mean(0)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_bias_compensation_keeps_the_mean_output(family):
    """Layer 0 sees the same input in the dense and pruned model; with its attention pruned the
    o_proj output mean over the calibration tokens is the dense one (FLAP's compensation);
    without compensation it is not."""
    from structprune.runtime.hooks import calibration_mode
    from structprune.runtime.stream import LayerStream

    model = tiny_model(family)
    ids = windows(8)
    cfg = method_config("flap", sparsity=0.25, device="cpu", prune_mlp=False)  # attention-only: at most 0.27 (llama)
    ad = get_adapter(model.config)
    with calibration_mode(model):
        stream = LayerStream.capture(model, ad.decoder_layers(model), ids, 8)
    hidden, calls = stream.hidden, stream.calls
    args, kwargs = calls[0]
    x = hidden[0]
    means = {}
    for comp in (True, False):
        res = sp.prune(model, cfg.with_flat(bias_compensation=comp), calib_windows=ids, progress=False)
        pruned0 = get_adapter(res.model.config).decoder_layers(res.model)[0]
        assert len(res.plan.layers[0].kept_heads) < model.config.num_attention_heads
        means[comp] = _mean_output(pruned0, get_adapter(res.model.config).o_proj(pruned0), x, kwargs)
    dense_mean = _mean_output(ad.decoder_layers(model)[0], ad.o_proj(ad.decoder_layers(model)[0]), x, kwargs)
    assert torch.allclose(means[True], dense_mean, atol=1e-4)
    assert not torch.allclose(means[False], dense_mean, atol=1e-4)


def test_flap_save_load_round_trip(tmp_path):
    model = tiny_model("llama")
    res = sp.prune(model, method_config("flap", sparsity=0.4, device="cpu"), calib_windows=windows(8),
                   progress=False)
    assert res.model.config.mlp_bias and res.model.config.attention_bias
    sp.save_pruned(res.model, res.plan, tmp_path / "out")
    loaded = sp.load_pruned(tmp_path / "out")
    ids = windows(2, seed=9)
    assert torch.allclose(logits(loaded, ids), logits(res.model, ids), atol=1e-5)


def test_flap_config_errors():
    with pytest.raises(ValueError, match="reconstruction"):
        method_config("flap", reconstruction="lstsq")
    with pytest.raises(ValueError, match="flap_standardise"):
        method_config("flap", flap_standardise="global")
    with pytest.raises(ValueError, match="flap"):
        sp.prune(tiny_model("llama"), method_config("flap", device="cpu"), calib_windows=windows(4),
                 progress=False, masks=object())
