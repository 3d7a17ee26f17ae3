"""runtime/resume.py: a run's fingerprint, which decides whether an interrupted run may resume."""

from __future__ import annotations

from conftest import tiny_model, windows

import structprune as sp
from structprune.runtime.resume import run_fingerprint
from structprune.runtime.source import ModelSource


def _fingerprint(source=None, config=None, calib=None, holdout=None, masks=None) -> str:
    source = source or ModelSource(tiny_model("llama"))
    config = config or sp.PruneConfig.from_flat(sparsity=0.3, device="cpu")
    return run_fingerprint(source, config, windows(8) if calib is None else calib, holdout, masks)


def test_fingerprint_is_stable_and_ignores_only_the_device():
    source = ModelSource(tiny_model("llama"))
    base = _fingerprint(source)
    assert _fingerprint(source) == base
    assert _fingerprint(source, sp.PruneConfig.from_flat(sparsity=0.3, device="cuda:1")) == base
    assert _fingerprint(source, sp.PruneConfig.from_flat(sparsity=0.4, device="cpu")) != base


def test_fingerprint_changes_with_the_windows():
    source = ModelSource(tiny_model("llama"))
    base = _fingerprint(source)
    calib = windows(8).clone()
    calib[0, 0] = (calib[0, 0] + 1) % 96
    assert _fingerprint(source, calib=calib) != base
    assert _fingerprint(source, holdout=windows(2, seed=5)) != base
    assert _fingerprint(source, holdout=windows(2, seed=5)) != _fingerprint(source, holdout=windows(2, seed=6))


def test_fingerprint_changes_with_the_model_and_the_replayed_masks():
    model = tiny_model("llama")
    base = _fingerprint(ModelSource(model))
    other = tiny_model("llama")
    other.config.rms_norm_eps = 1e-3
    assert _fingerprint(ModelSource(other)) != base
    plan = sp.prune(model, sp.PruneConfig.from_flat(sparsity=0.3, nsamples=8, seqlen=24, device="cpu"), calib_windows=windows(8),
                    progress=False).plan
    with_masks = _fingerprint(ModelSource(model), masks=plan)
    assert with_masks != base
    plan.layers[0].kept_neurons = plan.layers[0].kept_neurons[:-1]
    assert _fingerprint(ModelSource(model), masks=plan) != with_masks
