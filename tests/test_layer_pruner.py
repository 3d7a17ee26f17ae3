"""layer_pruner.py: one layer's re-fit (local, dense and residual targets) and replayed units, through the layer loop."""

from __future__ import annotations

import pytest
import torch
from conftest import logits, tiny_model, windows

import structprune as sp


def _cfg(**kw):
    base = dict(sparsity=0.3, nsamples=8, seqlen=24, batch_size=3, device="cpu")
    base.update(kw)
    return sp.PruneConfig.from_flat(**base)


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


def test_replayed_masks_give_same_units_for_every_reconstruction():
    model = tiny_model("opt")
    ids = windows(12, 24)
    first = sp.prune(model, _cfg(sparsity=0.4, nsamples=12), calib_windows=ids, progress=False)
    for rec in ("none", "admm"):
        again = sp.prune(model, _cfg(sparsity=0.4, nsamples=12, reconstruction=rec), calib_windows=ids,
                         progress=False, masks=first.plan)
        assert [lp.kept_neurons for lp in again.plan.layers] == [lp.kept_neurons for lp in first.plan.layers]
        assert [lp.kept_heads for lp in again.plan.layers] == [lp.kept_heads for lp in first.plan.layers]


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


def test_a_module_kept_whole_gathers_no_statistics(monkeypatch):
    """A module that keeps every unit is left as it is without a statistics pass (nothing would read
    it); the result equals the run that gathered them, and modules that lose units still gather them."""
    from structprune.layer_pruner import LayerPruner

    seen = []
    real = LayerPruner._stats

    def spy(self, w, kind):
        seen.append((w.index, kind))
        return real(self, w, kind)

    monkeypatch.setattr(LayerPruner, "_stats", spy)
    model, ids = tiny_model("llama"), windows(8)
    cfg = sp.PruneConfig.from_flat(sparsity=0.2, nsamples=8, seqlen=24, device="cpu", allocation="uniform", rho=0.0)
    res = sp.prune(model, cfg, calib_windows=ids, progress=False)
    assert seen == [(i, "mlp") for i in range(model.config.num_hidden_layers)]  # every head kept: no "attn"
    monkeypatch.setattr(LayerPruner, "_whole", lambda self, keeps_every_unit: False)  # gather them anyway
    ref = sp.prune(model, cfg, calib_windows=ids, progress=False)
    assert [lp.kept_heads for lp in res.plan.layers] == [lp.kept_heads for lp in ref.plan.layers]
    torch.testing.assert_close(logits(res.model, ids[:2]), logits(ref.model, ids[:2]), rtol=0, atol=0)
