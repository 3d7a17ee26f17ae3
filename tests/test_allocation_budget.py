"""The model's budget: one carry rule for the layer loop, planned shapes and keep_sets."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import FAMILIES, tiny_config

from structprune.allocation.budget import Budget, keep_sets, module_params, planned_shapes
from structprune.arch import get_adapter


class _Scores:
    def __init__(self, heads: torch.Tensor, neurons: torch.Tensor) -> None:
        self.heads, self.neurons = heads, neurons


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_sets_gives_the_planned_layer_shape(family):
    """keep_sets (what the allocation's proxies mask) and planned_shapes (what the layer loop
    builds) share Budget's carry: equal scores give the same head and neuron counts."""
    ad = get_adapter(tiny_config(family))
    shape = ad.dense_shape()
    rng = random.Random(0)
    for _ in range(50):
        ka, km = rng.uniform(0.05, 1.0), rng.uniform(0.05, 1.0)
        keep = {(i, k): (ka if k == "attn" else km) for i in range(ad.num_layers) for k in ("attn", "mlp")}
        first = planned_shapes(ad, keep)[0]
        q, kv, n = keep_sets(ad, _Scores(torch.zeros(shape.num_heads), torch.rand(shape.intermediate_size)), ka, km)
        assert (q.numel(), kv.numel(), n.numel()) == (first.num_heads, first.num_kv_heads, first.intermediate_size)


def test_attention_rounding_is_carried_into_the_same_layers_mlp_only():
    params = {(0, "attn"): 1000, (0, "mlp"): 3000, (1, "attn"): 1000, (1, "mlp"): 3000}
    keep = {key: 0.5 for key in params}
    b = Budget(keep, params)
    b.spent((0, "attn"), b.target((0, "attn")), 400)  # 100 short of the target
    assert b.target((0, "mlp")) == 1500 + 100
    b.spent((0, "mlp"), b.target((0, "mlp")), 1550)  # the MLP's own rounding is not carried on
    assert b.target((1, "attn")) == 500 and b.target((1, "mlp")) == 1500
    # with round_to > 1 an MLP's rounding goes on to the next MLP
    b = Budget(keep, params, round_to=8)
    b.spent((0, "attn"), b.target((0, "attn")), 500)
    b.spent((0, "mlp"), b.target((0, "mlp")), 1450)
    assert b.target((1, "mlp")) == 1500 + 50


def test_without_mlp_pruning_the_rounding_goes_to_the_next_attention():
    params = {(0, "attn"): 1000, (0, "mlp"): 3000, (1, "attn"): 1000, (1, "mlp"): 3000}
    keep = {(i, k): (0.5 if k == "attn" else 1.0) for i, k in params}
    b = Budget(keep, params, carry_into_mlp=False)
    b.spent((0, "attn"), b.target((0, "attn")), 450)
    assert b.target((0, "mlp")) == 3000
    assert b.target((1, "attn")) == 500 + 50


def test_planned_shapes_miss_the_budget_by_at_most_half_a_neuron_per_layer():
    """Each layer's attention rounding is made up in its MLP, so only the MLP's own rounding remains."""
    ad = get_adapter(tiny_config("llama"))
    params = module_params(ad)
    keep = {key: 0.6 for key in params}
    shapes = planned_shapes(ad, keep)
    kept = sum(s.num_heads * ad.q_head_cost + s.num_kv_heads * ad.kv_head_cost + s.intermediate_size * ad.neuron_cost
               for s in shapes)
    assert abs(kept - 0.6 * sum(params.values())) <= ad.num_layers * ad.neuron_cost / 2 + 1e-9
