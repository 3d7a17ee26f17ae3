"""Allocation stage plumbing: decide every module's kept fraction before any layer is pruned.

1. Importance pass: stream the DENSE model layer by layer over the calibration windows and
   score every head and neuron (plus the closed-form relaxed masks when that rule is used).
2. Rule: uniform / closed-form / softmax (Algorithm 1) / softmax-modular (Algorithm 2),
   pure functions in `allocation.py`.
3. Temperature search for the softmax rules: the proxy is the next-token loss, on HELD-BACK
   calibration windows, of the dense model with the units the allocation would remove masked
   out (consumer columns zeroed, which equals removing them); streamed one layer at a time.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import allocation as alloc
from . import distributed
from .arch import Adapter
from .config import LAYER_ALLOCATIONS, PruneConfig, temperature_value
from .importance import column_scores, unit_scores
from .reconstruct.lstsq import GramAccumulator
from .selection import select_heads, select_neurons
from .streaming import (
    capture_input,
    capture_layer_inputs,
    device_copy,
    run_layer,
    to_device,
)
from .surgery import get_bias, get_weight, head_columns

log = logging.getLogger(__name__)

Key = tuple[int, str]
DenseLayer = Callable[[int], nn.Module]  # dense decoder layer i on the host (read-only)


@dataclass
class LayerScores:
    """Dense-model scores of one layer: per query head and per neuron (Wanda-style), and the
    closed-form relaxed masks s_j when computed."""

    heads: torch.Tensor
    neurons: torch.Tensor
    stream_rms: float = 1.0  # RMS of the layer's input hidden states (the residual stream)
    stream_median: float = 1.0  # median over tokens of each token's RMS there (blind to massive activations)
    heads_cf: torch.Tensor | None = None
    neurons_cf: torch.Tensor | None = None


@dataclass
class Allocation:
    """Kept fraction per (layer, kind) module and how it was chosen."""

    keep: dict[Key, float]
    info: dict[str, Any] = field(default_factory=dict)


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


def check_reachable(config: PruneConfig, adapter: Adapter) -> None:
    """ValueError, before any work, when config.sparsity is above `max_sparsity` for this model.
    The whole-model rankings (scope global, allocation flap) apply no per-module cap."""
    if config.method != "structprune":  # the whole-model rankings (methods global, flap)
        config = config.replace(max_layer_sparsity=1.0)
    modules = config_modules(config)
    mlp_only_rho = (config.allocation == "uniform" and modules == "both" and config.rho != "auto"
                    and float(config.rho) == 0.0)  # the uniform rule with rho=0 keeps every head
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


def dense_consumer_stats(adapter: Adapter, dense_layer: DenseLayer, hidden: list[torch.Tensor],
                         calls: list[tuple], device: torch.device, dtype: torch.dtype, full: bool = False,
                         desc: str = "statistics", progress: bool = True
                         ) -> Iterator[tuple[int, nn.Module, GramAccumulator, GramAccumulator,
                                             tuple[float, float]]]:
    """Stream the DENSE model one layer at a time over `hidden` (the layer-0 inputs) and yield
    (index, layer on the device, o_proj input statistics, down_proj input statistics, (RMS of the
    layer's input hidden states, median over tokens of each token's RMS)); full=True also keeps
    the Gram matrices. One layer is on the device at a time; its outputs feed the next."""
    xs = hidden
    for i in tqdm(range(adapter.num_layers), desc=desc, disable=not progress, unit="layer"):
        layer = device_copy(dense_layer(i), device, dtype)
        call = to_device(calls[i], device, dtype)
        o, down = adapter.o_proj(layer), adapter.down_proj(layer)
        acc_o = GramAccumulator(get_weight(o).shape[1], device, full=full)
        acc_d = GramAccumulator(get_weight(down).shape[1], device, full=full)
        nxt = []
        token_ms = []  # each token's mean square over the hidden size
        for x in xs:
            token_ms.append(x.double().pow(2).mean(-1).flatten())
            so: list[torch.Tensor] = []
            sd: list[torch.Tensor] = []
            with capture_input(o, so), capture_input(down, sd):
                y = run_layer(layer, x.to(device, dtype), call)
            acc_o.add_batch(so[0])
            acc_d.add_batch(sd[0])
            nxt.append(y.float().cpu())
        xs = nxt
        distributed.reduce_gram(acc_o)  # sharded calibration: sums over every rank's tokens
        distributed.reduce_gram(acc_d)
        ms = distributed.gather_cat(torch.cat(token_ms) if token_ms else torch.zeros(0, dtype=torch.float64))
        yield i, layer, acc_o, acc_d, (float(ms.mean().sqrt()), float(ms.median().sqrt()))
        del layer


def layer_scores(config: PruneConfig, adapter: Adapter, layer: nn.Module, acc_o: GramAccumulator,
                 acc_d: GramAccumulator, gen: torch.Generator, stream: tuple[float, float] = (1.0, 1.0)
                 ) -> LayerScores:
    """`config.scorer` scores of one dense layer's query heads and neurons from its consumers'
    input statistics; `stream`: (RMS, median token RMS) of the layer's input, as
    `dense_consumer_stats` yields them."""
    return LayerScores(
        heads=unit_scores(column_scores(config.scorer, get_weight(adapter.o_proj(layer)), acc_o, gen),
                          adapter.head_dim),
        neurons=column_scores(config.scorer, get_weight(adapter.down_proj(layer)), acc_d, gen),
        stream_rms=stream[0],
        stream_median=stream[1],
    )


def importance_pass(model: nn.Module, layers: nn.ModuleList, dense_layer: DenseLayer, adapter: Adapter,
                    hidden: list[torch.Tensor],
                    calls: list[tuple], config: PruneConfig, device: torch.device, dtype: torch.dtype,
                    closed_form: bool, progress: bool = True) -> list[LayerScores]:
    """Score every unit of every layer on the dense stream (one dense forward per layer)."""
    gen = torch.Generator().manual_seed(config.seed)
    out: list[LayerScores] = []
    hd = adapter.head_dim
    for _, layer, acc_o, acc_d, stream in dense_consumer_stats(
            adapter, dense_layer, hidden, calls, device, dtype, full=closed_form, desc="importance", progress=progress):
        o, down = adapter.o_proj(layer), adapter.down_proj(layer)
        scores = layer_scores(config, adapter, layer, acc_o, acc_d, gen, stream)
        if closed_form:
            scores.heads_cf = _cf(o, acc_o, [head_columns(torch.tensor([h]), hd) for h in range(scores.heads.numel())])
            scores.neurons_cf = _cf(down, acc_d, [torch.tensor([j]) for j in range(scores.neurons.numel())])
        out.append(scores)
    return out


def _cf(module: nn.Module, acc: GramAccumulator, cols: list[torch.Tensor]) -> torch.Tensor:
    return alloc.closed_form_unit_scores(
        get_weight(module).detach().double().cpu(), acc.gram.cpu(), acc.cross.cpu(), acc.gram_d.cpu(), acc.count,
        cols, d=1.0, has_bias=get_bias(module) is not None).float()


def keep_sets(adapter: Adapter, scores: LayerScores, keep_attn: float, keep_mlp: float
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The units a layer would keep at these fractions, by the dense scores (same rule as pruning)."""
    shape = adapter.dense_shape()
    q, kv = select_heads(scores.heads, shape.num_kv_heads, keep_attn * adapter.attn_params(shape),
                         adapter.q_head_cost, adapter.kv_head_cost)
    attn_actual = q.numel() * adapter.q_head_cost + kv.numel() * adapter.kv_head_cost
    mlp_target = keep_mlp * adapter.mlp_params(shape) + keep_attn * adapter.attn_params(shape) - attn_actual
    n = select_neurons(scores.neurons, mlp_target, adapter.neuron_cost)
    return q, kv, n


def masked_loss(model: nn.Module, layers: nn.ModuleList, dense_layer: DenseLayer, adapter: Adapter,
                holdout: torch.Tensor,
                hidden: list[torch.Tensor], calls: list[tuple], scores: list[LayerScores], keep: dict[Key, float],
                device: torch.device, dtype: torch.dtype, batch_size: int) -> float:
    """Mean next-token NLL on `holdout` of the dense model with the would-be-removed units masked.

    Streamed: one decoder layer on the device at a time; then the model's final norm and head.
    """
    hd = adapter.head_dim
    xs = hidden
    for i in range(len(layers)):
        q, _, n = keep_sets(adapter, scores[i], keep[(i, "attn")], keep[(i, "mlp")])
        layer = device_copy(dense_layer(i), device, dtype)
        call = to_device(calls[i], device, dtype)
        with torch.no_grad():
            w_o = get_weight(adapter.o_proj(layer))
            drop = torch.ones(w_o.shape[1], dtype=torch.bool)
            drop[head_columns(q, hd)] = False
            w_o[:, drop.to(w_o.device)] = 0
            w_d = get_weight(adapter.down_proj(layer))
            drop = torch.ones(w_d.shape[1], dtype=torch.bool)
            drop[n] = False
            w_d[:, drop.to(w_d.device)] = 0
            xs = [run_layer(layer, x.to(device, dtype), call).float().cpu() for x in xs]
        del layer
    return holdout_nll(model, adapter, holdout, xs, dtype, batch_size)


def holdout_nll(model: nn.Module, adapter: Adapter, holdout: torch.Tensor, xs: list[torch.Tensor],
                dtype: torch.dtype, batch_size: int) -> float:
    """Mean next-token NLL on `holdout` [windows, seqlen] from the last decoder layer's outputs
    `xs` (batches of `batch_size` windows, in order) through the model's final norm and head."""
    nll, count = 0.0, 0
    for b, x in enumerate(xs):
        ids = holdout[b * batch_size : (b + 1) * batch_size]
        for j in range(x.shape[0]):  # one window's full-vocabulary logits at a time (host memory)
            with torch.no_grad():
                logits = adapter.logits(model, x[j:j + 1].to(dtype)).float()[0, :-1]
                nll += float(nn.functional.cross_entropy(logits, ids[j, 1:], reduction="sum"))
            count += ids[j, 1:].numel()
    nll, count = distributed.reduce_sums(nll, count)  # sharded held-back windows: sums over every rank
    return nll / count


def needs_rho_search(config: PruneConfig) -> bool:
    """Whether rho='auto' is searched (uniform and softmax-modular, with both kinds prunable)."""
    return (config.allocation in ("uniform", "softmax-modular") and config.rho == "auto"
            and config.prune_attention and config.prune_mlp)


def needs_holdout(config: PruneConfig) -> bool:
    """Whether the allocation searches a parameter on held-back calibration windows."""
    if config.allocation == "sensitivity" or config.allocation.startswith("softmax") and config.temperature == "auto":
        return True
    return needs_rho_search(config)


RHO_CANDIDATES = (0.0, 0.5, 1.0)
RHO_SEARCH_TOKENS = 16 * 512  # calibration tokens that score units for the uniform rule's rho search


def _token_prefix(hidden: list[torch.Tensor], tokens: int) -> list[torch.Tensor]:
    """The first batches of the calibration stream holding at least `tokens` tokens (all if fewer)."""
    if distributed.active():  # this rank's part of that prefix of the whole (sharded) stream
        return distributed.token_prefix(hidden, tokens)
    out, have = [], 0
    for x in hidden:
        if have >= tokens:
            break
        out.append(x)
        have += x.shape[0] * x.shape[1]
    return out


def allocate(config: PruneConfig, adapter: Adapter, model: nn.Module, layers: nn.ModuleList,
             dense_layer: DenseLayer, hidden: list[torch.Tensor], calls: list[tuple], holdout: torch.Tensor | None,
             device: torch.device, dtype: torch.dtype, progress: bool = True) -> Allocation:
    """Kept fraction per module for config.allocation (see module docstring)."""
    if config.allocation not in LAYER_ALLOCATIONS:
        raise ValueError(f"allocation={config.allocation!r} is not a layer-pipeline rule; "
                         f"choose one of {LAYER_ALLOCATIONS}")
    params = module_params(adapter)
    keys = prunable_keys(config, adapter)
    sparsity = prunable_sparsity(config, adapter)
    p = [params[k] for k in keys]
    keep = {k: 1.0 for k in params}
    info: dict[str, Any] = {"rule": config.allocation, "prunable_sparsity": sparsity}
    kinds = [k for _, k in keys]
    if config.allocation == "uniform" and (config.rho != "auto" or not needs_holdout(config)):
        rho = 1.0 if config.rho == "auto" else float(config.rho)
        keep.update(zip(keys, alloc.kind_split(p, kinds, sparsity, rho, config.max_layer_sparsity)))
        info["rho"] = rho
        return Allocation(keep, info)

    closed = config.allocation == "closed-form"
    # The uniform rule's rho search uses the scores only to mask units in its proxy: a prefix of
    # the calibration stream (RHO_SEARCH_TOKENS) ranks them well enough and keeps the search cheap
    # on large calibration sets. The adaptive rules compare layers by them: the whole stream.
    scored = _token_prefix(hidden, RHO_SEARCH_TOKENS) if config.allocation == "uniform" else hidden
    scores = importance_pass(model, layers, dense_layer, adapter, scored, calls, config, device, dtype, closed,
                             progress)
    max_s = config.max_layer_sparsity
    if closed:
        unit = [scores[i].heads_cf if k == "attn" else scores[i].neurons_cf for i, k in keys]
        kept = alloc.closed_form(unit, p, sparsity, max_sparsity=max_s)
        info["mean_s"] = {f"{i}.{k}": float(u.clamp(0, 1).mean()) for (i, k), u in zip(keys, unit)}
        keep.update(zip(keys, kept))
        return Allocation(keep, info)

    hold_hidden: list[torch.Tensor] = []
    if needs_holdout(config):  # layer-0 inputs of the held-back windows, shared by the rho and T searches
        if holdout is None:
            raise ValueError("rho='auto' and temperature='auto' need held-back calibration windows")
        hold_hidden = capture_layer_inputs(model, layers, holdout, config.batch_size)[0] if len(holdout) else []
    rho_auto = needs_rho_search(config)
    if rho_auto:  # choose the attention/MLP split on held-back data, equal ratios over depth
        table = []
        for rho in RHO_CANDIDATES:
            try:
                kept = alloc.kind_split(p, kinds, sparsity, rho, config.max_layer_sparsity)
            except ValueError:
                continue
            k = dict(keep)
            k.update(zip(keys, kept))
            loss = masked_loss(model, layers, dense_layer, adapter, holdout, hold_hidden, calls, scores, k, device,
                               dtype, config.batch_size)
            log.info("rho %.2f: held-back calibration loss %.4f", rho, loss)
            table.append((loss, rho, kept))
        if not table:
            raise ValueError(f"no attention/MLP split in {RHO_CANDIDATES} reaches sparsity={config.sparsity} within "
                             f"max_layer_sparsity={config.max_layer_sparsity}; lower the sparsity or raise "
                             "max_layer_sparsity")
        loss, rho_chosen, kept = min(table)
        info.update({"rho": rho_chosen, "rho_source": "auto", "rho_search": [[r, v] for v, r, _ in table]})
        if config.allocation == "uniform":
            keep.update(zip(keys, kept))
            return Allocation(keep, info)
    rho_modular = info["rho"] if rho_auto else (1.0 if config.rho == "auto" else float(config.rho))

    unit = [scores[i].heads if k == "attn" else scores[i].neurons for i, k in keys]
    if config.layer_importance == "relative":  # a layer's output relative to the stream it is added to
        unit = [u / max(scores[i].stream_rms, 1e-12) for u, (i, _) in zip(unit, keys)]
    elif config.layer_importance == "robust":  # the same, relative to the typical token's stream
        unit = [u / max(scores[i].stream_median, 1e-12) for u, (i, _) in zip(unit, keys)]
    info["layer_importance"] = config.layer_importance
    importance = alloc.normalise_importance(unit, p)
    info["importance"] = {f"{i}.{k}": v for (i, k), v in zip(keys, importance)}
    scale = alloc.score_scale(importance)

    def rule(t: float) -> list[float]:
        if config.allocation == "softmax":
            return alloc.softmax_energy(importance, p, sparsity, t, max_sparsity=max_s)
        return alloc.softmax_modular(importance, p, kinds, [i for i, _ in keys], sparsity, t,
                                     rho=max(rho_modular, 1e-6), gamma=config.gamma, max_sparsity=max_s)

    if config.temperature != "auto":
        t, relative = temperature_value(config.temperature)
        if relative:
            t *= scale
        info.update({"temperature": t, "temperature_source": "given", "score_scale": scale})
    else:
        bar = tqdm(desc="temperature search", disable=not progress, unit="T")

        def proxy(t: float) -> float:
            k = dict(keep)
            k.update(zip(keys, rule(t)))
            loss = masked_loss(model, layers, dense_layer, adapter, holdout, hold_hidden, calls, scores, k, device,
                               dtype, config.batch_size)
            bar.update(1)
            log.debug("temperature %.4g (%.3g x scale): held-back calibration loss %.4f", t, t / scale, loss)
            return loss

        t, table = alloc.search_temperature(proxy, scale, mode="auto")
        uniform_loss = proxy(math.inf)
        bar.close()
        if uniform_loss <= min(v for _, v in table):
            log.info("uniform allocation beats every temperature on the held-back proxy; using T = inf")
            t = math.inf
        info.update({"temperature": t, "temperature_source": "auto", "score_scale": scale,
                     "search": [[tt, v] for tt, v in table], "proxy_uniform": uniform_loss,
                     "proxy": "held-back calibration NLL, units masked by dense scores"})
    keep.update(zip(keys, rule(t)))
    return Allocation(keep, info)
