"""One decoder layer, pruned on the compute device: statistics -> importance -> selection ->
re-fit, for its attention (query heads, whole KV groups) then its MLP (neurons).

Device: a copy of the layer being pruned, a dense copy when the dense layer is run (a dense
target stream or ADMM), one batch and the consumer's running statistics. Host: both streams.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import distributed
from .allocation.budget import Budget
from .arch import Adapter, LayerShape
from .config import PruneConfig
from .importance import column_scores, unit_scores
from .plan import LayerPlan
from .reconstruct.lstsq import refit_consumer, refit_to_target
from .stats import GramAccumulator
from .runtime.hooks import capture_input, capture_output, run_layer, run_until_stopped, stop_after
from .runtime.stream import Call, LayerStream
from .selection import neuron_count, obs_select_columns, obs_unit_costs, select_heads, select_neurons
from .surgery import get_bias, get_weight, head_columns, set_weight

log = logging.getLogger(__name__)

@dataclass
class LayerWork:
    """One layer being pruned: its copies, its input streams and what the re-fits reported.

    dense: the dense layer on the device, or the host layer itself when it is never run (read only);
    pruned: the device copy being sliced; xd: the dense stream (targets) or None; xp: the pruned
    stream (inputs); call: the layer's call arguments on the device."""

    index: int
    dense: nn.Module
    pruned: nn.Module
    shape: LayerShape
    xd: LayerStream | None
    xp: LayerStream
    call: Call
    recon: dict[str, Any] = field(default_factory=dict)


@dataclass
class ConsumerStats:
    """One pass over the streams for a consumer projection (o_proj or down_proj).

    acc: its input statistics (both streams with a dense target); dense_out: the dense layer's
    outputs (the next dense stream) when asked; block_in / block_out: the MLP block's input and
    dense output per batch (host float32, for ADMM); target: the residual target's sums."""

    acc: GramAccumulator
    dense_out: list[torch.Tensor] | None = None
    block_in: list[torch.Tensor] = field(default_factory=list)
    block_out: list[torch.Tensor] = field(default_factory=list)
    target: tuple[torch.Tensor, float] | None = None


class LayerPruner:
    """Prunes one decoder layer on the compute device. Holds nothing between layers."""

    def __init__(self, config: PruneConfig, adapter: Adapter, device: torch.device, dtype: torch.dtype,
                 gen: torch.Generator) -> None:
        self.config = config
        self.adapter = adapter
        self.device = device
        self.dtype = dtype
        self.gen = gen

    def prune(self, index: int, host_layer: nn.Module, xd: LayerStream | None, xp: LayerStream, budget: Budget,
              fixed: LayerPlan | None = None) -> tuple[nn.Module, LayerPlan, LayerStream | None, LayerStream]:
        """Returns (pruned layer on the host, its plan, next dense stream, next pruned stream).
        fixed: a plan whose kept units are replayed instead of selected."""
        # One device copy of the layer (the one pruned). A second, dense copy only when the dense
        # layer is run: a dense target stream or ADMM. Otherwise the re-fits read the dense consumer
        # weights straight from the host layer.
        run_dense = xd is not None or self.config.refit.method == "admm"
        dense = xp.onload(host_layer) if run_dense else host_layer
        w = LayerWork(index, dense, xp.onload(host_layer), self.adapter.layer_shape(dense), xd, xp, xp.call(index))
        keep_q, keep_kv, head_scores = self._prune_attention(w, budget, fixed)
        keep_n, neuron_scores, dense_out = self._prune_mlp(w, budget, fixed)
        next_p = xp.run(w.pruned, index)
        plan = LayerPlan(
            index=index,
            kept_heads=keep_q.tolist(),
            kept_kv_heads=keep_kv.tolist(),
            kept_neurons=keep_n.tolist(),
            dense_shape=w.shape.to_dict(),
            head_scores=head_scores.tolist(),
            neuron_scores=neuron_scores.tolist(),
            attn_keep_target=budget.keep[(index, "attn")],
            mlp_keep_target=budget.keep[(index, "mlp")],
            rule=self.config.allocation.rule,
            recon=w.recon,
        )
        next_d = None if dense_out is None else xd.with_hidden(dense_out)
        return w.pruned.to("cpu"), plan, next_d, next_p

    def _prune_attention(self, w: LayerWork, budget: Budget, fixed: LayerPlan | None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Score query heads on o_proj, keep whole KV groups, re-fit o_proj; (kept q, kept kv, head scores)."""
        ad, cfg, hd = self.adapter, self.config, self.adapter.head_dim
        key = (w.index, "attn")
        target = budget.target(key)
        n_q, n_kv = w.shape.num_heads, w.shape.num_kv_heads
        if fixed is None and self._whole(target >= n_kv * ad.kv_head_cost + n_q * ad.q_head_cost):
            budget.spent(key, target, n_q * ad.q_head_cost + n_kv * ad.kv_head_cost)
            return torch.arange(n_q), torch.arange(n_kv), torch.zeros(0)
        stats = self._stats(w, "attn").acc
        head_scores = unit_scores(column_scores(cfg.scorer, get_weight(ad.o_proj(w.pruned)), stats, self.gen), hd)
        if fixed is not None:  # replay a plan's masks (e.g. to compare re-fits on the same units)
            keep_q, keep_kv = torch.tensor(fixed.kept_heads), torch.tensor(fixed.kept_kv_heads)
        else:
            choose_by = head_scores
            if cfg.selection == "obs" and target < ad.attn_params(w.shape):
                o = ad.o_proj(w.dense)
                choose_by = obs_unit_costs(get_weight(o), stats.gram, hd, cfg.refit.damp, get_bias(o))
            keep_q, keep_kv = select_heads(choose_by, w.shape.num_kv_heads, target, ad.q_head_cost,
                                           ad.kv_head_cost)
        budget.spent(key, target, keep_q.numel() * ad.q_head_cost + keep_kv.numel() * ad.kv_head_cost)
        if keep_q.numel() < w.shape.num_heads:
            ad.slice_heads(w.pruned, keep_q, keep_kv)
            w.recon["attn"] = self._refit(ad.o_proj(w.pruned), ad.o_proj(w.dense), stats, head_columns(keep_q, hd))
            if cfg.refit.method == "admm" and cfg.refit.admm.attn_steps > 0:
                w.recon["attn"].update(self._admm_attention(w))
        return keep_q, keep_kv, head_scores

    def _prune_mlp(self, w: LayerWork, budget: Budget, fixed: LayerPlan | None
                   ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor] | None]:
        """Score neurons on the consumer, re-fit it; (kept neurons, neuron scores, dense layer outputs)."""
        ad, cfg = self.adapter, self.config
        key = (w.index, "mlp")
        target = budget.target(key)
        n = w.shape.intermediate_size
        if (fixed is None and w.xd is None and cfg.refit.target == "local"
                and self._whole(neuron_count(target, ad.neuron_cost, n, cfg.round_to) == n)):
            budget.spent(key, target, n * ad.neuron_cost)
            return torch.arange(n), torch.zeros(0), None
        st = self._stats(w, "mlp")
        neuron_scores = column_scores(cfg.scorer, get_weight(ad.down_proj(w.pruned)), st.acc, self.gen)
        if fixed is not None:
            keep_n = torch.tensor(fixed.kept_neurons)
        elif cfg.selection == "obs":
            down = ad.down_proj(w.dense)
            keep_n = obs_select_columns(get_weight(down), st.acc.gram,
                                        neuron_count(target, ad.neuron_cost, w.shape.intermediate_size, cfg.round_to),
                                        cfg.refit.damp, get_bias(down))
        else:
            keep_n = select_neurons(neuron_scores, target, ad.neuron_cost, cfg.round_to)
        budget.spent(key, target, keep_n.numel() * ad.neuron_cost)
        if keep_n.numel() < w.shape.intermediate_size or st.target is not None:  # residual: every layer re-fitted
            ad.slice_neurons(w.pruned, keep_n)
            w.recon["mlp"] = self._refit(ad.down_proj(w.pruned), ad.down_proj(w.dense), st.acc, keep_n, st.target)
            if cfg.refit.method == "admm":
                w.recon["mlp"].update(self._admm(w.pruned, w.dense, keep_n, st.block_in, st.block_out))
        return keep_n, neuron_scores, st.dense_out

    def _whole(self, keeps_every_unit: bool) -> bool:
        """Whether a module that keeps every unit is left as it is without gathering its statistics:
        nothing would read them (no unit is removed, so there is no re-fit; the local target asks
        none of a whole module). Not with OBS selection or a scorer that draws random numbers (the
        generator's stream must not depend on which modules are whole)."""
        return keeps_every_unit and self.config.selection != "obs" and self.config.scorer != "random"

    def _stats(self, w: LayerWork, kind: str) -> ConsumerStats:
        """Gram statistics of the consumer of `kind` on both streams, and what else the target needs.

        attn: o_proj's input; the dense stream enters only with target "dense", and its run is skipped
        where both streams hold the same tensor (the layer is still dense up to o_proj).
        mlp: down_proj's input; the dense stream, when there is one, gives the layer outputs (the next
        targets) and enters the statistics with target "dense" only; target "residual" adds the sums
        of `residual_sums` (the pruned run then goes through the whole layer); ADMM adds the block's
        inputs and outputs."""
        cfg, mlp = self.config, kind == "mlp"
        consumer = self.adapter.down_proj if mlp else self.adapter.o_proj
        xd = w.xd if mlp or cfg.refit.target == "dense" else None
        st = ConsumerStats(GramAccumulator(get_weight(consumer(w.pruned)).shape[1], device=self.device,
                                           full=cfg.refit.method != "none" or cfg.selection == "obs"),
                           dense_out=[] if mlp and xd is not None else None)
        residual, block_io = mlp and cfg.refit.target == "residual", mlp and cfg.refit.method == "admm"
        cross = not mlp or cfg.refit.target == "dense"
        for b in range(len(w.xp)):
            x_p, x_in, c_out, out_p = self._pruned_run(w, consumer, b, residual, block_io)
            if block_io:
                st.block_in.append(x_in.reshape(-1, x_in.shape[-1]).float().cpu())
            x_d = None  # None: the target is the dense weights applied to the pruned input
            if xd is not None and (mlp or xd.hidden[b] is not w.xp.hidden[b]):
                x_d = self._dense_run(w, consumer, xd.batch_on_device(b), st.dense_out)
            if residual:
                part = residual_sums(x_p, c_out, out_p, st.dense_out[-1])
                st.target = part if st.target is None else (st.target[0] + part[0], st.target[1] + part[1])
                del out_p
            x_d = x_d if cross else None
            st.acc.add_batch(x_p, x_d)
            if block_io:
                with torch.no_grad():
                    y = consumer(w.dense)(x_p if x_d is None else x_d)
                st.block_out.append(y.reshape(-1, y.shape[-1]).float().cpu())
        distributed.reduce_gram(st.acc)  # sharded calibration: every rank now holds the sums over all tokens
        st.target = distributed.reduce_target(st.target)
        return st

    def _pruned_run(self, w: LayerWork, consumer: Any, b: int, whole: bool, block_io: bool
                    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Batch `b` of the pruned stream through the pruned layer, up to the consumer (`whole`: through
        the whole layer); (consumer input, MLP block input, consumer output, layer output), the last
        three None unless asked for."""
        sink_p: list[torch.Tensor] = []
        sink_in: list[torch.Tensor] = []
        sink_c: list[torch.Tensor] = []
        target = consumer(w.pruned)
        producer = self.adapter.mlp_producers(w.pruned)[0]
        last = capture_output(target, sink_c, stop=False) if whole else stop_after(target)
        out_p = None
        with capture_input(target, sink_p), last, capture_input(producer, sink_in if block_io else []):
            if whole:
                with torch.no_grad():
                    out_p = run_layer(w.pruned, w.xp.batch_on_device(b), w.call)
            else:
                run_until_stopped(w.pruned, w.xp.batch_on_device(b), w.call)
        return (sink_p[0], sink_in[0] if block_io else None, sink_c[0] if whole else None, out_p)

    def _dense_run(self, w: LayerWork, consumer: Any, x: torch.Tensor, dense_out: list[torch.Tensor] | None
                   ) -> torch.Tensor:
        """One dense batch on the device through the dense layer; returns the consumer's input. With
        `dense_out`, the whole layer runs and its output is appended there (host float32)."""
        sink_d: list[torch.Tensor] = []
        with capture_input(consumer(w.dense), sink_d):
            if dense_out is not None:
                dense_out.append(run_layer(w.dense, x, w.call).float().cpu())
            else:
                with stop_after(consumer(w.dense)):
                    run_until_stopped(w.dense, x, w.call)
        return sink_d[0]

    def _refit(self, module: nn.Module, dense_module: nn.Module, stats: GramAccumulator,
               keep_cols: torch.Tensor, target: tuple[torch.Tensor, float] | None = None) -> dict[str, float]:
        """Set `module` (already sliced) to the re-fit of the dense consumer on `keep_cols`; with
        `target` (the residual target's sums from `_stats`) towards that target (`refit_to_target`)."""
        if self.config.refit.method == "none":  # slicing already done; no statistics for errors
            return {}
        # the dense module may be the host layer itself (see prune): read in the run dtype, never modified
        w, b = get_weight(dense_module).detach().to(self.device, self.dtype), get_bias(dense_module)
        b = None if b is None else b.detach().to(self.device, self.dtype)
        # the statistics serve one re-fit: their Gram is freed inside it, before the factorisation
        if target is None:
            new_w, new_b, errors = refit_consumer(w, b, stats, keep_cols, self.config.refit.damp, release=True)
        else:
            new_w, new_b, errors = refit_to_target(w, b, stats, target[0], target[1], keep_cols, self.config.refit.damp,
                                                   self.config.refit.target_mix, release=True)
        set_weight(module, new_w, new_b)
        return errors

    def _admm(self, pruned: nn.Module, dense: nn.Module, keep: torch.Tensor, block_in: list[torch.Tensor],
              block_out: list[torch.Tensor]) -> dict[str, Any]:
        """Structured ADMM re-fit of the MLP block (producers and consumer) on the kept neurons."""
        from .reconstruct.admm import admm_mlp

        ad, cfg = self.adapter, self.config
        x = torch.cat(block_in).to(self.device)
        y = torch.cat(block_out).to(self.device)
        prods, admm = ad.mlp_producers(dense), cfg.refit.admm
        res = admm_mlp(x, y, [get_weight(m) for m in prods], [get_bias(m) for m in prods],
                       get_weight(ad.down_proj(dense)), get_bias(ad.down_proj(dense)), keep,
                       act=ad.mlp_activation(), gated=ad.gated, iters=admm.iters, alpha=admm.alpha, beta=admm.beta,
                       gamma=admm.gamma, damp=cfg.refit.damp, chunk_tokens=cfg.chunk_tokens, sgd_steps=admm.sgd_steps)
        for m, w, b in zip(ad.mlp_producers(pruned), res.producers, res.producer_biases):
            set_weight(m, w, b)
        set_weight(ad.down_proj(pruned), res.consumer, res.consumer_bias)
        first, best = res.history[0], res.history[max(res.best_iter, 0)]
        if res.rejected:
            log.warning("ADMM rejected %d of %d steps (objective rose); kept iterate %d", res.rejected,
                        cfg.refit.admm.iters, res.best_iter)
        return {"admm_error_start": float(first["objective"]), "admm_error": float(best["objective"]),
                "admm_best_iter": res.best_iter, "admm_rejected": res.rejected}

    def _admm_attention(self, w: LayerWork) -> dict[str, Any]:
        """Alternate the value and output projections of the pruned attention block (reconstruct/attention.py)
        towards the dense attention output on the same inputs. Targets live on the host."""
        from .reconstruct.attention import alternate_attention

        ad, cfg = self.adapter, self.config
        o_d, o_p = ad.o_proj(w.dense), ad.o_proj(w.pruned)
        targets = []
        for b in range(len(w.xp)):
            sink: list[torch.Tensor] = []
            with capture_output(o_d, sink), torch.no_grad():
                run_until_stopped(w.dense, w.xp.batch_on_device(b), w.call)
            targets.append(sink[0].detach().float().cpu())
        count = sum(t.numel() // t.shape[-1] for t in targets)

        def forward(b: int) -> tuple[torch.Tensor, torch.Tensor]:
            sink_in: list[torch.Tensor] = []
            sink_out: list[torch.Tensor] = []
            with capture_input(o_p, sink_in), capture_output(o_p, sink_out):
                run_until_stopped(w.pruned, w.xp.batch_on_device(b), w.call)
            return sink_in[0], sink_out[0]

        for p in w.pruned.parameters():  # gradients for the value projection only
            p.requires_grad_(False)
        value = ad.q_k_v(w.pruned)[2]
        fit = alternate_attention(forward, targets, count, o_p, list(value.parameters()), cfg.refit.admm.iters,
                                  cfg.refit.admm.attn_steps, cfg.refit.damp, get_weight, get_bias, set_weight)
        if fit.rejected:
            log.warning("attention ADMM rejected %d of %d iterations (error rose); kept iterate %d", fit.rejected,
                        cfg.refit.admm.iters, fit.best_iter)
        return {"admm_error_start": fit.history[0], "admm_error": fit.history[fit.best_iter],
                "admm_best_iter": fit.best_iter, "admm_rejected": fit.rejected}


def residual_sums(x: torch.Tensor, consumer_out: torch.Tensor, layer_out: torch.Tensor,
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
