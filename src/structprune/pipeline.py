"""The layer loop: capture -> statistics -> importance -> allocation -> reconstruction -> surgery.

Sequential and streamed: decoder layer i is copied to the compute device, pruned with
statistics gathered on the outputs of the already-pruned layers 0..i-1, re-fitted, and
moved back to the host before layer i+1 is touched. Two activation streams live on the
host: the dense model's hidden states (targets) and the pruned model's (inputs).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed, sensitivity
from .allocation.budget import Budget, check_reachable, module_params, planned_shapes
from .arch import Adapter, get_adapter
from .config import PruneConfig
from .layer_pruner import LayerPruner
from .plan import LayerPlan, PrunePlan
from .methods.output import decoder_params, finish, open_output
from .planning import Allocation, allocate
from .runtime.device import resolve_device
from .runtime.hooks import calibration_mode
from .runtime.resume import replay_layer, run_fingerprint
from .runtime.source import LayerSource, ModelSource, layers_prefix
from .runtime.stream import LayerStream, device_batch

log = logging.getLogger(__name__)


def prune_model(model: nn.Module | LayerSource, windows: torch.Tensor, config: PruneConfig, progress: bool = True,
                holdout: torch.Tensor | None = None, masks: PrunePlan | None = None,
                sink: Any = None) -> tuple[nn.Module, PrunePlan]:
    """Prune `model` (an in-memory model, left untouched, or a LayerSource such as a
    safetensors folder read one layer at a time) on calibration `windows` [nsamples, seqlen].

    holdout: calibration windows kept apart for the rho, temperature and sensitivity searches
    (never the evaluation text); needed when `planning.needs_holdout(config)` and no masks are
    replayed (`api.prune` splits them off the calibration windows when none are given).
    masks: a plan whose kept units are replayed instead of selected (allocation is skipped);
    the statistics and re-fit still run, so re-fit methods can be compared on equal masks.
    sink: an `io.ShardWriter`; each finished layer is written to it at once and, with
    `sink.release`, dropped from memory (its placeholder goes back to the meta device).
    Host memory: the output model (real non-layer parts, pruned layers) plus one dense layer;
    with a releasing sink, the non-layer parts plus about one layer.
    """
    t0 = time.perf_counter()
    source = model if isinstance(model, LayerSource) else ModelSource(model)
    get_adapter(source.config)  # unsupported families fail before any work
    distributed.check_supported(config)
    device = resolve_device(config.device)
    dtype = source.dtype
    gen = torch.Generator().manual_seed(config.seed)
    total_dense = source.total_params()
    out, adapter, bias_fields = open_output(source, config.refit.bias_compensation and config.refit.method != "none")
    check_reachable(config, adapter)  # an unreachable sparsity fails before any work
    _check_family(config, adapter)  # so does a target this family cannot take
    layers = adapter.decoder_layers(out)
    prefix = layers_prefix(out)
    dense_params = decoder_params(adapter)

    def dense_layer(i: int) -> nn.Module:
        layer = source.layer(i)
        if bias_fields:  # zero biases change nothing; added on a copy, the source stays as it is
            layer = copy.deepcopy(layer)
            adapter.add_zero_biases(layer, bias_fields)
        return layer

    resumable = sink is not None and hasattr(sink, "resume_state")
    fingerprint = run_fingerprint(source, config, windows, holdout, masks) if resumable else ""
    resumed = sink.resume_state(fingerprint) if resumable else None
    batch = device_batch(config, windows.shape[1])
    windows, holdout = distributed.shard_windows(windows, holdout, batch)

    with calibration_mode(out):
        stream = LayerStream.capture(out, layers, windows, batch, device, dtype)
        t_alloc = time.perf_counter()
        allocation = _allocation(config, adapter, out, dense_layer, stream, holdout, masks, resumed, gen, progress)
        alloc_info = {**allocation.info, "seconds": time.perf_counter() - t_alloc}
        if sink is not None and sink.release and hasattr(sink, "release_rest"):
            sink.release_rest(out, prefix)  # embeddings and head: written now, not held through the loop
        _check_output(config, adapter, allocation, masks)
        loop = LayerLoop(config, adapter, layers, prefix, dense_layer, LayerPruner(config, adapter, device, dtype, gen),
                         allocation, alloc_info, masks, sink, fingerprint if resumable else None, resumed)
        plans = loop.run(stream, progress)
    return finish(source.config, out, adapter, config, plans, dense_params, total_dense, alloc_info,
                  {"prune_seconds": time.perf_counter() - t0})


def _allocation(config: PruneConfig, adapter: Adapter, out: nn.Module, dense_layer: Callable[[int], nn.Module],
                stream: LayerStream, holdout: torch.Tensor | None, masks: PrunePlan | None,
                resumed: dict[str, Any] | None, gen: torch.Generator, progress: bool) -> Allocation:
    """The kept fraction of every module: an interrupted run's exactly (and its generator state),
    the uniform rule for replayed masks, else config.allocation.rule."""
    if resumed is not None:  # the interrupted run's allocation, exactly
        gen.set_state(torch.tensor(resumed["rng"], dtype=torch.uint8))
        return Allocation({(int(i), k): float(v) for i, k, v in resumed["allocation"]["keep"]},
                          resumed["allocation"]["info"])
    if masks is not None:
        n = adapter.num_layers
        if len(masks.layers) != n:
            raise ValueError(f"masks plan has {len(masks.layers)} layers, the model {n}")
        uniform = config.replace(allocation=config.allocation.replace(rule="uniform", rho=1.0))
        allocation = allocate(uniform, adapter, out, dense_layer, stream, None, progress)
        allocation.info = {"rule": "replayed", "from": masks.allocation.get("rule")}
        return allocation
    rule = sensitivity.allocate if config.allocation.rule == "sensitivity" else allocate
    return rule(config, adapter, out, dense_layer, stream, holdout, progress)


def _check_family(config: PruneConfig, adapter: Adapter) -> None:
    """Before any work: the residual target needs a family whose MLP adds straight to the residual stream."""
    if config.refit.target == "residual" and not adapter.mlp_adds_to_residual():
        raise ValueError(f"target='residual' needs layers whose MLP output is added straight to the residual "
                         f"stream; {adapter.config.model_type} normalises it first. Use target='local'")


def _check_output(config: PruneConfig, adapter: Adapter, allocation: Allocation, masks: PrunePlan | None) -> None:
    """Before the first layer: the output config for the planned shapes must save and reload."""
    adapter.check_shapes([lp.shape for lp in masks.layers] if masks is not None
                         else planned_shapes(adapter, allocation.keep, config.prune_mlp, config.round_to))


@dataclass
class LayerLoop:
    """The sequential loop over decoder layers: each is pruned (or, resuming, replayed from its
    shard) on the outputs of the already-pruned layers before it, written to the sink, and both
    streams moved past it. Host: the output model's layers, both streams; device: one layer."""

    config: PruneConfig
    adapter: Adapter
    layers: nn.ModuleList  # the output model's decoder layers (meta placeholders until pruned)
    prefix: str
    dense_layer: Callable[[int], nn.Module]
    pruner: LayerPruner
    allocation: Allocation
    alloc_info: dict[str, Any]
    masks: PrunePlan | None
    sink: Any
    fingerprint: str | None  # None: the sink does not record progress
    resumed: dict[str, Any] | None

    def run(self, stream: LayerStream, progress: bool) -> list[LayerPlan]:
        """Prune every layer; `stream`: the layer-0 inputs of the calibration windows."""
        cfg, ad = self.config, self.adapter
        budget = Budget(self.allocation.keep, module_params(ad), carry_into_mlp=cfg.prune_mlp,
                         round_to=cfg.round_to)
        # the dense stream (targets) starts as the pruned one (inputs): layer 0 sees the same hidden states
        xd: LayerStream | None = stream if cfg.refit.target in ("dense", "residual") else None
        xp = stream
        done = {} if self.resumed is None else {e["index"]: LayerPlan(**e) for e in self.resumed["layers"]}
        plans: list[LayerPlan] = []
        bar = tqdm(range(len(self.layers)), desc="pruning", disable=not progress, unit="layer")
        for i in bar:
            if i in done:  # finished before an interruption: reload it and move both streams past it
                bar.set_description(f"replaying layer {i}")
                lp = done[i]
                shard = self.sink.layer_state(i) if hasattr(self.sink, "layer_state") else self.sink.layer_path(i)
                new_layer, xd_next, xp = replay_layer(ad, self.dense_layer(i), lp, shard, self.prefix, xd, xp)
                budget.replayed(i, len(lp.kept_heads) * ad.q_head_cost + len(lp.kept_kv_heads) * ad.kv_head_cost,
                                len(lp.kept_neurons) * ad.neuron_cost)
            else:
                bar.set_description(f"pruning layer {i}")
                fixed = self.masks.layers[i] if self.masks is not None else None
                new_layer, lp, xd_next, xp = self.pruner.prune(i, self.dense_layer(i), xd, xp, budget, fixed)
                lp.rule = _rule_label(self.alloc_info)
                imp = self.alloc_info.get("importance", {})
                lp.importance = {k: imp[f"{i}.{k}"] for k in ("attn", "mlp") if f"{i}.{k}" in imp}
            self.layers[i] = new_layer
            plans.append(lp)
            self._write(i, new_layer, plans, replayed=i in done)
            xd = xd_next if xd is not None else None
            _log_layer(lp)
        return plans

    def _write(self, i: int, layer: nn.Module, plans: list[LayerPlan], replayed: bool) -> None:
        """Layer `i` to the sink (a replayed one is there already) with the run's progress; with a
        releasing sink its placeholder goes back to the meta device."""
        if self.sink is None:
            return
        if not replayed:
            self.sink.write_layer(i, self.prefix, layer)
            if self.fingerprint is not None:
                saved = {"keep": [[j, k, v] for (j, k), v in self.allocation.keep.items()],
                         "info": self.allocation.info}
                self.sink.record(self.fingerprint, saved, [asdict(p) for p in plans],
                                 self.pruner.gen.get_state().tolist())
        if self.sink.release:
            self.layers[i] = layer.to("meta")


def _log_layer(lp: LayerPlan) -> None:
    log.info("layer %d: heads %d/%d kv %d/%d neurons %d/%d %s", lp.index, len(lp.kept_heads),
             lp.dense_shape["num_heads"], len(lp.kept_kv_heads), lp.dense_shape["num_kv_heads"],
             len(lp.kept_neurons), lp.dense_shape["intermediate_size"],
             {k: {m: round(v, 5) for m, v in d.items()} for k, d in lp.recon.items()})


def _rule_label(info: dict[str, Any]) -> str:
    t = info.get("temperature")
    return info["rule"] if t is None else f"{info['rule']} (T={t:.4g}, {info.get('temperature_source')})"
