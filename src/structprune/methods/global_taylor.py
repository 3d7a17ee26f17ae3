"""The global first-order Taylor baseline ("global"): the O(N) reference STRUPRUNE is measured against.

As LLM-Pruner-style global methods do, the WHOLE model lives on the compute device with
gradients on its decoder linear weights; forward + backward of the calibration windows
(next-token loss) gives every unit a first-order Taylor importance, and all heads and FFN
neurons of all layers are ranked together by importance per parameter.

Importance (float32, signed sums accumulated over every window, absolute value at the end):
- FFN neuron j: |sum over its producer rows and consumer column of w * dL/dw|;
- query head h: |sum over its q rows and o columns of w * dL/dw| plus its share (1/rep) of
  |sum over its KV head's k and v rows of w * dL/dw| (rep query heads share one KV head; for
  multi-head attention rep = 1 and the two parts are the head's own weights).
  The q/o part and the k/v part are taken in absolute value separately because under GQA
  they are removed separately (a KV head only with its whole group).

Selection: units are sorted by importance / parameters (a query head costs its q rows, o
columns and 1/rep of its KV head); the lowest are removed until the ACTUAL decoder sparsity
is met. Each layer's attention then keeps the parameters the ranking left it, under the GQA
rule of `selection.select_heads` (whole KV groups, equal query heads per kept group), and
the number of removed units is searched so that the realised sparsity is the closest to the
request. At least one head and one neuron are kept in every layer.

What lives where: the model copy, its decoder-weight gradients (model dtype), one batch of
activations and the per-unit float32 sums on the compute device during the passes; the
pruned model is returned on the host.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..arch import Adapter, get_adapter
from ..config import PruneConfig
from ..plan import LayerPlan, PrunePlan
from ..selection import select_heads
from ..runtime.device import resolve_device
from ..runtime.source import LayerSource
from ..surgery import get_weight
from . import register_method
from .output import clean_copy, decoder_linear_params, finish, total_params

log = logging.getLogger(__name__)

RULE = "global-taylor"


@dataclass
class LayerTaylor:
    """Signed first-order sums sum(w * dL/dw) of one decoder layer's units, float32.

    qo: [num_heads] over each query head's q rows and o columns;
    kv: [num_kv_heads] over each KV head's k and v rows;
    neurons: [intermediate_size] over each neuron's producer rows and consumer column.
    """

    qo: torch.Tensor
    kv: torch.Tensor
    neurons: torch.Tensor

    def head_scores(self) -> torch.Tensor:
        """Per query head: |qo| + |kv of its group| / rep."""
        rep = self.qo.numel() // self.kv.numel()
        return self.qo.abs() + self.kv.abs().repeat_interleave(rep) / rep

    def neuron_scores(self) -> torch.Tensor:
        return self.neurons.abs()

    def add_(self, other: "LayerTaylor") -> None:
        self.qo += other.qo
        self.kv += other.kv
        self.neurons += other.neurons


# --- importance: tensors in, tensors out ------------------------------------------------------

def _weight_times_grad(module: nn.Module) -> torch.Tensor:
    """w * dL/dw in float32, [out, in] layout (GPT-2's Conv1D stores [in, out])."""
    w = get_weight(module)
    g = module.weight.grad
    if g is None:
        raise RuntimeError(f"{type(module).__name__} has no gradient; was it part of the forward pass?")
    if w is not module.weight:  # a transposed view: the module stores [in, out]
        g = g.T
    return w.float() * g.float()


def layer_taylor(adapter: Adapter, layer: nn.Module) -> LayerTaylor:
    """The layer's per-unit sums of w * grad from the gradients currently stored on its weights."""
    shape = adapter.layer_shape(layer)
    hd = adapter.head_dim
    q, k, v = adapter.q_k_v(layer)
    if adapter.fused_qkv:  # one fused projection, rows laid out q | k | v
        rows = _weight_times_grad(q).sum(1)
        q_rows, k_rows, v_rows = rows.split([shape.num_heads * hd, shape.num_kv_heads * hd, shape.num_kv_heads * hd])
    else:
        q_rows, k_rows, v_rows = (_weight_times_grad(m).sum(1) for m in (q, k, v))
    o_cols = _weight_times_grad(adapter.o_proj(layer)).sum(0)
    qo = q_rows.reshape(shape.num_heads, hd).sum(1) + o_cols.reshape(shape.num_heads, hd).sum(1)
    kv = (k_rows + v_rows).reshape(shape.num_kv_heads, hd).sum(1)
    neurons = _weight_times_grad(adapter.down_proj(layer)).sum(0)
    for producer in adapter.mlp_producers(layer):
        neurons = neurons + _weight_times_grad(producer).sum(1)
    return LayerTaylor(qo, kv, neurons)


@dataclass
class Selection:
    """One layer's kept units (dense indices) and the parameter share the ranking gave it."""

    keep_q: torch.Tensor
    keep_kv: torch.Tensor
    keep_n: torch.Tensor
    attn_keep: float
    mlp_keep: float


def global_selection(
    head_scores: list[torch.Tensor],
    neuron_scores: list[torch.Tensor],
    adapter: Adapter,
    sparsity: float,
    prune_attention: bool = True,
    prune_mlp: bool = True,
    per_parameter: bool = True,
) -> tuple[list[Selection], dict[str, float]]:
    """Rank all units of all layers by score per parameter and keep the best so that the
    realised fraction of decoder linear weights removed is the closest to `sparsity`.

    head_scores[i]: [num_heads], neuron_scores[i]: [intermediate_size] (non-negative).
    per_parameter=False ranks by the score itself (scores of any sign, e.g. FLAP's
    standardised ones); parameter costs then enter only through the removal budget.
    Returns per-layer selections and {"threshold": score per parameter of the last unit
    removed, "removed_units": count, "actual_sparsity": realised fraction}.
    A pure maths kernel (tensors in, selections out), kept whole: the ranking, the binary search
    and `realise` read together.
    """
    shape = adapter.dense_shape()
    n_layers = len(head_scores)
    rep = shape.num_heads // shape.num_kv_heads
    q_cost, kv_cost, n_cost = adapter.q_head_cost, adapter.kv_head_cost, adapter.neuron_cost
    head_cost = q_cost + kv_cost / rep
    dense_total = n_layers * (adapter.attn_params(shape) + adapter.mlp_params(shape))

    ratios, layer_of, is_head = [], [], []
    for i in range(n_layers):
        if prune_attention:
            ratios.append(head_scores[i].float().cpu() / (head_cost if per_parameter else 1.0))
            layer_of.append(torch.full((shape.num_heads,), i))
            is_head.append(torch.ones(shape.num_heads, dtype=torch.bool))
        if prune_mlp:
            ratios.append(neuron_scores[i].float().cpu() / (n_cost if per_parameter else 1.0))
            layer_of.append(torch.full((shape.intermediate_size,), i))
            is_head.append(torch.zeros(shape.intermediate_size, dtype=torch.bool))
    ratio = torch.cat(ratios)
    order = ratio.argsort(stable=True)
    layer_sorted, head_sorted = torch.cat(layer_of)[order], torch.cat(is_head)[order]
    neuron_order = [s.float().cpu().argsort(descending=True, stable=True) for s in neuron_scores]
    head_cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def realise(m: int) -> tuple[list[Selection], int]:
        removed_heads = torch.bincount(layer_sorted[:m][head_sorted[:m]], minlength=n_layers)
        removed_neurons = torch.bincount(layer_sorted[:m][~head_sorted[:m]], minlength=n_layers)
        sels, kept = [], 0
        for i in range(n_layers):
            n_heads = shape.num_heads - int(removed_heads[i])
            if (i, n_heads) not in head_cache:
                head_cache[(i, n_heads)] = select_heads(head_scores[i].float().cpu(), shape.num_kv_heads,
                                                        n_heads * head_cost, q_cost, kv_cost)
            keep_q, keep_kv = head_cache[(i, n_heads)]
            n_neurons = max(1, shape.intermediate_size - int(removed_neurons[i]))
            keep_n = neuron_order[i][:n_neurons].sort().values
            kept += keep_q.numel() * q_cost + keep_kv.numel() * kv_cost + n_neurons * n_cost
            sels.append(Selection(keep_q, keep_kv, keep_n, n_heads / shape.num_heads,
                                  n_neurons / shape.intermediate_size))
        return sels, dense_total - kept

    goal = sparsity * dense_total
    lo, hi = 0, ratio.numel()  # smallest m whose realised removal reaches the goal
    while lo < hi:
        mid = (lo + hi) // 2
        if realise(mid)[1] >= goal:
            hi = mid
        else:
            lo = mid + 1
    best_m, (best, removed) = lo, realise(lo)
    if lo > 0:
        below, removed_below = realise(lo - 1)
        if abs(removed_below - goal) <= abs(removed - goal):
            best_m, best, removed = lo - 1, below, removed_below
    threshold = float(ratio[order[best_m - 1]]) if best_m > 0 else 0.0
    return best, {"threshold": threshold, "removed_units": best_m, "actual_sparsity": removed / dense_total}


# --- plumbing: devices, gradients, surgery ----------------------------------------------------

def _prunable_weights(adapter: Adapter, model: nn.Module) -> list[nn.Parameter]:
    """Every decoder linear weight Parameter, each once (fused projections appear once)."""
    seen: dict[int, nn.Parameter] = {}
    for layer in adapter.decoder_layers(model):
        mods = [*adapter.q_k_v(layer), adapter.o_proj(layer), *adapter.mlp_producers(layer), adapter.down_proj(layer)]
        for m in mods:
            seen.setdefault(id(m.weight), m.weight)
    return list(seen.values())


def accumulate_taylor(model: nn.Module, adapter: Adapter, windows: torch.Tensor, batch_size: int,
                      device: torch.device, progress: bool = True) -> list[LayerTaylor]:
    """Forward + backward of the summed next-token loss over `windows` [n, seqlen], `batch_size`
    windows at a time, through `model` (already on `device`); per-layer sums on the host.

    The loss is summed over tokens, not averaged: a natural loss scale that keeps float16
    gradients out of the subnormal range. A batch whose gradients are not finite is skipped
    with a warning; if every batch is, FloatingPointError."""
    params = _prunable_weights(adapter, model)
    flags = {id(p): p.requires_grad for p in model.parameters()}
    use_cache = getattr(model.config, "use_cache", None)
    was_training = model.training
    layers = adapter.decoder_layers(model)
    sums: list[LayerTaylor] | None = None
    skipped = 0
    batches = range(0, windows.shape[0], batch_size)
    try:
        model.eval()
        model.config.use_cache = False
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        for start in tqdm(batches, desc="global taylor: forward+backward", disable=not progress, unit="batch"):
            ids = windows[start : start + batch_size].to(device)
            with torch.enable_grad():
                logits = model(input_ids=ids, use_cache=False).logits
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")
                del logits
                loss.backward()
            del loss
            if not all(bool(torch.isfinite(p.grad).all()) for p in params):
                skipped += 1
                log.warning("batch at window %d: non-finite gradients (dtype %s); skipped", start, params[0].dtype)
            else:
                with torch.no_grad():
                    batch = [layer_taylor(adapter, layer) for layer in layers]
                if sums is None:
                    sums = batch
                else:
                    for acc, new in zip(sums, batch):
                        acc.add_(new)
            for p in params:
                p.grad = None
    finally:
        for p in model.parameters():
            p.grad = None
            p.requires_grad_(flags.get(id(p), False))
        model.train(was_training)
        if use_cache is not None:
            model.config.use_cache = use_cache
    if sums is None:
        raise FloatingPointError(f"every calibration batch gave non-finite gradients in {params[0].dtype}; "
                                 "run the global baseline in float32 or bfloat16")
    if skipped:
        log.warning("global taylor: %d of %d batches skipped (non-finite gradients)", skipped, len(batches))
    return [LayerTaylor(t.qo.cpu(), t.kv.cpu(), t.neurons.cpu()) for t in sums]


def prune_global(model: nn.Module, windows: torch.Tensor, config: PruneConfig, progress: bool = True) -> tuple[
    nn.Module, PrunePlan
]:
    """Prune a copy of `model` (left untouched) with global first-order Taylor ranking on
    calibration `windows` [nsamples, seqlen] to `config.sparsity` ACTUAL decoder sparsity.

    Holds the whole copy on `config.device` (the O(N) baseline); uses `config.batch_size`,
    `config.prune_attention` and `config.prune_mlp`; scorer, allocation and reconstruction
    settings do not apply. Returns (pruned model on the host in eval mode, its plan)."""
    t0 = time.perf_counter()
    adapter = get_adapter(model.config)
    device = resolve_device(config.device)
    out = clean_copy(model)
    layers = adapter.decoder_layers(out)
    dense_params = decoder_linear_params(out, adapter)
    total_dense = total_params(out)
    dense_shape = adapter.dense_shape()

    out.to(device)
    try:
        taylor = accumulate_taylor(out, adapter, windows, config.batch_size, device, progress)
    finally:
        out.to("cpu")
    t_grad = time.perf_counter() - t0
    head_scores = [t.head_scores() for t in taylor]
    neuron_scores = [t.neuron_scores() for t in taylor]
    selections, info = global_selection(head_scores, neuron_scores, adapter, config.sparsity,
                                        config.prune_attention, config.prune_mlp)

    plans = []
    for i, (layer, sel) in enumerate(zip(layers, selections)):
        if sel.keep_q.numel() < dense_shape.num_heads:
            adapter.slice_heads(layer, sel.keep_q, sel.keep_kv)
        if sel.keep_n.numel() < dense_shape.intermediate_size:
            adapter.slice_neurons(layer, sel.keep_n)
        plans.append(LayerPlan(
            index=i,
            kept_heads=sel.keep_q.tolist(),
            kept_kv_heads=sel.keep_kv.tolist(),
            kept_neurons=sel.keep_n.tolist(),
            dense_shape=dense_shape.to_dict(),
            head_scores=head_scores[i].tolist(),
            neuron_scores=neuron_scores[i].tolist(),
            attn_keep_target=sel.attn_keep,
            mlp_keep_target=sel.mlp_keep,
            importance={"attn": float(head_scores[i].sum()), "mlp": float(neuron_scores[i].sum())},
            rule=RULE,
        ))
        log.info("layer %d: heads %d/%d kv %d/%d neurons %d/%d", i, sel.keep_q.numel(), dense_shape.num_heads,
                 sel.keep_kv.numel(), dense_shape.num_kv_heads, sel.keep_n.numel(), dense_shape.intermediate_size)
    return finish(model.config, out, adapter, config, plans, dense_params, total_dense, {"rule": RULE, **info},
                  {"gradient_seconds": t_grad, "prune_seconds": time.perf_counter() - t0})


@register_method("global", whole_model=True)
def run(model: nn.Module | LayerSource, windows: torch.Tensor, holdout: torch.Tensor | None, config: PruneConfig,
        progress: bool, masks: PrunePlan | None, sink: object) -> tuple[nn.Module, PrunePlan]:
    """The global Taylor baseline as a registered method: a LayerSource is copied whole to
    the host first (`clean_copy`), then `prune_global`."""
    whole = model if isinstance(model, nn.Module) else clean_copy(model)
    return prune_global(whole, windows, config, progress=progress)
