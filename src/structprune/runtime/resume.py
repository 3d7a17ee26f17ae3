"""Resuming an interrupted run: its identity, and its finished layers replayed from their shards
so both activation streams move past them exactly as the original run moved them."""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

import torch
from torch import nn

from ..arch import Adapter
from ..config import PruneConfig
from ..plan import LayerPlan, PrunePlan
from .source import LayerSource
from .stream import LayerStream


def run_fingerprint(source: LayerSource, config: PruneConfig, windows: torch.Tensor, holdout: torch.Tensor | None,
                    masks: PrunePlan | None) -> str:
    """Identity of a run for resuming: model (config and location), configuration (the device
    aside), calibration and held-back windows, replayed masks."""
    h = hashlib.sha256()
    cfg = {k: v for k, v in config.to_dict().items() if k != "device"}
    model_cfg = source.config.to_dict() if hasattr(source.config, "to_dict") else {}
    h.update(json.dumps([cfg, model_cfg, str(getattr(source, "folder", "")), str(source.dtype)], sort_keys=True, default=str).encode())
    for t in (windows, holdout):
        if t is not None:
            h.update(t.cpu().contiguous().numpy().tobytes())
    if masks is not None:
        h.update(json.dumps([lp.kept_neurons + lp.kept_heads for lp in masks.layers]).encode())
    return h.hexdigest()


def replay_layer(adapter: Adapter, host_layer: nn.Module, lp: LayerPlan, shard: Any, prefix: str,
                 xd: LayerStream | None, xp: LayerStream) -> tuple[nn.Module, LayerStream | None, LayerStream]:
    """A finished layer of an interrupted run: its dense copy sliced to the plan and loaded from
    `shard` (a path, or the state dict rank 0 sent: distributed.py); returns (layer on the host,
    next dense stream, next pruned stream) exactly as the original run computed them."""
    from safetensors.torch import load_file

    layer = copy.deepcopy(host_layer)
    dense = adapter.layer_shape(layer)
    if (lp.shape.num_heads, lp.shape.num_kv_heads) != (dense.num_heads, dense.num_kv_heads):
        adapter.slice_heads(layer, torch.tensor(lp.kept_heads), torch.tensor(lp.kept_kv_heads))
    if lp.shape.intermediate_size != dense.intermediate_size:
        adapter.slice_neurons(layer, torch.tensor(lp.kept_neurons))
    head = f"{prefix}.{lp.index}."
    state = shard if isinstance(shard, dict) else load_file(str(shard))
    layer.load_state_dict({k[len(head):]: v for k, v in state.items()}, strict=True)
    xp_next = xp.run(xp.onload(layer), lp.index)
    xd_next = None if xd is None else xd.run(xd.onload(host_layer), lp.index)
    return layer, xd_next, xp_next
