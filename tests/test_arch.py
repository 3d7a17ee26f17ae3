"""Adapters and surgery: slicing invariants on tiny models of every family."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import logits, tiny_config, tiny_model, windows

from structprune.arch import get_adapter, supported_model_types
from structprune.surgery import get_weight, head_columns


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


def _keep_sets(ad, layer_index: int):
    """A non-trivial keep set obeying the GQA rule, different per layer."""
    shape = ad.dense_shape()
    rep = shape.num_heads // shape.num_kv_heads
    if shape.num_kv_heads > 1 and layer_index % 2 == 0:
        keep_kv = torch.tensor([shape.num_kv_heads - 1])  # drop whole groups
        keep_q = keep_kv * rep + torch.arange(rep)
    else:
        keep_kv = torch.arange(shape.num_kv_heads)
        k = max(1, rep - 1) if rep > 1 else 1
        if rep == 1:  # MHA: drop one head
            keep_kv = torch.tensor([h for h in range(shape.num_heads) if h != layer_index % shape.num_heads])
            keep_q = keep_kv
        else:
            keep_q = torch.cat([g * rep + torch.arange(rep)[-k:] for g in range(shape.num_kv_heads)])
    gen = torch.Generator().manual_seed(layer_index)
    keep_n = torch.randperm(shape.intermediate_size, generator=gen)[: shape.intermediate_size * 2 // 3].sort().values
    return keep_q, keep_kv, keep_n


def test_removing_equals_masking(family):
    """Physically slicing units gives the same logits as zeroing their consumer columns."""
    model = tiny_model(family)
    ids = windows(2)
    masked = copy.deepcopy(model)
    ad = get_adapter(model.config)
    shape = ad.dense_shape()
    hd = ad.head_dim
    for i, (layer, mlayer) in enumerate(zip(ad.decoder_layers(model), ad.decoder_layers(masked))):
        keep_q, keep_kv, keep_n = _keep_sets(ad, i)
        with torch.no_grad():
            drop_cols = torch.ones(shape.num_heads * hd, dtype=torch.bool)
            drop_cols[head_columns(keep_q, hd)] = False
            get_weight(ad.o_proj(mlayer))[:, drop_cols] = 0
            drop_n = torch.ones(shape.intermediate_size, dtype=torch.bool)
            drop_n[keep_n] = False
            get_weight(ad.down_proj(mlayer))[:, drop_n] = 0
        ad.slice_heads(layer, keep_q, keep_kv)
        ad.slice_neurons(layer, keep_n)
        assert ad.layer_shape(layer).num_heads == keep_q.numel()
    torch.testing.assert_close(logits(model, ids), logits(masked, ids), rtol=1e-4, atol=1e-5)


def test_slice_rejects_bad_indices():
    model = tiny_model("llama")
    ad = get_adapter(model.config)
    layer = ad.decoder_layers(model)[0]
    with pytest.raises(IndexError, match="out of range"):
        ad.slice_neurons(layer, torch.tensor([0, 999]))
    with pytest.raises(ValueError, match="kept KV head"):
        ad.slice_heads(layer, torch.tensor([0, 1]), torch.tensor([1]))
    with pytest.raises(ValueError, match="zero units"):
        ad.slice_neurons(layer, torch.tensor([], dtype=torch.long))
