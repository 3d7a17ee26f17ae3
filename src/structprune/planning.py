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

import functools
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
from .allocation.budget import Key, keep_sets, module_params, prunable_keys, prunable_sparsity
from .arch import Adapter, get_adapter
from .config import LAYER_ALLOCATIONS, PruneConfig
from .importance import column_scores, unit_scores
from .runtime.stream import LayerStream
from .stats import GramAccumulator
from .surgery import get_bias, get_weight, head_columns

log = logging.getLogger(__name__)

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


def dense_consumer_stats(adapter: Adapter, dense_layer: DenseLayer, stream: LayerStream, full: bool = False,
                         desc: str = "statistics", progress: bool = True
                         ) -> Iterator[tuple[int, nn.Module, GramAccumulator, GramAccumulator,
                                             tuple[float, float]]]:
    """Stream the DENSE model one layer at a time over `stream` (the layer-0 inputs) and yield
    (index, layer on the device, o_proj input statistics, down_proj input statistics, (RMS of the
    layer's input hidden states, median over tokens of each token's RMS)); full=True also keeps
    the Gram matrices. One layer is on the device at a time; its outputs feed the next."""
    for i in tqdm(range(adapter.num_layers), desc=desc, disable=not progress, unit="layer"):
        layer = stream.onload(dense_layer(i))
        o, down = adapter.o_proj(layer), adapter.down_proj(layer)
        acc_o = GramAccumulator(get_weight(o).shape[1], stream.device, full=full)
        acc_d = GramAccumulator(get_weight(down).shape[1], stream.device, full=full)
        token_ms = []  # each token's mean square over the hidden size

        def visit(_b: int, x: torch.Tensor, inputs: list[list[torch.Tensor]]) -> None:
            token_ms.append(x.double().pow(2).mean(-1).flatten())
            acc_o.add_batch(inputs[0][0])
            acc_d.add_batch(inputs[1][0])

        stream = stream.run(layer, i, capture=(o, down), visit=visit)
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


def importance_pass(dense_layer: DenseLayer, adapter: Adapter, stream: LayerStream, config: PruneConfig,
                    closed_form: bool, progress: bool = True) -> list[LayerScores]:
    """Score every unit of every layer on the dense stream (one dense forward per layer)."""
    gen = torch.Generator().manual_seed(config.seed)
    out: list[LayerScores] = []
    hd = adapter.head_dim
    for _, layer, acc_o, acc_d, stream in dense_consumer_stats(
            adapter, dense_layer, stream, full=closed_form, desc="importance", progress=progress):
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


def masked_loss(model: nn.Module, dense_layer: DenseLayer, adapter: Adapter, holdout: torch.Tensor,
                hold: LayerStream, scores: list[LayerScores], keep: dict[Key, float]) -> float:
    """Mean next-token NLL on `holdout` of the dense model with the would-be-removed units masked;
    `hold`: the layer-0 inputs of `holdout`.

    Streamed: one decoder layer on the device at a time; then the model's final norm and head.
    """
    hd = adapter.head_dim
    for i in range(adapter.num_layers):
        q, _, n = keep_sets(adapter, scores[i], keep[(i, "attn")], keep[(i, "mlp")])
        layer = hold.onload(dense_layer(i))
        with torch.no_grad():
            w_o = get_weight(adapter.o_proj(layer))
            drop = torch.ones(w_o.shape[1], dtype=torch.bool)
            drop[head_columns(q, hd)] = False
            w_o[:, drop.to(w_o.device)] = 0
            w_d = get_weight(adapter.down_proj(layer))
            drop = torch.ones(w_d.shape[1], dtype=torch.bool)
            drop[n] = False
            w_d[:, drop.to(w_d.device)] = 0
            hold = hold.run(layer, i)
        del layer
    return holdout_nll(model, adapter, holdout, hold)


def holdout_nll(model: nn.Module, adapter: Adapter, holdout: torch.Tensor, last: LayerStream) -> float:
    """Mean next-token NLL on `holdout` [windows, seqlen] from the last decoder layer's outputs
    `last` (batches of `last.batch` windows, in order) through the model's final norm and head."""
    nll, count = 0.0, 0
    for b, x in enumerate(last):
        ids = holdout[b * last.batch : (b + 1) * last.batch]
        for j in range(x.shape[0]):  # one window's full-vocabulary logits at a time (host memory)
            with torch.no_grad():
                logits = adapter.logits(model, x[j:j + 1].to(last.dtype)).float()[0, :-1]
                nll += float(nn.functional.cross_entropy(logits, ids[j, 1:], reduction="sum"))
            count += ids[j, 1:].numel()
    nll, count = distributed.reduce_sums(nll, count)  # sharded held-back windows: sums over every rank
    return nll / count


def needs_rho_search(config: PruneConfig) -> bool:
    """Whether rho is searched (its value None; uniform and softmax-modular, with both kinds prunable)."""
    return (config.allocation.rule in ("uniform", "softmax-modular") and config.allocation.rho is None
            and config.prune_attention and config.prune_mlp)


def needs_holdout(config: PruneConfig) -> bool:
    """Whether the allocation searches a parameter on held-back calibration windows."""
    a = config.allocation
    if a.rule == "sensitivity" or a.rule.startswith("softmax") and a.temperature is None:
        return True
    return needs_rho_search(config)


RHO_CANDIDATES = (0.0, 0.5, 1.0)
RHO_SEARCH_TOKENS = 16 * 512  # calibration tokens that score units for the uniform rule's rho search


def capture_holdout(model: nn.Module, stream: LayerStream, holdout: torch.Tensor) -> LayerStream:
    """The layer-0 inputs of the held-back windows, batched like `stream` (none on an empty shard)."""
    if not len(holdout):
        return stream.empty()
    layers = get_adapter(model.config).decoder_layers(model)
    return LayerStream.capture(model, layers, holdout, stream.batch, stream.device, stream.dtype)


@dataclass
class Problem:
    """What the allocation steps share: the prunable modules (`keys`, their parameter counts `p`
    and kinds), the sparsity asked of them, the kept fractions `keep` of every module (1 where
    not prunable) and the record `info` of how they were chosen."""

    keys: list[Key]
    p: list[int]
    sparsity: float
    keep: dict[Key, float]
    info: dict[str, Any]

    @property
    def kinds(self) -> list[str]:
        return [k for _, k in self.keys]

    def done(self, kept: list[float]) -> Allocation:
        """The allocation with the prunable modules' kept fractions `kept`."""
        self.keep.update(zip(self.keys, kept))
        return Allocation(self.keep, self.info)


def allocate(config: PruneConfig, adapter: Adapter, model: nn.Module, dense_layer: DenseLayer, stream: LayerStream,
             holdout: torch.Tensor | None, progress: bool = True) -> Allocation:
    """Kept fraction per module for config.allocation.rule (see module docstring). `model`: the
    output skeleton (embeddings and head; its decoder layers are not run), `stream`: the layer-0
    inputs of the calibration windows, `holdout`: held-back windows for the searches."""
    a = config.allocation
    if a.rule not in LAYER_ALLOCATIONS:
        raise ValueError(f"allocation={a.rule!r} is not a layer-pipeline rule; choose one of {LAYER_ALLOCATIONS}")
    params = module_params(adapter)
    keys = prunable_keys(config, adapter)
    sparsity = prunable_sparsity(config, adapter)
    prob = Problem(keys, [params[k] for k in keys], sparsity, {k: 1.0 for k in params},
                   {"rule": a.rule, "prunable_sparsity": sparsity})
    if a.rule == "uniform" and (a.rho is not None or not needs_holdout(config)):
        rho = 1.0 if a.rho is None else a.rho
        prob.info["rho"] = rho
        return prob.done(alloc.kind_split(prob.p, prob.kinds, sparsity, rho, config.max_layer_sparsity))

    closed = a.rule == "closed-form"
    # The uniform rule's rho search uses the scores only to mask units in its proxy: a prefix of
    # the calibration stream (RHO_SEARCH_TOKENS) ranks them well enough and keeps the search cheap
    # on large calibration sets. The adaptive rules compare layers by them: the whole stream.
    scored = stream.prefix(RHO_SEARCH_TOKENS) if a.rule == "uniform" else stream
    scores = importance_pass(dense_layer, adapter, scored, config, closed, progress)
    if closed:
        unit = [scores[i].heads_cf if k == "attn" else scores[i].neurons_cf for i, k in keys]
        prob.info["mean_s"] = {f"{i}.{k}": float(u.clamp(0, 1).mean()) for (i, k), u in zip(keys, unit)}
        return prob.done(alloc.closed_form(unit, prob.p, sparsity, max_sparsity=config.max_layer_sparsity))

    hold = stream.empty()
    if needs_holdout(config):  # layer-0 inputs of the held-back windows, shared by the rho and T searches
        if holdout is None:
            raise ValueError("rho='auto' and temperature='auto' need held-back calibration windows")
        hold = capture_holdout(model, stream, holdout)
    loss = functools.partial(masked_loss, model, dense_layer, adapter, holdout, hold, scores)
    rho = 1.0 if a.rho is None else a.rho
    if needs_rho_search(config):  # choose the attention/MLP split on held-back data, equal ratios over depth
        rho, kept = search_rho(config, prob, loss)
        if a.rule == "uniform":
            return prob.done(kept)
    return prob.done(softmax_rule(config, prob, scores, rho, loss, progress))


def search_rho(config: PruneConfig, prob: Problem, loss: Callable[[dict[Key, float]], float]
               ) -> tuple[float, list[float]]:
    """rho among RHO_CANDIDATES with the least held-back `loss` of the uniform split (equal
    ratios over depth); returns (rho, its kept fractions) and records the search in prob.info."""
    table = []
    for rho in RHO_CANDIDATES:
        try:
            kept = alloc.kind_split(prob.p, prob.kinds, prob.sparsity, rho, config.max_layer_sparsity)
        except ValueError:
            continue
        k = dict(prob.keep)
        k.update(zip(prob.keys, kept))
        value = loss(k)
        log.info("rho %.2f: held-back calibration loss %.4f", rho, value)
        table.append((value, rho, kept))
    if not table:
        raise ValueError(f"no attention/MLP split in {RHO_CANDIDATES} reaches sparsity={config.sparsity} within "
                         f"max_layer_sparsity={config.max_layer_sparsity}; lower the sparsity or raise "
                         "max_layer_sparsity")
    _, rho_chosen, kept = min(table)
    prob.info.update({"rho": rho_chosen, "rho_source": "auto", "rho_search": [[r, v] for v, r, _ in table]})
    return rho_chosen, kept


def layer_importance(config: PruneConfig, prob: Problem, scores: list[LayerScores]) -> list[float]:
    """Per-module importance for the softmax rules (config.allocation.layer_importance),
    normalised by `alloc.normalise_importance`; recorded in prob.info."""
    how = config.allocation.layer_importance
    unit = [scores[i].heads if k == "attn" else scores[i].neurons for i, k in prob.keys]
    if how == "relative":  # a layer's output relative to the stream it is added to
        unit = [u / max(scores[i].stream_rms, 1e-12) for u, (i, _) in zip(unit, prob.keys)]
    elif how == "robust":  # the same, relative to the typical token's stream
        unit = [u / max(scores[i].stream_median, 1e-12) for u, (i, _) in zip(unit, prob.keys)]
    prob.info["layer_importance"] = how
    importance = alloc.normalise_importance(unit, prob.p)
    prob.info["importance"] = {f"{i}.{k}": v for (i, k), v in zip(prob.keys, importance)}
    return importance


def softmax_rule(config: PruneConfig, prob: Problem, scores: list[LayerScores], rho: float,
                 loss: Callable[[dict[Key, float]], float], progress: bool) -> list[float]:
    """Kept fractions of the softmax rules at the given or searched temperature."""
    a, max_s = config.allocation, config.max_layer_sparsity
    importance = layer_importance(config, prob, scores)
    scale = alloc.score_scale(importance)

    def rule(t: float) -> list[float]:
        if a.rule == "softmax":
            return alloc.softmax_energy(importance, prob.p, prob.sparsity, t, max_sparsity=max_s)
        return alloc.softmax_modular(importance, prob.p, prob.kinds, [i for i, _ in prob.keys], prob.sparsity, t,
                                     rho=max(rho, 1e-6), gamma=a.gamma, max_sparsity=max_s)

    if a.temperature is not None:
        t = a.temperature
        if a.temperature_relative:
            t *= scale
        prob.info.update({"temperature": t, "temperature_source": "given", "score_scale": scale})
    else:
        t = search_temperature(prob, rule, scale, loss, progress)
    return rule(t)


def search_temperature(prob: Problem, rule: Callable[[float], list[float]], scale: float,
                       loss: Callable[[dict[Key, float]], float], progress: bool) -> float:
    """The temperature with the least held-back `loss` (`alloc.search_temperature`), or inf
    (uniform) where that beats every one; records the search in prob.info."""
    bar = tqdm(desc="temperature search", disable=not progress, unit="T")

    def proxy(t: float) -> float:
        k = dict(prob.keep)
        k.update(zip(prob.keys, rule(t)))
        value = loss(k)
        bar.update(1)
        log.debug("temperature %.4g (%.3g x scale): held-back calibration loss %.4f", t, t / scale, value)
        return value

    t, table = alloc.search_temperature(proxy, scale, mode="auto")
    uniform_loss = proxy(math.inf)
    bar.close()
    if uniform_loss <= min(v for _, v in table):
        log.info("uniform allocation beats every temperature on the held-back proxy; using T = inf")
        t = math.inf
    prob.info.update({"temperature": t, "temperature_source": "auto", "score_scale": scale,
                      "search": [[tt, v] for tt, v in table], "proxy_uniform": uniform_loss,
                      "proxy": "held-back calibration NLL, units masked by dense scores"})
    return t
