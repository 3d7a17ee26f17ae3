"""The layer loop end to end on tiny models of every family."""

from __future__ import annotations

import pytest
import torch
from conftest import logits, tiny_model, windows

import structprune as sp
from structprune.arch import get_adapter
from structprune.runtime.hooks import calibration_mode, run_layer
from structprune.runtime.stream import LayerStream


def _cfg(**kw):
    base = dict(sparsity=0.3, nsamples=8, seqlen=24, batch_size=3, device="cpu")
    base.update(kw)
    return sp.PruneConfig.from_flat(**base)


def test_layer_stream_equals_model_forward(family):
    """Capturing the layer-0 inputs and running layers one by one reproduces the model."""
    model = tiny_model(family)
    ids = windows(4)
    ad = get_adapter(model.config)
    layers = ad.decoder_layers(model)
    with calibration_mode(model):
        stream = LayerStream.capture(model, layers, ids, 3)
        hidden, calls = stream.hidden, stream.calls
        ref = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
        for b, h in enumerate(hidden):
            for i, layer in enumerate(layers):
                h = run_layer(layer, h, calls[i])
                if i < len(layers) - 1:  # the last entry of hidden_states has the final norm applied
                    torch.testing.assert_close(h, ref[i + 1][b * 3 : b * 3 + 3], rtol=1e-4, atol=1e-5)


def test_sparsity_zero_changes_nothing(family):
    model = tiny_model(family)
    ids = windows(8)
    res = sp.prune(model, _cfg(sparsity=0.0), calib_windows=ids, progress=False)
    assert res.plan.actual_sparsity == 0.0
    torch.testing.assert_close(logits(res.model, ids), logits(model, ids), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sparsity", [0.2, 0.5])
def test_actual_sparsity_within_one_point_and_input_untouched(family, sparsity):
    model = tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = windows(8)
    res = sp.prune(model, _cfg(sparsity=sparsity), calib_windows=ids, progress=False)
    # Tiny layers have coarse units (4 heads of 256 weights); the real-model test checks 1 point.
    assert abs(res.plan.actual_sparsity - sparsity) < 0.03
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"input model modified at {k}"
    out = logits(res.model, ids)
    assert torch.isfinite(out).all()
    ad = get_adapter(res.model.config)
    shapes = [ad.layer_shape(layer) for layer in ad.decoder_layers(res.model)]
    assert shapes == res.plan.shapes()


@pytest.mark.parametrize("target", ["local", "dense"])
def test_reconstruction_lowers_every_block_error(family, target):
    model = tiny_model(family)
    res = sp.prune(model, _cfg(sparsity=0.4, nsamples=12, target=target), calib_windows=windows(12), progress=False)
    checked = 0
    for lp in res.plan.layers:
        for kind, r in lp.recon.items():
            assert r["error"] <= r["error_none"] * (1 + 1e-6), (lp.index, kind, r)
            checked += 1
    assert checked >= 3


def test_reconstruction_improves_logits_over_no_reconstruction():
    model = tiny_model("llama")
    ids = windows(16, 32)
    base = logits(model, ids)
    errs = {}
    for rec in ("none", "lstsq"):
        res = sp.prune(model, _cfg(sparsity=0.4, nsamples=16, seqlen=32, reconstruction=rec), calib_windows=ids,
                       progress=False)
        errs[rec] = float(((logits(res.model, ids) - base) ** 2).mean())
    assert errs["lstsq"] < errs["none"]


def test_gqa_rule_every_group_keeps_same_query_count():
    model = tiny_model("llama")
    res = sp.prune(model, _cfg(sparsity=0.5), calib_windows=windows(8), progress=False)
    rep = 2
    for lp in res.plan.layers:
        groups = [h // rep for h in lp.kept_heads]
        counts = {g: groups.count(g) for g in set(groups)}
        assert set(counts) == set(lp.kept_kv_heads)
        assert len(set(counts.values())) == 1


def test_replayed_masks_give_same_units_for_every_reconstruction():
    model = tiny_model("opt")
    ids = windows(12, 24)
    first = sp.prune(model, _cfg(sparsity=0.4, nsamples=12), calib_windows=ids, progress=False)
    for rec in ("none", "admm"):
        again = sp.prune(model, _cfg(sparsity=0.4, nsamples=12, reconstruction=rec), calib_windows=ids,
                         progress=False, masks=first.plan)
        assert [lp.kept_neurons for lp in again.plan.layers] == [lp.kept_neurons for lp in first.plan.layers]
        assert [lp.kept_heads for lp in again.plan.layers] == [lp.kept_heads for lp in first.plan.layers]


def test_output_shares_no_storage_with_input():
    model = tiny_model("llama")
    res = sp.prune(model, _cfg(sparsity=0.3), calib_windows=windows(8), progress=False)
    inputs = {p.data_ptr() for p in model.parameters()}
    assert not any(p.data_ptr() in inputs for p in res.model.parameters())


def test_plan_replays_onto_dense_model():
    """Without re-fit, slicing a dense copy by the saved plan reproduces the pruned model."""
    import copy

    from structprune.plan import PrunePlan, apply_plan

    model = tiny_model("qwen3")
    res = sp.prune(model, _cfg(sparsity=0.4, reconstruction="none"), calib_windows=windows(8), progress=False)
    plan = PrunePlan.from_dict(res.plan.to_dict())  # through JSON-able data
    replay = copy.deepcopy(model)
    apply_plan(replay, get_adapter(replay.config), plan)
    ids = windows(2)
    torch.testing.assert_close(logits(replay, ids), logits(res.model, ids), rtol=1e-4, atol=1e-5)


def _final_hidden_error(dense, pruned, ids):
    with torch.no_grad():
        a = dense(ids, output_hidden_states=True).hidden_states[-1]
        b = pruned(ids, output_hidden_states=True).hidden_states[-1]
    return float(((a - b) ** 2).mean())


@pytest.mark.parametrize("fam", ["llama", "opt"])
def test_residual_target_tracks_the_dense_stream_better_than_the_local_target(fam):
    """The residual target corrects, in each layer's MLP, the error earlier layers left in the
    stream: on the calibration text the pruned model's last hidden states end closer to the dense."""
    model = tiny_model(fam)
    ids = windows(16, 32)
    errs = {}
    for target in ("local", "residual"):
        res = sp.prune(model, _cfg(sparsity=0.4, nsamples=16, seqlen=32, target=target), calib_windows=ids,
                       progress=False)
        errs[target] = _final_hidden_error(model, res.model, ids)
        assert all(r["error"] <= r["error_none"] * (1 + 1e-6) for lp in res.plan.layers for r in lp.recon.values())
    assert errs["residual"] < errs["local"]


def test_residual_target_refuses_families_that_normalise_the_mlp_output():
    model = tiny_model("gemma3_text")
    with pytest.raises(ValueError, match="target='residual'.*target='local'"):
        sp.prune(model, _cfg(target="residual"), calib_windows=windows(8), progress=False)
