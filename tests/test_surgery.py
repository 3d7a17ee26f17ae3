"""Slicing primitives (surgery.py): checked indices that name the module, [out, in] access for
both weight layouts, and physically removing units equals masking them."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import logits, tiny_model, windows
from torch import nn

from structprune.arch import get_adapter
from structprune.surgery import get_weight, head_columns, is_transposed, set_weight, slice_cols, slice_rows


def _conv1d(inp: int, out: int) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    return Conv1D(out, inp)


@pytest.mark.parametrize("make", [lambda: nn.Linear(6, 5), lambda: _conv1d(6, 5)], ids=["linear", "conv1d"])
def test_slicing_equals_masking_on_one_module(make):
    """Keeping rows / columns equals zeroing the dropped ones; both layouts, bias included."""
    torch.manual_seed(0)
    module = make()
    x = torch.randn(3, 6)
    rows, cols = torch.tensor([0, 2, 4]), torch.tensor([1, 2, 5])
    full = module(x)
    sliced = copy.deepcopy(module)
    slice_rows(sliced, rows, name="proj")
    torch.testing.assert_close(sliced(x), full[:, rows])
    masked = copy.deepcopy(module)
    with torch.no_grad():
        drop = torch.ones(6, dtype=torch.bool)
        drop[cols] = False
        get_weight(masked)[:, drop] = 0
    slice_cols(module, cols, name="proj")
    torch.testing.assert_close(module(x[:, cols]), masked(x))
    assert get_weight(module).shape == (5, 3)


def test_transposed_layout_is_registered_by_the_gpt2_adapter():
    conv, lin = _conv1d(6, 5), nn.Linear(6, 5)
    assert is_transposed(conv) and not is_transposed(lin)
    assert get_weight(conv).shape == get_weight(lin).shape == (5, 6)
    set_weight(conv, torch.zeros(4, 6))
    assert conv.weight.shape == (6, 4) and conv.nf == 4


@pytest.mark.parametrize(("index", "error", "match"), [
    (torch.tensor([0, 5]), IndexError, r"proj \(Linear\) rows: index out of range \[0, 5\)"),
    (torch.tensor([-1]), IndexError, "out of range"),
    (torch.tensor([1, 1]), ValueError, r"proj \(Linear\) rows: duplicate"),
    (torch.tensor([], dtype=torch.long), ValueError, "zero units"),
])
def test_slice_checks_indices_and_names_the_module(index, error, match):
    module = nn.Linear(6, 5)
    before = module.weight.detach().clone()
    with pytest.raises(error, match=match):
        slice_rows(module, index, name="proj")
    assert torch.equal(module.weight, before)  # a refused slice leaves the module as it was


def test_head_columns_are_in_head_order():
    assert head_columns(torch.tensor([2, 0]), 3).tolist() == [6, 7, 8, 0, 1, 2]


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
