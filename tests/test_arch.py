"""Adapters and surgery: slicing invariants on tiny models of every family."""

from __future__ import annotations

import pytest
import torch
from conftest import logits, tiny_config, tiny_model, windows

from structprune.arch import get_adapter, supported_model_types


def test_unknown_model_type_lists_supported():
    cfg = tiny_config("llama")
    cfg.model_type = "bert"
    with pytest.raises(ValueError, match="supported.*gpt2.*llama.*opt"):
        get_adapter(cfg)
    assert {"llama", "mistral", "qwen2", "qwen3", "gemma3_text", "opt", "gpt2"} <= set(supported_model_types())


def test_keep_everything_changes_nothing(family):
    model = tiny_model(family)
    ids = windows(2)
    ref = logits(model, ids)
    ad = get_adapter(model.config)
    shape = ad.dense_shape()
    for layer in ad.decoder_layers(model):
        ad.slice_heads(layer, torch.arange(shape.num_heads), torch.arange(shape.num_kv_heads))
        ad.slice_neurons(layer, torch.arange(shape.intermediate_size))
    torch.testing.assert_close(logits(model, ids), ref)
