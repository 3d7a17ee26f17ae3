"""End to end on the real default model (SmolLM2-135M-Instruct from its GGUF package)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import structprune as sp
from structprune.api import calibration_data
from structprune.data import eval_windows, load_text, tokenize
from structprune.io.resolve import load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real():
    model, tok = load_model("smollm2-135m")
    ev = eval_windows(tokenize(tok, load_text("wiki", "eval")), 512, 4)
    return model, tok, ev


def test_prune_real_model_end_to_end(real, tmp_path):
    model, tok, ev = real
    assert model.config.model_type == "llama" and model.config.num_key_value_heads == 3
    cfg = sp.PruneConfig.from_flat(sparsity=0.3, nsamples=8, seqlen=256, device="cpu", allocation="uniform")
    res = sp.prune(model, cfg, calib_windows=calibration_data(tok, cfg), progress=False)
    plan = res.plan
    assert abs(plan.actual_sparsity - 0.3) < 0.01  # PROTOCOL: actual decoder sparsity within 1 point
    assert plan.params_pruned < plan.params_dense
    dense_ppl = sp.perplexity(model, ev, progress=False)
    pruned_ppl = sp.perplexity(res.model, ev, progress=False)
    assert 5 < dense_ppl < 25, dense_ppl  # 14.33 on the full 64-window protocol
    assert dense_ppl < pruned_ppl < 8 * dense_ppl, (dense_ppl, pruned_ppl)
    # uniform allocation -> identical layer shapes -> a plain transformers checkpoint
    out = sp.save_pruned(res.model, plan, tmp_path / "pruned", tokenizer=tok)
    assert res.model.config.structprune["vanilla"]
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = ev[:1, :64]
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, res.model(input_ids=ids).logits)
    assert plain.num_parameters() < model.num_parameters()
