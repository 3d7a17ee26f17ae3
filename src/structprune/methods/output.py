"""What every method returns, and the shared parts of building it: the output skeleton,
parameter counts, and `finish` (output config, plan, finiteness check)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..arch import Adapter, get_adapter
from ..config import PruneConfig
from ..plan import LayerPlan, PrunePlan
from ..runtime.source import LayerSource, ModelSource, skeleton


@dataclass
class PruneResult:
    """The pruned model (host, eval mode), its plan, and the tokenizer when one was loaded."""

    model: nn.Module
    plan: PrunePlan
    tokenizer: Any = None


def decoder_linear_params(model: nn.Module, adapter: Adapter) -> int:
    """Decoder-layer linear weight parameters (PROTOCOL.md: q, k, v, o and the MLP projections)."""
    return sum(w.numel() for layer in adapter.decoder_layers(model) for w in adapter.linear_weights(layer))


def total_params(model: nn.Module) -> int:
    """All parameters, tied tensors counted once."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def clean_copy(model: nn.Module | LayerSource) -> nn.Module:
    """An independent full copy on the host with the same weights (the input is never modified;
    a GGUF quantization marker is not carried over). O(model) host memory: for the global
    baseline, which needs the whole model anyway."""
    source = model if isinstance(model, LayerSource) else ModelSource(model)
    out = skeleton(source)
    layers = get_adapter(out.config).decoder_layers(out)
    for i in range(len(layers)):
        layers[i] = copy.deepcopy(source.layer(i))
    return out.eval()


def finish(source_config: Any, out: nn.Module, adapter: Adapter, config: PruneConfig, plans: list[LayerPlan],
           dense_params: int, total_dense: int, allocation: dict[str, Any], timing: dict[str, float]
           ) -> tuple[nn.Module, PrunePlan]:
    """Shape the output config, assemble the plan, and refuse to return non-finite weights."""
    out.config = adapter.shaped_config([p.shape for p in plans])
    plan = PrunePlan(
        model_type=source_config.model_type,
        config=config.to_dict(),
        layers=plans,
        params_dense=total_dense,
        params_pruned=total_params(out),
        decoder_params_dense=dense_params,
        decoder_params_pruned=decoder_linear_params(out, adapter),
        allocation=allocation,
        timing=timing,
    )
    for name, p in out.named_parameters():
        if not p.is_meta and not torch.isfinite(p).all():  # meta: already written (and checked) by a sink
            raise FloatingPointError(f"non-finite values in {name} after pruning; this is a bug, please report it")
    return out.eval(), plan


def open_output(source: LayerSource, compensation: bool) -> tuple[nn.Module, Adapter, dict[str, bool]]:
    """The output skeleton and its adapter; with `compensation`, the family's config fields that
    give the consumer projections biases (returned, so dense layers can get zero biases too)."""
    out = skeleton(source)
    fields = get_adapter(out.config).compensation_fields() if compensation else {}
    for name, value in fields.items():
        setattr(out.config, name, value)
    return out, get_adapter(out.config), fields


def decoder_params(adapter: Adapter) -> int:
    """Dense decoder linear weight parameters (attention + MLP of every layer)."""
    shape = adapter.dense_shape()
    return adapter.num_layers * (adapter.attn_params(shape) + adapter.mlp_params(shape))
