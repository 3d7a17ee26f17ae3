"""The global first-order Taylor baseline on tiny models of every family."""

from __future__ import annotations

import pytest
import torch
from conftest import logits, tiny_model, windows

import structprune as sp
from structprune.arch import get_adapter
from structprune.methods.global_taylor import accumulate_taylor, global_selection, prune_global
from structprune.surgery import get_weight, head_columns


def _cfg(**kw):
    base = dict(sparsity=0.3, nsamples=6, seqlen=24, batch_size=1, device="cpu")
    base.update(kw)
    return sp.PruneConfig.from_flat(**base)


@pytest.mark.parametrize("sparsity", [0.2, 0.5])
def test_meets_sparsity_input_untouched_gqa_rule(family, sparsity):
    model = tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ids = windows(6)
    pruned, plan = prune_global(model, ids, _cfg(sparsity=sparsity), progress=False)
    # Tiny layers have coarse heads (512 weights of ~23k); neurons fill in around them.
    assert abs(plan.actual_sparsity - sparsity) < 0.03
    assert plan.allocation["rule"] == "global-taylor"
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"input model modified at {k}"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert torch.isfinite(logits(pruned, ids)).all()
    ad = get_adapter(pruned.config)
    assert [ad.layer_shape(layer) for layer in ad.decoder_layers(pruned)] == plan.shapes()
    dense = ad.dense_shape()
    rep = dense.num_heads // dense.num_kv_heads
    for lp in plan.layers:
        assert len(lp.kept_heads) >= 1 and len(lp.kept_neurons) >= 1
        per_group = len(lp.kept_heads) // len(lp.kept_kv_heads)
        assert per_group * len(lp.kept_kv_heads) == len(lp.kept_heads)
        groups = torch.tensor(lp.kept_heads).reshape(len(lp.kept_kv_heads), per_group) // rep
        assert (groups == torch.tensor(lp.kept_kv_heads)[:, None]).all(), "a kept head outside its kept KV group"


def test_keeping_everything_changes_nothing(family):
    model = tiny_model(family)
    ids = windows(4)
    pruned, plan = prune_global(model, ids, _cfg(sparsity=0.0, nsamples=4), progress=False)
    assert plan.actual_sparsity == 0.0
    torch.testing.assert_close(logits(pruned, ids), logits(model, ids), rtol=1e-4, atol=1e-5)


def test_dead_units_rank_least_important(family):
    """A head whose o_proj columns are zero, and a neuron whose down_proj column is zero,
    change nothing: their Taylor terms are exactly zero, and they are removed first."""
    model = tiny_model(family)
    ad = get_adapter(model.config)
    layer = ad.decoder_layers(model)[1]
    dense = ad.dense_shape()
    rep = dense.num_heads // dense.num_kv_heads
    dead_head, dead_neuron = 2, 7
    with torch.no_grad():
        get_weight(ad.o_proj(layer))[:, head_columns(torch.tensor([dead_head]), ad.head_dim)] = 0
        get_weight(ad.down_proj(layer))[:, dead_neuron] = 0
    ids = windows(4)
    taylor = accumulate_taylor(model, ad, ids, batch_size=2, device=torch.device("cpu"), progress=False)
    assert taylor[1].qo[dead_head] == 0
    assert taylor[1].neurons[dead_neuron] == 0
    heads = taylor[1].head_scores()
    group = range((dead_head // rep) * rep, (dead_head // rep + 1) * rep)
    assert all(heads[dead_head] <= heads[h] for h in group)
    if rep == 1:  # multi-head attention: the head's k, v rows carry no gradient either
        assert heads[dead_head] == 0
    _, plan = prune_global(model, ids, _cfg(sparsity=0.1, nsamples=4), progress=False)
    assert dead_neuron not in plan.layers[1].kept_neurons
    kept_in_group = [h for h in plan.layers[1].kept_heads if h in group]
    if rep == 1 or len(kept_in_group) < rep:
        assert dead_head not in plan.layers[1].kept_heads


def test_selection_ranks_by_score_per_parameter():
    """Pure ranking: with scores proportional to cost, cheap units go first and the budget
    lands within one neuron of the goal when neurons are available to fill in."""
    model = tiny_model("llama")
    ad = get_adapter(model.config)
    dense = ad.dense_shape()
    g = torch.Generator().manual_seed(0)
    heads = [torch.rand(dense.num_heads, generator=g) + 10.0 for _ in range(3)]
    neurons = [torch.rand(dense.intermediate_size, generator=g) for _ in range(3)]
    sels, info = global_selection(heads, neurons, ad, 0.3)
    assert all(s.keep_q.numel() == dense.num_heads for s in sels), "important heads were removed"
    total = 3 * (ad.attn_params(dense) + ad.mlp_params(dense))
    assert abs(info["actual_sparsity"] - 0.3) <= ad.neuron_cost / total
    # the kept neurons are the highest-scoring ones, globally
    kept = torch.cat([n[s.keep_n] for n, s in zip(neurons, sels)])
    dropped = torch.cat([n[~torch.isin(torch.arange(n.numel()), s.keep_n)] for n, s in zip(neurons, sels)])
    assert kept.min() >= dropped.max()


def test_selection_attention_only_respects_flags():
    model = tiny_model("opt")
    ad = get_adapter(model.config)
    dense = ad.dense_shape()
    heads = [torch.arange(dense.num_heads, dtype=torch.float32) + 1 for _ in range(3)]
    neurons = [torch.zeros(dense.intermediate_size) for _ in range(3)]
    sels, info = global_selection(heads, neurons, ad, 0.2, prune_attention=True, prune_mlp=False)
    assert all(s.keep_n.numel() == dense.intermediate_size for s in sels)
    assert any(s.keep_q.numel() < dense.num_heads for s in sels)
    assert all(0 not in s.keep_q.tolist() or s.keep_q.numel() == dense.num_heads for s in sels)


def test_adapter_says_whether_q_k_v_is_one_fused_module(family):
    model = tiny_model(family)
    adapter = get_adapter(model.config)
    q, k, v = adapter.q_k_v(adapter.decoder_layers(model)[0])
    assert adapter.fused_qkv == (q is k and k is v)
