"""No NaN or Inf reaches an output weight: every family x named method, and the sparsity extremes
with every reconstruction, on the shrunk real layouts (test_stability.py: adversarial inputs)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import logits, windows
from test_layouts import layout_model

import structprune as sp
from structprune.arch import get_adapter
from structprune.methods import PRESETS as METHODS, method_config
from structprune.allocation.budget import max_sparsity

# one shrunk real layout per family (test_layouts.py)
FAMILY_LAYOUTS = {"gemma3_text": "gemma3-270m", "llama": "smollm2-135m", "qwen2": "qwen2.5-0.5b",
                  "qwen3": "qwen3-0.6b", "mistral": "mistral-7b", "opt": "opt-125m", "gpt2": "gpt2"}
FAST = dict(nsamples=4, seqlen=16, batch_size=4, device="cpu", admm_iters=2, admm_attn_steps=2)


def _assert_finite(model, ids) -> None:
    bad = [k for k, t in model.state_dict().items() if not torch.isfinite(t).all()]
    assert not bad, f"non-finite weights: {bad}"
    assert torch.isfinite(logits(model, ids)).all()


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("family", sorted(FAMILY_LAYOUTS))
def test_every_family_and_method_at_half(family, method):
    model = layout_model(FAMILY_LAYOUTS[family])
    ids = windows(4, 16)
    cfg = method_config(method, sparsity=0.5, **{k: v for k, v in FAST.items() if not k.startswith("admm")})
    res = sp.prune(model, cfg, calib_windows=ids, progress=False)
    _assert_finite(res.model, ids)


@pytest.mark.parametrize("reconstruction", ["lstsq", "admm", "none"])
@pytest.mark.parametrize("end", ["low", "high"])
@pytest.mark.parametrize("family", sorted(FAMILY_LAYOUTS))
def test_sparsity_extremes_every_reconstruction(family, end, reconstruction):
    """0.05, and 0.9 or the most the model can lose when that is less (max_layer_sparsity lifted)."""
    model = layout_model(FAMILY_LAYOUTS[family])
    top = max_sparsity(get_adapter(model.config), "both", 1.0)
    sparsity = 0.05 if end == "low" else min(0.9, math.floor(top * 100) / 100)
    assert sparsity >= 0.85 or end == "low"
    ids = windows(4, 16)
    cfg = sp.PruneConfig.from_flat(sparsity=sparsity, reconstruction=reconstruction, max_layer_sparsity=1.0, allocation="uniform",
                                   rho=1.0, **FAST)
    res = sp.prune(model, cfg, calib_windows=ids, progress=False)
    _assert_finite(res.model, ids)
    assert abs(res.plan.actual_sparsity - sparsity) <= 0.01

