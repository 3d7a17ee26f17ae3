"""methods/output.py: what every method returns: `finish` (output config, plan totals, the
finiteness check), parameter counts and the clean copy."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import logits, tiny_model, windows

import structprune as sp
from structprune.arch import get_adapter
from structprune.methods.output import clean_copy, decoder_linear_params, decoder_params, finish, total_params


def _pruned(fam: str = "llama"):
    model = tiny_model(fam)
    cfg = sp.PruneConfig.from_flat(sparsity=0.3, nsamples=8, seqlen=24, device="cpu")
    return model, cfg, sp.prune(model, cfg, calib_windows=windows(8), progress=False)


def _finish(model, cfg, res):
    adapter = get_adapter(res.model.config)
    return finish(model.config, res.model, adapter, cfg, res.plan.layers, res.plan.decoder_params_dense,
                  res.plan.params_dense, {}, {})


def test_finish_shapes_the_config_and_counts_the_pruned_parameters():
    model, cfg, res = _pruned()
    out, plan = _finish(model, cfg, res)
    assert out.config.intermediate_size == res.model.config.intermediate_size
    assert plan.shapes() == res.plan.shapes()
    assert plan.params_pruned == total_params(out) < plan.params_dense == total_params(model)
    assert plan.decoder_params_pruned == decoder_linear_params(out, get_adapter(out.config))
    assert plan.config == cfg.to_dict() and not out.training


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_finish_refuses_non_finite_weights_naming_the_parameter(value):
    model, cfg, res = _pruned()
    name, param = next((n, p) for n, p in res.model.named_parameters() if n.endswith("layers.1.mlp.down_proj.weight"))
    with torch.no_grad():
        param[0, 0] = value
    with pytest.raises(FloatingPointError, match="non-finite values in " + re.escape(name)):
        _finish(model, cfg, res)


def test_total_params_counts_a_tied_tensor_once():
    model = tiny_model("gpt2")
    head, embed = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert head is embed
    with_duplicates = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    assert total_params(model) == with_duplicates - head.numel()


def test_decoder_params_of_the_dense_shape_equal_the_counted_weights(family):
    model = tiny_model(family)
    adapter = get_adapter(model.config)
    assert decoder_params(adapter) == decoder_linear_params(model, adapter)


def test_clean_copy_gives_the_same_outputs_and_shares_no_storage():
    model = tiny_model("qwen3")
    copy = clean_copy(model)
    ids = windows(2)
    assert torch.equal(logits(copy, ids), logits(model, ids))
    inputs = {p.data_ptr() for p in model.parameters()}
    assert not any(p.data_ptr() in inputs for p in copy.parameters())
