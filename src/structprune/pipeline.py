"""The layer loop: capture -> statistics -> importance -> allocation -> reconstruction -> surgery.

Sequential and streamed: decoder layer i is copied to the compute device, pruned with
statistics gathered on the outputs of the already-pruned layers 0..i-1, re-fitted, and
moved back to the host before layer i+1 is touched. Two activation streams live on the
host: the dense model's hidden states (targets) and the pruned model's (inputs).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from dataclasses import asdict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed, sensitivity
from .arch import Adapter, LayerShape, get_adapter
from .config import PruneConfig
from .importance import column_scores, unit_scores
from .methods.output import decoder_params, finish, open_output
from .plan import LayerPlan, PrunePlan
from .planning import Allocation, allocate, check_reachable, module_params
from .reconstruct.lstsq import GramAccumulator, refit_consumer, refit_to_target
from .selection import neuron_count, obs_select_columns, obs_unit_costs, select_heads, select_neurons
from .source import LayerSource, ModelSource, layers_prefix
from .streaming import (
    _StopForward,
    calibration_mode,
    capture_input,
    capture_layer_inputs,
    device_copy,
    resolve_device,
    run_layer,
    to_device,
)
from .surgery import get_bias, get_weight, head_columns, set_weight

log = logging.getLogger(__name__)


class _Budget:
    """Turns per-module kept fractions into parameter targets. The rounding of a layer's
    attention (coarse: whole heads) is carried into the same layer's MLP (fine: neurons), and
    no further, so equal fractions give equal layer shapes (a vanilla checkpoint); never into an
    MLP that may not be pruned (prune_mlp=False): it keeps every neuron, and the rounding goes to
    the next layer's attention instead (error diffusion: the whole model stays within half a head
    of its budget, where rounding every layer the same way could miss it by half a head per layer).
    With `round_to` > 1 (kept neurons rounded to a multiple, --round-to) an MLP's rounding
    is carried into the next layer's MLP too, so the whole model still meets its sparsity."""

    def __init__(self, keep: dict[tuple[int, str], float], params: dict[tuple[int, str], int],
                 carry_into_mlp: bool = True, round_to: int = 1) -> None:
        self.keep = keep
        self.params = params
        self.carry = 0.0
        self.carry_into_mlp = carry_into_mlp
        self.mlp_carry = 0.0
        self.carry_across_layers = round_to > 1 and carry_into_mlp

    def target(self, key: tuple[int, str]) -> float:
        carry = self.carry if (key[1] == "mlp") == self.carry_into_mlp else 0.0
        if key[1] == "mlp" and self.carry_across_layers:
            carry += self.mlp_carry
        return self.keep[key] * self.params[key] + carry

    def spent(self, key: tuple[int, str], target: float, actual: int) -> None:
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


def planned_shapes(adapter: Adapter, keep: dict[tuple[int, str], float], carry_into_mlp: bool = True,
                   round_to: int = 1) -> list[LayerShape]:
    """The layer shapes the kept fractions `keep` lead to under `_Budget` and the selection rules
    (exact, except where two head layouts of equal parameter count tie: the scores break that tie)."""
    budget = _Budget(keep, module_params(adapter), carry_into_mlp=carry_into_mlp, round_to=round_to)
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


class LayerPruner:
    """Prunes one decoder layer on the compute device. Holds nothing between layers."""

    def __init__(self, config: PruneConfig, adapter: Adapter, device: torch.device, dtype: torch.dtype,
                 gen: torch.Generator) -> None:
        self.config = config
        self.adapter = adapter
        self.device = device
        self.dtype = dtype
        self.gen = gen

    def _stats(self, dense: nn.Module, pruned: nn.Module, consumer: Callable[[nn.Module], nn.Module],
               xd: list[torch.Tensor] | None, xp: list[torch.Tensor], call: tuple, want_dense_out: bool,
               shared_prefix: bool, block_io: bool = False, cross: bool = True, residual: bool = False
               ) -> tuple[GramAccumulator, list[torch.Tensor] | None, tuple[list[torch.Tensor], list[torch.Tensor]],
                          tuple[torch.Tensor, float] | None]:
        """Gram statistics of `consumer`'s input on both streams; optionally the dense layer outputs.

        shared_prefix: the pruned layer is still identical to the dense one up to `consumer`, so
        when both streams hold the same tensor the dense run can be skipped.
        cross: the dense stream's consumer inputs enter the statistics (target "dense"); without
        it the statistics are single-stream and the dense stream only gives the layer outputs.
        residual: also the sums of the residual target (`_residual_sums`; needs want_dense_out): the
        pruned run then goes through the whole layer instead of stopping at `consumer`."""
        n = get_weight(consumer(pruned)).shape[1]
        acc = GramAccumulator(n, device=self.device, full=self.config.reconstruction != "none"
                              or self.config.selection == "obs")
        dense_out: list[torch.Tensor] | None = [] if want_dense_out else None
        block_in: list[torch.Tensor] = []
        block_out: list[torch.Tensor] = []
        producer = self.adapter.mlp_producers(pruned)[0]
        target: tuple[torch.Tensor, float] | None = None
        for b in range(len(xp)):
            sink_p: list[torch.Tensor] = []
            sink_in: list[torch.Tensor] = []
            sink_c: list[torch.Tensor] = []
            last = (_capture_output(consumer(pruned), sink_c, stop=False) if residual
                    else _stop_after(consumer(pruned)))
            with capture_input(consumer(pruned), sink_p), last, capture_input(producer, sink_in if block_io else []):
                if residual:
                    with torch.no_grad():
                        out_p = run_layer(pruned, xp[b].to(self.device, self.dtype), call)
                else:
                    _safe_run(pruned, xp[b].to(self.device, self.dtype), call)
            if block_io:
                block_in.append(sink_in[0].reshape(-1, sink_in[0].shape[-1]).float().cpu())
            x_d = None  # None: the target is the dense weights applied to the pruned input
            if xd is not None and (want_dense_out or not (shared_prefix and xd[b] is xp[b])):
                sink_d: list[torch.Tensor] = []
                with capture_input(consumer(dense), sink_d):
                    if want_dense_out:
                        out = run_layer(dense, xd[b].to(self.device, self.dtype), call)
                        dense_out.append(out.float().cpu())
                    else:
                        with _stop_after(consumer(dense)):
                            _safe_run(dense, xd[b].to(self.device, self.dtype), call)
                x_d = sink_d[0]
            if residual:
                part = _residual_sums(sink_p[0], sink_c[0], out_p, dense_out[-1])
                target = part if target is None else (target[0] + part[0], target[1] + part[1])
                del out_p
            x_d = x_d if cross else None
            acc.add_batch(sink_p[0], x_d)
            if block_io:
                with torch.no_grad():
                    y = consumer(dense)(sink_p[0] if x_d is None else x_d)
                block_out.append(y.reshape(-1, y.shape[-1]).float().cpu())
        distributed.reduce_gram(acc)  # sharded calibration: every rank now holds the sums over all tokens
        target = distributed.reduce_target(target)
        return acc, dense_out, (block_in, block_out), target

    def _refit(self, module: nn.Module, dense_module: nn.Module, stats: GramAccumulator,
               keep_cols: torch.Tensor, target: tuple[torch.Tensor, float] | None = None) -> dict[str, float]:
        """Set `module` (already sliced) to the re-fit of the dense consumer on `keep_cols`; with
        `target` (the residual target's sums from `_stats`) towards that target (`refit_to_target`)."""
        if self.config.reconstruction == "none":  # slicing already done; no statistics for errors
            return {}
        # the dense module may be the host layer itself (see prune): read in the run dtype, never modified
        w, b = get_weight(dense_module).detach().to(self.device, self.dtype), get_bias(dense_module)
        b = None if b is None else b.detach().to(self.device, self.dtype)
        # the statistics serve one re-fit: their Gram is freed inside it, before the factorisation
        if target is None:
            new_w, new_b, errors = refit_consumer(w, b, stats, keep_cols, self.config.damp, release=True)
        else:
            new_w, new_b, errors = refit_to_target(w, b, stats, target[0], target[1], keep_cols, self.config.damp,
                                                   self.config.target_mix, release=True)
        set_weight(module, new_w, new_b)
        return errors

    def _admm(self, pruned: nn.Module, dense: nn.Module, keep: torch.Tensor, block_in: list[torch.Tensor],
              block_out: list[torch.Tensor]) -> dict[str, Any]:
        """Structured ADMM re-fit of the MLP block (producers and consumer) on the kept neurons."""
        from .reconstruct.admm import admm_mlp

        ad, cfg = self.adapter, self.config
        x = torch.cat(block_in).to(self.device)
        y = torch.cat(block_out).to(self.device)
        prods = ad.mlp_producers(dense)
        res = admm_mlp(x, y, [get_weight(m) for m in prods], [get_bias(m) for m in prods],
                       get_weight(ad.down_proj(dense)), get_bias(ad.down_proj(dense)), keep,
                       act=ad.mlp_activation(), gated=ad.gated, iters=cfg.admm_iters, alpha=cfg.admm_alpha,
                       beta=cfg.admm_beta, gamma=cfg.admm_gamma, damp=cfg.damp, chunk_tokens=cfg.chunk_tokens,
                       sgd_steps=cfg.admm_sgd_steps)
        for m, w, b in zip(ad.mlp_producers(pruned), res.producers, res.producer_biases):
            set_weight(m, w, b)
        set_weight(ad.down_proj(pruned), res.consumer, res.consumer_bias)
        first, best = res.history[0], res.history[max(res.best_iter, 0)]
        if res.rejected:
            log.warning("ADMM rejected %d of %d steps (objective rose); kept iterate %d", res.rejected,
                        cfg.admm_iters, res.best_iter)
        return {"admm_error_start": float(first["objective"]), "admm_error": float(best["objective"]),
                "admm_best_iter": res.best_iter, "admm_rejected": res.rejected}

    def _admm_attention(self, pruned: nn.Module, dense: nn.Module, xp: list[torch.Tensor], call: tuple
                        ) -> dict[str, Any]:
        """Alternate the value and output projections of the pruned attention block (reconstruct/attention.py)
        towards the dense attention output on the same inputs. Targets live on the host."""
        from .reconstruct.attention import alternate_attention

        ad, cfg = self.adapter, self.config
        o_d, o_p = ad.o_proj(dense), ad.o_proj(pruned)
        targets = []
        for x in xp:
            sink: list[torch.Tensor] = []
            with _capture_output(o_d, sink), torch.no_grad():
                _safe_run(dense, x.to(self.device, self.dtype), call)
            targets.append(sink[0].detach().float().cpu())
        count = sum(t.numel() // t.shape[-1] for t in targets)

        def forward(b: int) -> tuple[torch.Tensor, torch.Tensor]:
            sink_in: list[torch.Tensor] = []
            sink_out: list[torch.Tensor] = []
            with capture_input(o_p, sink_in), _capture_output(o_p, sink_out):
                _safe_run(pruned, xp[b].to(self.device, self.dtype), call)
            return sink_in[0], sink_out[0]

        for p in pruned.parameters():  # gradients for the value projection only
            p.requires_grad_(False)
        value = ad.q_k_v(pruned)[2]
        fit = alternate_attention(forward, targets, count, o_p, list(value.parameters()), cfg.admm_iters,
                                  cfg.admm_attn_steps, cfg.damp, get_weight, get_bias, set_weight)
        if fit.rejected:
            log.warning("attention ADMM rejected %d of %d iterations (error rose); kept iterate %d", fit.rejected,
                        cfg.admm_iters, fit.best_iter)
        return {"admm_error_start": fit.history[0], "admm_error": fit.history[fit.best_iter],
                "admm_best_iter": fit.best_iter, "admm_rejected": fit.rejected}

    def prune(self, index: int, host_layer: nn.Module, xd: list[torch.Tensor] | None, xp: list[torch.Tensor],
              call: tuple, budget: _Budget, fixed: LayerPlan | None = None) -> tuple[nn.Module, LayerPlan, list[torch.Tensor] | None, list[torch.Tensor]]:
        """Returns (pruned layer on the host, its plan, next dense stream, next pruned stream)."""
        ad, cfg = self.adapter, self.config
        call = to_device(call, self.device, self.dtype)
        # One device copy of the layer (the one pruned). A second, dense copy only when the dense
        # layer is run: a dense target stream or ADMM. Otherwise the re-fits read the dense consumer
        # weights straight from the host layer.
        run_dense = xd is not None or cfg.reconstruction == "admm"
        dense = device_copy(host_layer, self.device, self.dtype) if run_dense else host_layer
        pruned = device_copy(host_layer, self.device, self.dtype)
        shape = ad.layer_shape(dense)
        hd = ad.head_dim
        recon: dict[str, Any] = {}

        # attention: score query heads on o_proj, keep whole KV groups, re-fit o_proj
        key = (index, "attn")
        stats, _, _, _ = self._stats(dense, pruned, ad.o_proj, xd if cfg.target == "dense" else None, xp, call,
                                     want_dense_out=False, shared_prefix=True)
        head_scores = unit_scores(column_scores(cfg.scorer, get_weight(ad.o_proj(pruned)), stats, self.gen), hd)
        target = budget.target(key)
        if fixed is not None:  # replay a plan's masks (e.g. to compare re-fits on the same units)
            keep_q, keep_kv = torch.tensor(fixed.kept_heads), torch.tensor(fixed.kept_kv_heads)
        else:
            choose_by = head_scores
            if cfg.selection == "obs" and target < ad.attn_params(shape):
                o = ad.o_proj(dense)
                choose_by = obs_unit_costs(get_weight(o), stats.gram, hd, cfg.damp, get_bias(o))
            keep_q, keep_kv = select_heads(choose_by, shape.num_kv_heads, target, ad.q_head_cost,
                                           ad.kv_head_cost)
        actual = keep_q.numel() * ad.q_head_cost + keep_kv.numel() * ad.kv_head_cost
        budget.spent(key, target, actual)
        if keep_q.numel() < shape.num_heads:
            ad.slice_heads(pruned, keep_q, keep_kv)
            recon["attn"] = self._refit(ad.o_proj(pruned), ad.o_proj(dense), stats, head_columns(keep_q, hd))
            if cfg.reconstruction == "admm" and cfg.admm_attn_steps > 0:
                recon["attn"].update(self._admm_attention(pruned, dense, xp, call))
        del stats

        # MLP: score neurons on the consumer, re-fit it; dense outputs become the next targets
        key = (index, "mlp")
        admm = cfg.reconstruction == "admm"
        stats, dense_out, (block_in, block_out), residual = self._stats(
            dense, pruned, ad.down_proj, xd, xp, call, want_dense_out=xd is not None, shared_prefix=False,
            block_io=admm, cross=cfg.target == "dense", residual=cfg.target == "residual")
        neuron_scores = column_scores(cfg.scorer, get_weight(ad.down_proj(pruned)), stats, self.gen)
        target = budget.target(key)
        if fixed is not None:
            keep_n = torch.tensor(fixed.kept_neurons)
        elif cfg.selection == "obs":
            down = ad.down_proj(dense)
            keep_n = obs_select_columns(get_weight(down), stats.gram,
                                        neuron_count(target, ad.neuron_cost, shape.intermediate_size, cfg.round_to),
                                        cfg.damp,
                                        get_bias(down))
        else:
            keep_n = select_neurons(neuron_scores, target, ad.neuron_cost, cfg.round_to)
        budget.spent(key, target, keep_n.numel() * ad.neuron_cost)
        if keep_n.numel() < shape.intermediate_size or residual is not None:  # residual: every layer is re-fitted
            ad.slice_neurons(pruned, keep_n)
            recon["mlp"] = self._refit(ad.down_proj(pruned), ad.down_proj(dense), stats, keep_n, residual)
            if admm:
                recon["mlp"].update(self._admm(pruned, dense, keep_n, block_in, block_out))
        del stats, block_in, block_out

        next_p = [run_layer(pruned, x.to(self.device, self.dtype), call).float().cpu() for x in xp]
        del dense
        plan = LayerPlan(
            index=index,
            kept_heads=keep_q.tolist(),
            kept_kv_heads=keep_kv.tolist(),
            kept_neurons=keep_n.tolist(),
            dense_shape=shape.to_dict(),
            head_scores=head_scores.tolist(),
            neuron_scores=neuron_scores.tolist(),
            attn_keep_target=budget.keep[(index, "attn")],
            mlp_keep_target=budget.keep[(index, "mlp")],
            rule=cfg.allocation,
            recon=recon,
        )
        return pruned.to("cpu"), plan, dense_out, next_p


class _stop_after:
    """Context manager: raise _StopForward right after `module` has seen its input."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.handle: Any = None

    def __enter__(self) -> "_stop_after":
        def hook(_m: nn.Module, _args: tuple) -> None:
            raise _StopForward

        self.handle = self.module.register_forward_pre_hook(hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()


class _capture_output:
    """Context manager: append `module`'s output (graph kept) to `sink`; with `stop`, then stop the forward."""

    def __init__(self, module: nn.Module, sink: list[torch.Tensor], stop: bool = True) -> None:
        self.module, self.sink, self.stop = module, sink, stop
        self.handle: Any = None

    def __enter__(self) -> "_capture_output":
        def hook(_m: nn.Module, _args: tuple, output: torch.Tensor) -> None:
            self.sink.append(output)
            if self.stop:
                raise _StopForward

        self.handle = self.module.register_forward_hook(hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()


def _residual_sums(x: torch.Tensor, consumer_out: torch.Tensor, layer_out: torch.Tensor,
                   dense_layer_out: torch.Tensor) -> tuple[torch.Tensor, float]:
    """One batch's sums of the MLP consumer's residual target (`refit_to_target`).

    For each token, t = (dense layer's output on the dense stream) - (pruned stream's residual before
    the MLP), that residual being h_mid = layer_out - consumer_out on a run of the pruned layer whose
    MLP is not yet sliced. A consumer that outputs t makes the layer's output equal the dense model's,
    correcting the error the pruned layers before it left in the stream.
    Returns (T = sum t [x, 1]^T [out, n+1] float64, sum ||t||^2)."""
    d = layer_out.shape[-1]  # some families (OPT) run the MLP on flattened tokens
    t = dense_layer_out.to(layer_out.device).reshape(-1, d).double() \
        - (layer_out.reshape(-1, d) - consumer_out.reshape(-1, d)).double()
    x = x.reshape(t.shape[0], -1).double()
    x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)
    return t.T @ x, float((t * t).sum())


def _safe_run(layer: nn.Module, hidden: torch.Tensor, call: tuple) -> None:
    try:
        run_layer(layer, hidden, call)
    except _StopForward:
        pass


def device_batch(config: PruneConfig, seqlen: int) -> int:
    """Calibration windows per device batch: at most `batch_size`, and at most `chunk_tokens`
    tokens (never less than one window). The activations on the compute device scale with it."""
    return max(1, min(config.batch_size, config.chunk_tokens // seqlen))


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
    out, adapter, bias_fields = open_output(source, config.bias_compensation and config.reconstruction != "none")
    check_reachable(config, adapter)  # an unreachable sparsity fails before any work
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
    windows, holdout = distributed.shard_windows(windows, holdout, device_batch(config, windows.shape[1]))

    with calibration_mode(out):
        hidden, calls = capture_layer_inputs(out, layers, windows, device_batch(config, windows.shape[1]))
        t_alloc = time.perf_counter()
        if resumed is not None:  # the interrupted run's allocation, exactly
            allocation = Allocation({(int(i), k): float(v) for i, k, v in resumed["allocation"]["keep"]},
                                    resumed["allocation"]["info"])
            gen.set_state(torch.tensor(resumed["rng"], dtype=torch.uint8))
        elif masks is not None:
            if len(masks.layers) != len(layers):
                raise ValueError(f"masks plan has {len(masks.layers)} layers, the model {len(layers)}")
            allocation = allocate(config.replace(allocation="uniform", rho=1.0), adapter, out, layers, dense_layer, hidden,
                                  calls, None, device, dtype, progress)
            allocation.info = {"rule": "replayed", "from": masks.allocation.get("rule")}
        else:
            rule = sensitivity.allocate if config.allocation == "sensitivity" else allocate
            allocation = rule(config, adapter, out, layers, dense_layer, hidden, calls, holdout, device, dtype,
                              progress)
        alloc_info = {**allocation.info, "seconds": time.perf_counter() - t_alloc}
        if sink is not None and sink.release and hasattr(sink, "release_rest"):
            sink.release_rest(out, prefix)  # embeddings and head: written now, not held through the loop
        budget = _Budget(allocation.keep, module_params(adapter), carry_into_mlp=config.prune_mlp,
                         round_to=config.round_to)
        # the output config for the planned shapes must save and reload: checked before the first layer
        adapter.check_shapes([lp.shape for lp in masks.layers] if masks is not None
                             else planned_shapes(adapter, allocation.keep, config.prune_mlp, config.round_to))
        if config.target == "residual" and not adapter.mlp_adds_to_residual():
            raise ValueError(f"target='residual' needs layers whose MLP output is added straight to the residual "
                             f"stream; {source.config.model_type} normalises it first. Use target='local'")
        xd: list[torch.Tensor] | None = hidden if config.target in ("dense", "residual") else None
        xp = hidden
        pruner = LayerPruner(config, adapter, device, dtype, gen)
        plans: list[LayerPlan] = []
        done = {} if resumed is None else {e["index"]: LayerPlan(**e) for e in resumed["layers"]}
        saved_alloc = {"keep": [[i, k, v] for (i, k), v in allocation.keep.items()], "info": allocation.info}
        bar = tqdm(range(len(layers)), desc="pruning", disable=not progress, unit="layer")
        for i in bar:
            if i in done:  # finished before an interruption: reload it and move both streams past it
                bar.set_description(f"replaying layer {i}")
                lp = done[i]
                shard = sink.layer_state(i) if hasattr(sink, "layer_state") else sink.layer_path(i)
                new_layer, xd_next, xp = _replay_layer(adapter, dense_layer(i), lp, shard, prefix, xd,
                                                       xp, calls[i], device, dtype)
                budget.replayed(i, len(lp.kept_heads) * adapter.q_head_cost + len(lp.kept_kv_heads) *
                                adapter.kv_head_cost, len(lp.kept_neurons) * adapter.neuron_cost)
            else:
                bar.set_description(f"pruning layer {i}")
                fixed = masks.layers[i] if masks is not None else None
                new_layer, lp, xd_next, xp = pruner.prune(i, dense_layer(i), xd, xp, calls[i], budget, fixed)
                lp.rule = _rule_label(alloc_info)
                imp = alloc_info.get("importance", {})
                lp.importance = {k: imp[f"{i}.{k}"] for k in ("attn", "mlp") if f"{i}.{k}" in imp}
            layers[i] = new_layer
            plans.append(lp)
            if sink is not None:
                if i not in done:
                    sink.write_layer(i, prefix, new_layer)
                    if resumable:
                        sink.record(fingerprint, saved_alloc, [asdict(p) for p in plans], gen.get_state().tolist())
                if sink.release:
                    layers[i] = new_layer.to("meta")
            xd = xd_next if xd is not None else None
            log.info("layer %d: heads %d/%d kv %d/%d neurons %d/%d %s", i, len(lp.kept_heads),
                     lp.dense_shape["num_heads"], len(lp.kept_kv_heads), lp.dense_shape["num_kv_heads"],
                     len(lp.kept_neurons), lp.dense_shape["intermediate_size"],
                     {k: {m: round(v, 5) for m, v in d.items()} for k, d in lp.recon.items()})
    return finish(source.config, out, adapter, config, plans, dense_params, total_dense, alloc_info,
                  {"prune_seconds": time.perf_counter() - t0})


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


def _replay_layer(adapter: Adapter, host_layer: nn.Module, lp: LayerPlan, path: Any, prefix: str,
                  xd: list[torch.Tensor] | None, xp: list[torch.Tensor], call: tuple, device: torch.device,
                  dtype: torch.dtype) -> tuple[nn.Module, list[torch.Tensor] | None, list[torch.Tensor]]:
    """A finished layer of an interrupted run: its dense copy sliced to the plan and loaded from
    its shard; returns (layer on the host, next dense stream, next pruned stream) exactly as the
    original run computed them."""
    from safetensors.torch import load_file

    layer = copy.deepcopy(host_layer)
    dense = adapter.layer_shape(layer)
    if (lp.shape.num_heads, lp.shape.num_kv_heads) != (dense.num_heads, dense.num_kv_heads):
        adapter.slice_heads(layer, torch.tensor(lp.kept_heads), torch.tensor(lp.kept_kv_heads))
    if lp.shape.intermediate_size != dense.intermediate_size:
        adapter.slice_neurons(layer, torch.tensor(lp.kept_neurons))
    head = f"{prefix}.{lp.index}."
    state = path if isinstance(path, dict) else load_file(str(path))  # a dict: sent by rank 0 (distributed.py)
    layer.load_state_dict({k[len(head):]: v for k, v in state.items()}, strict=True)
    call = to_device(call, device, dtype)
    run = device_copy(layer, device, dtype)
    xp_next = [run_layer(run, x.to(device, dtype), call).float().cpu() for x in xp]
    xd_next = None
    if xd is not None:
        ref = device_copy(host_layer, device, dtype)
        xd_next = [run_layer(ref, x.to(device, dtype), call).float().cpu() for x in xd]
    return layer, xd_next, xp_next


def _rule_label(info: dict[str, Any]) -> str:
    t = info.get("temperature")
    return info["rule"] if t is None else f"{info['rule']} (T={t:.4g}, {info.get('temperature_source')})"
