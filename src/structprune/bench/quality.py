"""The quality harness (`structprune bench quality`, PROTOCOL.md): methods x actual sparsity.

One run = one JSON file. Every cell (method, sparsity) prunes the same model on the same
calibration windows (the calibration split of `calib`) and records the ACTUAL decoder
sparsity, perplexity on the evaluation split of every text in `texts`, pruning time as a
ratio to one dense forward pass of the calibration set (measured once per run, same device),
and peak memory (process peak RSS over the pruning call; CUDA peak allocated on a GPU).
Resumable: finished cells are never recomputed; the JSON is rewritten atomically after the
dense reference and after every cell, so a killed run loses at most the cell in progress.
Evaluation text never overlaps calibration text: named texts ("wiki", "pydoc") are split by
document; a file given both for calibration and evaluation is refused.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..config import PruneConfig
from ..data import VALIDATION, VALIDATION_WINDOWS, eval_windows, load_text, tokenize, validation_windows
from .measure import dense_forward_seconds, module_bytes, peak_rss_bytes, reset_peak_rss, rss_bytes
from .protocol import BenchSettings, cell_key, check_disjoint, settings_from_protocol
from .results import load_results, write_atomic

log = logging.getLogger(__name__)


def _open_run(settings: BenchSettings, out: Path) -> dict[str, Any]:
    """Check the settings (before loading anything) and read the run `out` continues."""
    check_disjoint(settings)
    for name, value in settings.overrides.items():  # fail before loading anything
        PruneConfig.from_flat(**{name: value})
    out.parent.mkdir(parents=True, exist_ok=True)
    results = load_results(out)
    old = results.get("settings") or settings_from_protocol(results.get("protocol"))
    if old is not None and {k: old.get(k) for k in settings.fingerprint()} != settings.fingerprint():
        raise ValueError(f"{out} was run with {old}, not {settings.fingerprint()}; "
                         "use another --out for other settings")
    return results


def _record_protocol(results: dict[str, Any], settings: BenchSettings, seed: int, device: torch.device) -> None:
    results["settings"] = {**settings.fingerprint(), "texts": list(settings.texts)}
    results["protocol"] = {
        "model": settings.model,
        "calib": f"{settings.calib} calib split, {settings.nsamples} x {settings.seqlen}, seed {seed}",
        "eval": f"wiki eval split, first {settings.windows} x {settings.seqlen}, float32",
        "eval_texts": {t: _text_label(t, settings, seed) for t in settings.texts},
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "device": str(device)}


def _text_windows(text: str, tok: Any, settings: BenchSettings, seed: int) -> torch.Tensor:
    """The windows a text is scored on: the first `windows` of its eval split, or for "validation"
    the validation windows of the calibration text (data.validation_windows: disjoint from every
    cell's calibration and held-back windows)."""
    if text == VALIDATION:
        ids = tokenize(tok, load_text(settings.calib, split="calib"))
        return validation_windows(ids, settings.seqlen, seed, settings.nsamples)
    return eval_windows(tokenize(tok, load_text(text, split="eval")), settings.seqlen, settings.windows)


def _text_label(text: str, settings: BenchSettings, seed: int) -> str:
    if text == VALIDATION:
        return (f"{settings.calib} calib split, {VALIDATION_WINDOWS} x {settings.seqlen} validation windows "
                f"(seed {seed}), disjoint from the calibration windows, float32")
    return f"{text} eval split, first {settings.windows} x {settings.seqlen}, float32"


def _record_dense(results: dict[str, Any], model: torch.nn.Module, evals: dict[str, torch.Tensor],
                  device: torch.device, echo: Callable[[str], None]) -> None:
    """The dense model's size, layer shape and perplexity on each text not measured yet."""
    import structprune as sp

    from ..arch import get_adapter

    adapter = get_adapter(model.config)
    dense = results.setdefault("dense", {})
    dense.setdefault("params", sum(p.numel() for p in model.parameters()))
    dense["model_bytes"] = module_bytes(model)
    dense["layer_bytes"] = module_bytes(adapter.decoder_layers(model)[0])
    dense["shape"] = adapter.dense_shape().to_dict()
    by_text = dense.setdefault("perplexity_by_text", {})
    for t in evals:
        if t not in by_text:
            by_text[t] = sp.perplexity(model, evals[t], device=device, progress=False)
            echo(f"dense {t}: perplexity {by_text[t]:.2f}")
    if "wiki" in by_text:
        dense["perplexity"] = by_text["wiki"]


def _prune_measured(model: torch.nn.Module, cfg: PruneConfig, device: torch.device,
                    **kwargs: Any) -> tuple[Any, float, dict[str, Any]]:
    """`structprune.prune` with its wall time (seconds) and memory (peak RSS, CUDA peak)."""
    import structprune as sp

    rss_before = rss_bytes()
    exact = reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    res = sp.prune(model, cfg, progress=False, **kwargs)
    seconds = time.perf_counter() - t0
    memory = {"peak_rss_bytes": peak_rss_bytes(), "rss_before_bytes": rss_before,
              "peak_rss_scope": "pruning call" if exact else "process lifetime"}
    if device.type == "cuda":
        memory["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return res, seconds, memory


def _lora(res: Any, tok: Any, settings: BenchSettings) -> dict[str, Any] | None:
    """LoRA recovery of the pruned model in `res` (replaced in place) when the settings ask for it."""
    if not settings.lora_steps:
        return None
    from ..api import finetune
    from ..finetune import FinetuneConfig

    tuned, lora = finetune(res.model, tok, FinetuneConfig(steps=settings.lora_steps, device=settings.device),
                           progress=False)
    res.model = tuned
    return lora


def _cell_record(method: str, s: float, settings: BenchSettings, cfg: PruneConfig, plan: Any,
                 ppl: dict[str, float], seconds: float, ref: float, memory: dict[str, Any],
                 lora: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "method": method + settings.tag, "requested": s, "actual": plan.actual_sparsity,
        "perplexity": ppl.get("wiki", next(iter(ppl.values()))), "perplexity_by_text": ppl,
        "params": plan.params_pruned, "prune_seconds": seconds, "time_ratio": seconds / ref,
        "memory": memory, "config": cfg.to_dict(),
        "allocation": {k: v for k, v in plan.allocation.items() if k != "importance"},
        "kept": {"heads": [len(lp.kept_heads) for lp in plan.layers],
                 "kv_heads": [len(lp.kept_kv_heads) for lp in plan.layers],
                 "neurons": [len(lp.kept_neurons) for lp in plan.layers]},
        **({"lora": lora} if lora is not None else {}),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _run_cell(method: str, s: float, settings: BenchSettings, model: torch.nn.Module, tok: Any,
              evals: dict[str, torch.Tensor], plans: Path, ref: float,
              device: torch.device) -> tuple[dict[str, Any], Any]:
    """Prune one (method, sparsity) cell and evaluate it: (its JSON record, its plan)."""
    import structprune as sp

    from ..api import calibration_data
    from ..methods import method_config

    cfg = method_config(method, sparsity=s, nsamples=settings.nsamples, seqlen=settings.seqlen,
                        calib=settings.calib, device=settings.device, **settings.overrides)
    masks = sp.PrunePlan.load(plans / settings.plan_name(cell_key(settings.masks_from, '', s))) \
        if settings.masks_from else None
    cell_calib, holdout = calibration_data(tok, cfg, holdout=True)  # drawn outside the timed call
    res, seconds, memory = _prune_measured(model, cfg, device, calib_windows=cell_calib,
                                           holdout_windows=holdout, masks=masks)
    lora = _lora(res, tok, settings)
    ppl = {t: sp.perplexity(res.model, evals[t], device=device, progress=False) for t in settings.texts}
    plan = res.plan
    return _cell_record(method, s, settings, cfg, plan, ppl, seconds, ref, memory, lora), plan


def run_quality(settings: BenchSettings, out: Path, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) the grid into `out` (JSON); returns the results dict. Plans of finished
    cells are saved beside it in plans/ (`BenchSettings.plan_name`)."""
    from ..api import calibration_data
    from ..io.resolve import load_model
    from ..runtime.device import resolve_device

    results = _open_run(settings, out)
    plans = out.parent / "plans"
    plans.mkdir(exist_ok=True)
    todo = [(m, s) for m in settings.methods for s in settings.sparsities
            if cell_key(m, settings.tag, s) not in results["cells"]]
    texts_missing = [t for t in settings.texts if t not in results.get("dense", {}).get("perplexity_by_text", {})]
    if not todo and not texts_missing:
        echo(f"{out}: every cell is finished")
        return results

    device = resolve_device(settings.device)
    model, tok = load_model(settings.model)
    # the reference forward's windows: those of a cell that searches nothing on held-back data
    calib_cfg = PruneConfig.from_flat(nsamples=settings.nsamples, seqlen=settings.seqlen, calib=settings.calib,
                                      rho=1.0)
    calib = calibration_data(tok, calib_cfg)
    evals = {t: _text_windows(t, tok, settings, calib_cfg.seed) for t in settings.texts}
    _record_protocol(results, settings, calib_cfg.seed, device)
    _record_dense(results, model, evals, device, echo)
    write_atomic(out, results)

    ref = dense_forward_seconds(model, calib, 8)
    results["dense_forward_seconds_last"] = ref
    for done, (method, s) in enumerate(todo):
        if settings.max_cells is not None and done >= settings.max_cells:
            echo(f"stopping after {done} new cell(s) (--max-cells); run again to continue")
            break
        key = cell_key(method, settings.tag, s)
        cell, plan = _run_cell(method, s, settings, model, tok, evals, plans, ref, device)
        results["cells"][key] = cell
        plan.save(plans / settings.plan_name(key), scores=False)
        write_atomic(out, results)
        ppl, seconds = cell["perplexity_by_text"], cell["prune_seconds"]
        echo(f"{key}: actual {plan.actual_sparsity:.3f} " + " ".join(f"{t} {v:.2f}" for t, v in ppl.items())
             + f" ({seconds:.0f} s, {seconds / ref:.1f}x dense fwd, "
               f"peak RSS {cell['memory']['peak_rss_bytes'] / 2**20:.0f} MiB)")
    return results
