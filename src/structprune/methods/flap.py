"""The FLAP baseline ("flap"): fluctuation-based adaptive structured pruning (An et al., AAAI 2024).

Three parts, as in the paper and its reference code (CASIA-IVA-Lab/FLAP, `prune_flap`, AL-AM):
1. Fluctuation metric, on the DENSE stream (no layer is pruned while scores are gathered):
   for a consumer projection W [out, n] (o_proj for heads, down_proj for neurons) and its input
   x over all calibration tokens, column c scores Var(x_c) * ||W[:, c]||^2 (`config.scorer`,
   "flap" by default). The reference code squares the attention column scores once more
   (`config.flap.square_attention`, default True); the paper's formula does not. On SmolLM2-135M
   the squared form matches the published figures at 20% and 30%, the paper's form at 50%.
2. Adaptive structure search: column scores are standardised (zero mean, unit std) per
   layer and module kind ("layer", the reference code) or per module kind over all layers
   ("kind"); a head is the mean of its columns' standardised scores. All heads and neurons
   of all layers are then ranked together by that score and the lowest removed until the
   ACTUAL decoder sparsity is met, each removal costing its parameters (the reference code's
   512/3 weight is LLaMA's head/neuron cost ratio). Grouped-query attention: a layer's
   attention keeps the parameter share the ranking left it under `selection.select_heads`
   (whole KV groups; equal query heads per kept group), as the `global` baseline does.
3. Bias compensation (`config.refit.bias_compensation`): the consumer's bias gains
   W[:, removed] @ mean(x[removed]), the mean output the removed units used to contribute.
   Families without consumer biases get them through their config switches (llama:
   attention_bias and mlp_bias); where the family cannot express one (e.g. qwen2's o_proj,
   gemma3's MLP) that module is pruned without compensation and a warning says so.
No weight is re-fitted. Streamed: one dense decoder layer on the compute device at a time;
the per-layer column metrics and input means (float32, [hidden] and [intermediate]) stay on
the host until every layer has been scored.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

from .. import distributed
from ..arch import Adapter, get_adapter
from ..config import FLAP_STANDARDISE, PruneConfig
from ..importance import column_scores
from ..plan import LayerPlan, PrunePlan
from ..planning import dense_consumer_stats
from ..runtime.device import resolve_device
from ..runtime.hooks import calibration_mode
from ..runtime.source import LayerSource, ModelSource, layers_prefix
from ..runtime.stream import LayerStream, device_batch
from ..surgery import get_bias, get_weight, head_columns
from . import register_method
from .global_taylor import Selection, global_selection
from .output import decoder_params, finish, open_output

log = logging.getLogger(__name__)

RULE = "flap"


@dataclass
class LayerFluctuation:
    """One dense layer's column metrics and input means (float32, host).

    attn: [num_heads * head_dim] on o_proj's input; mlp: [intermediate_size] on down_proj's."""

    attn: torch.Tensor
    mlp: torch.Tensor
    attn_mean: torch.Tensor
    mlp_mean: torch.Tensor


# --- maths: tensors in, tensors out -----------------------------------------------------------

def standardise(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """(x - mean) / std along `dim` (float32); a constant row becomes zeros, never NaN."""
    x = x.float()
    std = x.std(dim=dim, keepdim=True)
    return (x - x.mean(dim=dim, keepdim=True)) / torch.where(std > 0, std, torch.ones_like(std))


def unit_scores(attn_cols: list[torch.Tensor], neurons: list[torch.Tensor], head_dim: int,
                per: str = "layer") -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """FLAP's standardised scores: (per layer [num_heads], per layer [intermediate_size]).

    attn_cols[i]: o_proj column metrics of layer i; neurons[i]: down_proj
    column metrics. per="layer": standardise each layer's module on its own (reference code);
    per="kind": standardise all layers' attention columns together, likewise the neurons."""
    if per not in FLAP_STANDARDISE:
        raise ValueError(f"per={per!r} is invalid: choose one of {FLAP_STANDARDISE}")
    if per == "layer":
        attn = [standardise(a) for a in attn_cols]
        mlp = [standardise(n) for n in neurons]
    else:
        attn = list(standardise(torch.cat(attn_cols)).split([a.numel() for a in attn_cols]))
        mlp = list(standardise(torch.cat(neurons)).split([n.numel() for n in neurons]))
    heads = [a.reshape(-1, head_dim).mean(dim=1) for a in attn]
    return heads, mlp


def compensation(weight: torch.Tensor, mean: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """W[:, removed] @ mean[removed]: [out] float64, the mean output of the removed inputs."""
    if removed.numel() == 0:
        return torch.zeros(weight.shape[0], dtype=torch.float64)
    return weight.detach().double().cpu()[:, removed] @ mean.double().cpu()[removed]


# --- plumbing ---------------------------------------------------------------------------------

def fluctuation_pass(adapter: Adapter, source: LayerSource, stream: LayerStream, config: PruneConfig,
                     progress: bool = True) -> list[LayerFluctuation]:
    """Stream the dense model one layer at a time over `stream` (the layer-0 inputs of the
    calibration windows) and collect every layer's column metrics and input means (dense stream
    throughout)."""
    gen = torch.Generator().manual_seed(config.seed)
    out: list[LayerFluctuation] = []
    for _, layer, acc_o, acc_d, _ in dense_consumer_stats(adapter, source.layer, stream, desc="flap: fluctuation",
                                                       progress=progress):
        o, down = adapter.o_proj(layer), adapter.down_proj(layer)
        attn = column_scores(config.scorer, get_weight(o), acc_o, gen)
        out.append(LayerFluctuation(attn=attn * attn if config.flap.square_attention else attn,
                                    mlp=column_scores(config.scorer, get_weight(down), acc_d, gen),
                                    attn_mean=acc_o.input_mean.float().cpu(),
                                    mlp_mean=acc_d.input_mean.float().cpu()))
    return out


def _compensate(module: nn.Module, dense_weight: torch.Tensor, mean: torch.Tensor, removed: torch.Tensor,
                what: str, warned: set[str]) -> float:
    """Add the removed inputs' mean output to `module`'s bias; returns its norm (0 when none)."""
    bias = get_bias(module)
    if removed.numel() == 0:
        return 0.0
    if bias is None:
        if what not in warned:
            warned.add(what)
            log.warning("flap: %s has no bias in this family; pruned without bias compensation", what)
        return 0.0
    delta = compensation(dense_weight, mean, removed)
    if not torch.isfinite(delta).all():
        raise FloatingPointError(f"non-finite bias compensation for {what}; this is a bug, please report it")
    with torch.no_grad():
        bias.add_(delta.to(bias.dtype, copy=False).to(bias.device))
    return float(delta.norm())


def _prune_layer(adapter: Adapter, dense: nn.Module, sel: Selection, stats: LayerFluctuation,
                 fields: dict[str, bool], compensate: bool, warned: set[str]
                 ) -> tuple[nn.Module, dict[str, dict[str, float]]]:
    """A pruned copy of one dense layer (zero biases added where `fields` say) with the removed
    units' mean output added to the consumer biases when `compensate`; returns (layer, recon)."""
    shape = adapter.dense_shape()
    hd = adapter.head_dim
    layer = copy.deepcopy(dense)
    if fields:
        adapter.add_zero_biases(layer, fields)
    recon: dict[str, dict[str, float]] = {}
    if sel.keep_q.numel() < shape.num_heads:
        o_weight = get_weight(adapter.o_proj(layer)).detach().clone()
        removed = torch.ones(shape.num_heads * hd, dtype=torch.bool)
        removed[head_columns(sel.keep_q, hd)] = False
        adapter.slice_heads(layer, sel.keep_q, sel.keep_kv)
        if compensate:
            recon["attn"] = {"bias_norm": _compensate(adapter.o_proj(layer), o_weight, stats.attn_mean,
                                                      removed.nonzero().flatten(), "o_proj", warned)}
    if sel.keep_n.numel() < shape.intermediate_size:
        d_weight = get_weight(adapter.down_proj(layer)).detach().clone()
        removed = torch.ones(shape.intermediate_size, dtype=torch.bool)
        removed[sel.keep_n] = False
        adapter.slice_neurons(layer, sel.keep_n)
        if compensate:
            recon["mlp"] = {"bias_norm": _compensate(adapter.down_proj(layer), d_weight, stats.mlp_mean,
                                                     removed.nonzero().flatten(), "down_proj", warned)}
    return layer, recon


def prune_flap(model: nn.Module | LayerSource, windows: torch.Tensor, config: PruneConfig, progress: bool = True,
               sink: object = None) -> tuple[nn.Module, PrunePlan]:
    """Prune `model` (left untouched; an in-memory model or a LayerSource) with FLAP on
    calibration `windows` [nsamples, seqlen] to `config.sparsity` ACTUAL decoder sparsity.

    Uses config.scorer (column metric), config.flap, config.refit.bias_compensation,
    prune_attention / prune_mlp, batch_size, device. Host memory: the output model plus one
    dense layer and the calibration hidden states; `sink` (an `io.ShardWriter`) receives each
    pruned layer as it is finished, as in the layer pipeline."""
    t0 = time.perf_counter()
    source = model if isinstance(model, LayerSource) else ModelSource(model)
    get_adapter(source.config)
    device = resolve_device(config.device)
    dtype = source.dtype
    total_dense = source.total_params()
    out, adapter, fields = open_output(source, config.refit.bias_compensation)
    layers = adapter.decoder_layers(out)
    prefix = layers_prefix(out)
    shape = adapter.dense_shape()
    hd = adapter.head_dim
    dense_params = decoder_params(adapter)

    batch = device_batch(config, windows.shape[1])
    windows, _ = distributed.shard_windows(windows, None, batch)  # torchrun: this rank's windows
    with calibration_mode(out):
        stream = LayerStream.capture(out, layers, windows, batch, device, dtype)
        stats = fluctuation_pass(adapter, source, stream, config, progress)
    del stream
    t_scores = time.perf_counter() - t0
    heads, neurons = unit_scores([s.attn for s in stats], [s.mlp for s in stats], hd, config.flap.standardise)
    selections, info = global_selection(heads, neurons, adapter, config.sparsity, config.prune_attention,
                                        config.prune_mlp, per_parameter=False)

    plans: list[LayerPlan] = []
    warned: set[str] = set()
    for i, sel in enumerate(selections):
        layer, recon = _prune_layer(adapter, source.layer(i), sel, stats[i], fields, config.refit.bias_compensation,
                                    warned)
        layers[i] = layer.eval()
        if sink is not None:
            sink.write_layer(i, prefix, layer)
            if getattr(sink, "release", False):
                layers[i] = layer.to("meta")
        plans.append(LayerPlan(
            index=i, kept_heads=sel.keep_q.tolist(), kept_kv_heads=sel.keep_kv.tolist(),
            kept_neurons=sel.keep_n.tolist(), dense_shape=shape.to_dict(),
            head_scores=heads[i].tolist(), neuron_scores=neurons[i].tolist(),
            attn_keep_target=sel.attn_keep, mlp_keep_target=sel.mlp_keep, rule=RULE, recon=recon))
        log.info("layer %d: heads %d/%d kv %d/%d neurons %d/%d", i, sel.keep_q.numel(), shape.num_heads,
                 sel.keep_kv.numel(), shape.num_kv_heads, sel.keep_n.numel(), shape.intermediate_size)
    info = {"rule": RULE, "standardise": config.flap.standardise, "bias_fields": sorted(fields), **info}
    return finish(source.config, out, adapter, config, plans, dense_params, total_dense, info,
                  {"score_seconds": t_scores, "prune_seconds": time.perf_counter() - t0})


@register_method("flap", sink=True, distributed=True)
def run(model: nn.Module | LayerSource, windows: torch.Tensor, holdout: torch.Tensor | None, config: PruneConfig,
        progress: bool, masks: PrunePlan | None, sink: object) -> tuple[nn.Module, PrunePlan]:
    """FLAP as a registered method: `prune_flap` (no held-back windows, no masks)."""
    return prune_flap(model, windows, config, progress=progress, sink=sink)
