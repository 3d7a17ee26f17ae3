"""The model's budget: prunable parameters per module, the sparsity a run can reach, and the
per-layer parameter targets that kept fractions turn into.

A module is one (layer, kind) pair, kind "attn" or "mlp"; its parameters are its prunable
linear weights (q, k, v, o; the MLP projections). `Budget` walks the layers in order and
carries each module's rounding (whole heads, whole neurons) into the next target, so the
model as a whole meets its sparsity; `planned_shapes` and `keep_sets` use the same rule.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

from ..arch import Adapter, LayerShape
from ..config import PruneConfig
from ..selection import neuron_count, select_heads, select_neurons

Key = tuple[int, str]  # (layer index, "attn" | "mlp")


class UnitScores(Protocol):
    """One layer's unit scores: per query head and per FFN neuron."""

    heads: torch.Tensor
    neurons: torch.Tensor


def module_params(adapter: Adapter) -> dict[Key, int]:
    shape = adapter.dense_shape()
    return {(i, k): adapter.attn_params(shape) if k == "attn" else adapter.mlp_params(shape)
            for i in range(adapter.num_layers) for k in ("attn", "mlp")}


def prunable_keys(config: PruneConfig, adapter: Adapter) -> list[Key]:
    kinds = [k for k, on in (("attn", config.prune_attention), ("mlp", config.prune_mlp)) if on]
    return [(i, k) for i in range(adapter.num_layers) for k in kinds]


def prunable_sparsity(config: PruneConfig, adapter: Adapter) -> float:
    """The sparsity the prunable modules must reach so the whole decoder reaches config.sparsity."""
    params = module_params(adapter)
    total = sum(params.values())
    prunable = sum(params[k] for k in prunable_keys(config, adapter))
    s = config.sparsity * total / prunable
    if s > 1.0:
        raise ValueError(f"sparsity={config.sparsity} cannot be reached by pruning only "
                         f"{'attention' if config.prune_attention else 'MLP'} modules "
                         f"({prunable / total:.0%} of decoder weights)")
    return s


MODULES = ("both", "mlp", "attention")


def config_modules(config: PruneConfig) -> str:
    """The `modules` choice (both | mlp | attention) of a configuration."""
    return "both" if config.prune_attention and config.prune_mlp else ("mlp" if config.prune_mlp else "attention")


def max_sparsity(adapter: Adapter, modules: str = "both", max_layer_sparsity: float = 1.0) -> float:
    """The largest ACTUAL decoder sparsity (fraction of decoder linear weights removed) a run can
    reach on this model: every layer keeps at least one KV group with one query head in it and one
    FFN neuron, modules that may not be pruned (`modules`: both | mlp | attention) keep all their
    weights, and the allocation gives no prunable module more than `max_layer_sparsity` (with both
    kinds the attention's rounding to whole heads is made up in the same layer's MLP, so the cap
    bounds the two together)."""
    if modules not in MODULES:
        raise ValueError(f"modules={modules!r} is invalid: choose one of {MODULES}")
    if not 0.0 < max_layer_sparsity <= 1.0:
        raise ValueError(f"max_layer_sparsity={max_layer_sparsity!r} is invalid: must be in (0, 1]")
    shape = adapter.dense_shape()
    attn, mlp = adapter.attn_params(shape), adapter.mlp_params(shape)
    floor = 1.0 - max_layer_sparsity
    min_attn, min_mlp = adapter.q_head_cost + adapter.kv_head_cost, adapter.neuron_cost
    if modules == "both":
        kept = max(min_attn + min_mlp, floor * (attn + mlp))
    elif modules == "mlp":
        kept = attn + max(min_mlp, floor * mlp)
    else:
        kept = mlp + max(min_attn, floor * attn)
    return 1.0 - kept / (attn + mlp)


def module_reach(adapter: Adapter) -> dict[str, float]:
    """The largest fraction of its weights one module can lose: {"attn": all but one KV group with
    one query head, "mlp": all but one neuron} (the dense shape's)."""
    shape = adapter.dense_shape()
    attn, mlp = adapter.attn_params(shape), adapter.mlp_params(shape)
    return {"attn": 1.0 - (adapter.q_head_cost + adapter.kv_head_cost) / attn, "mlp": 1.0 - adapter.neuron_cost / mlp}


def check_reachable(config: PruneConfig, adapter: Adapter) -> None:
    """ValueError, before any work, when config.sparsity is above `max_sparsity` for this model.
    The whole-model rankings (scope global, allocation flap) apply no per-module cap."""
    if config.method != "structprune":  # the whole-model rankings (methods global, flap)
        config = config.replace(max_layer_sparsity=1.0)
    modules = config_modules(config)
    mlp_only_rho = (config.allocation.rule == "uniform" and modules == "both"
                    and config.allocation.rho == 0.0)  # the uniform rule with rho=0 keeps every head
    if mlp_only_rho:
        modules = "mlp"
    top = max_sparsity(adapter, modules, config.max_layer_sparsity)
    if config.sparsity > top + 1e-9:
        cap = ("" if config.max_layer_sparsity >= 1.0 else
               f" and no module loses more than max_layer_sparsity={config.max_layer_sparsity:g} of its weights")
        raise ValueError(
            f"sparsity={config.sparsity:g} cannot be reached on this {adapter.config.model_type} model: with "
            f"modules={modules}{' (rho=0)' if mlp_only_rho else ''} at most {top:.4f} of its decoder linear weights "
            f"can be removed (every layer keeps one KV group with one query head and one FFN neuron{cap}, unpruned "
            f"modules keep everything). Use --sparsity {math.floor(top * 1000 + 1e-6) / 1000:g} or less"
            + (", or raise --max-layer-sparsity" if config.max_layer_sparsity < 1.0 else "")
            + (", or a --rho above 0" if mlp_only_rho else ", or --modules both" if modules != "both" else ""))


class Budget:
    """Turns per-module kept fractions into parameter targets. The rounding of a layer's
    attention (coarse: whole heads) is carried into the same layer's MLP (fine: neurons), and
    no further, so equal fractions give equal layer shapes (a vanilla checkpoint); never into an
    MLP that may not be pruned (prune_mlp=False): it keeps every neuron, and the rounding goes to
    the next layer's attention instead (error diffusion: the whole model stays within half a head
    of its budget, where rounding every layer the same way could miss it by half a head per layer).
    With `round_to` > 1 (kept neurons rounded to a multiple, --round-to) an MLP's rounding
    is carried into the next layer's MLP too, so the whole model still meets its sparsity."""

    def __init__(self, keep: dict[Key, float], params: dict[Key, int],
                 carry_into_mlp: bool = True, round_to: int = 1) -> None:
        self.keep = keep
        self.params = params
        self.carry = 0.0
        self.carry_into_mlp = carry_into_mlp
        self.mlp_carry = 0.0
        self.carry_across_layers = round_to > 1 and carry_into_mlp

    def target(self, key: Key) -> float:
        carry = self.carry if (key[1] == "mlp") == self.carry_into_mlp else 0.0
        if key[1] == "mlp" and self.carry_across_layers:
            carry += self.mlp_carry
        return self.keep[key] * self.params[key] + carry

    def spent(self, key: Key, target: float, actual: int) -> None:
        if key[1] == "attn":
            self.carry = target - actual
        elif self.carry_into_mlp:
            self.carry = 0.0
        if key[1] == "mlp" and self.carry_across_layers:
            self.mlp_carry = target - actual

    def replayed(self, index: int, attn_actual: int, mlp_actual: int) -> None:
        """Account for a layer finished before an interruption (resume), as if pruned now."""
        for kind, actual in (("attn", attn_actual), ("mlp", mlp_actual)):
            self.spent((index, kind), self.target((index, kind)), actual)


def planned_shapes(adapter: Adapter, keep: dict[Key, float], carry_into_mlp: bool = True,
                   round_to: int = 1) -> list[LayerShape]:
    """The layer shapes the kept fractions `keep` lead to under `Budget` and the selection rules
    (exact, except where two head layouts of equal parameter count tie: the scores break that tie)."""
    budget = Budget(keep, module_params(adapter), carry_into_mlp=carry_into_mlp, round_to=round_to)
    dense = adapter.dense_shape()
    flat = torch.zeros(dense.num_heads)
    shapes = []
    for i in range(adapter.num_layers):
        target = budget.target((i, "attn"))
        q, kv = select_heads(flat, dense.num_kv_heads, target, adapter.q_head_cost, adapter.kv_head_cost)
        budget.spent((i, "attn"), target, q.numel() * adapter.q_head_cost + kv.numel() * adapter.kv_head_cost)
        target = budget.target((i, "mlp"))
        n = neuron_count(target, adapter.neuron_cost, dense.intermediate_size, round_to)
        budget.spent((i, "mlp"), target, n * adapter.neuron_cost)
        shapes.append(LayerShape(q.numel(), kv.numel(), n))
    return shapes


def keep_sets(adapter: Adapter, scores: UnitScores, keep_attn: float, keep_mlp: float
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The units a layer would keep at these fractions, by the dense scores (same rule as pruning):
    (kept query heads, kept KV heads, kept neurons); the attention's rounding is carried into the
    MLP by `Budget`'s rule, as in the layer loop."""
    shape = adapter.dense_shape()
    budget = Budget({(0, "attn"): keep_attn, (0, "mlp"): keep_mlp},
                    {(0, "attn"): adapter.attn_params(shape), (0, "mlp"): adapter.mlp_params(shape)})
    target = budget.target((0, "attn"))
    q, kv = select_heads(scores.heads, shape.num_kv_heads, target, adapter.q_head_cost, adapter.kv_head_cost)
    budget.spent((0, "attn"), target, q.numel() * adapter.q_head_cost + kv.numel() * adapter.kv_head_cost)
    n = select_neurons(scores.neurons, budget.target((0, "mlp")), adapter.neuron_cost)
    return q, kv, n
