"""The Python API: `prune`, `evaluate_perplexity` and friends, thin over the methods.

`prune` is the one place that draws calibration and held-back windows and the one place that
picks the method (`methods.get_method(config.method)`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import distributed
from .config import PruneConfig
from .data import calibration_windows, eval_windows, held_back_count, load_text, split_windows, tokenize
from .evaluate import perplexity
from .io.resolve import open_for_pruning
from .methods import Method, get_method
from .methods.output import PruneResult
from .planning import needs_holdout
from .runtime.source import LayerSource
from .runtime.device import resolve_device

log = logging.getLogger(__name__)


def calibration_data(tokenizer: Any, config: PruneConfig, holdout: bool = False
                     ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
    """Calibration windows [nsamples - h, seqlen] from `config.calib` (the calibration split),
    where h = data.held_back_count(nsamples, needs_holdout(config)) windows of the budget are
    held back (nsamples // 8; at least one when the allocation searches on held-back data).

    holdout=True also returns the held-back windows [h, seqlen] (None when h = 0). Both come
    from one draw (data.split_windows): they never share a token, and every method with the
    same nsamples, seqlen and seed calibrates on the same windows.
    """
    ids = tokenize(tokenizer, load_text(config.calib, split="calib"))
    windows, held = split_windows(ids, config.nsamples, config.seqlen, config.seed,
                                  held_back_count(config.nsamples, needs_holdout(config)))
    return (windows, held) if holdout else windows


def split_holdout(windows: torch.Tensor, config: PruneConfig
                  ) -> tuple[torch.Tensor, torch.Tensor | None, PruneConfig]:
    """Given windows [n, seqlen] and no held-back ones, for a config that searches on
    held-back data: the last max(1, n // 8) windows are held back (returns (windows, holdout,
    config)). One window cannot be split: the allocation falls back to uniform (sensitivity; the
    rho search to rho=1, the temperature search to T=inf) with a warning."""
    if windows.shape[0] < 2:
        a = config.allocation
        log.warning("one calibration window cannot be split for the allocation's held-back measurements; "
                    "using %s instead (use nsamples >= 2 or pass holdout windows)",
                    "the uniform allocation" if a.rule == "sensitivity" else "rho=1 and T=inf (uniform)")
        fallback = a.replace(rule="uniform" if a.rule == "sensitivity" else a.rule,
                             rho=1.0 if a.rho is None else a.rho,
                             temperature=math.inf if a.temperature is None else a.temperature)
        return windows, None, config.replace(allocation=fallback)
    n_hold = max(1, windows.shape[0] // 8)
    return windows[:-n_hold], windows[-n_hold:], config


def finetune(model: nn.Module, tokenizer: Any, config: Any = None, progress: bool = True) -> tuple[nn.Module, dict]:
    """LoRA recovery of a (pruned) model on its calibration-split text, merged back (finetune.py).
    Returns (new model, info); `model` is not modified. `config`: a FinetuneConfig."""
    from .finetune import FinetuneConfig, lora_finetune

    config = config or FinetuneConfig()
    ids = tokenize(tokenizer, load_text(config.text, split="calib"))
    windows = calibration_windows(ids, config.steps * config.batch_size, config.seqlen, config.seed)
    return lora_finetune(model, windows, config, resolve_device(config.device), progress)


def prune(model_or_path: nn.Module | LayerSource | str, config: PruneConfig | None = None, tokenizer: Any = None,
          calib_windows: torch.Tensor | None = None, progress: bool = True,
          holdout_windows: torch.Tensor | None = None, masks: Any = None, sink: Any = None) -> PruneResult:
    """Prune a model (object, LayerSource or MODEL string) to `config.sparsity` ACTUAL decoder sparsity.

    The input model is never modified. A local safetensors folder is read one decoder layer
    at a time (the whole model is never in host memory); the pruned model is returned. Calibration windows come from `calib_windows`
    [nsamples, seqlen] when given, else from `config.calib` with `tokenizer`.
    Returns the pruned model (host), its plan and the tokenizer. `holdout_windows`: calibration
    windows kept apart for the temperature search (drawn automatically from config.calib; split
    off the end of `calib_windows` when only those are given, `split_holdout`).
    `masks`: a PrunePlan whose kept units are replayed (compare re-fits on equal masks).
    `sink`: an `io.ShardWriter` that receives each layer as soon as it is pruned.
    """
    config = config or PruneConfig()
    resolve_device(config.device)  # fail fast on a missing device
    distributed.check_supported(config)  # under torchrun: refuse what does not run sharded yet
    method = get_method(config.method)
    model, tokenizer = _open(model_or_path, config, tokenizer)
    _check_reachable(model, config)
    if calib_windows is None:
        if tokenizer is None:
            raise ValueError("no tokenizer: the model folder has none, so pass tokenizer= or calib_windows= "
                             "(calibration text must be tokenized)")
        calib_windows, held = calibration_data(tokenizer, config, holdout=True)
        holdout_windows = held if holdout_windows is None else holdout_windows
    _check_supports(method, masks, sink)
    if method.holdout and masks is None and holdout_windows is None and needs_holdout(config):
        calib_windows, holdout_windows, config = split_holdout(calib_windows, config)
    pruned, plan = method.run(model, calib_windows, holdout_windows, config, progress, masks, sink)
    return PruneResult(model=pruned, plan=plan, tokenizer=tokenizer)


@dataclass
class FolderRun:
    """What `prune_to_folder` did: the result, the pruning time (seconds, window draw included)
    and, when evaluated, the dense and pruned perplexities."""

    result: PruneResult
    seconds: float
    dense_ppl: float | None = None
    pruned_ppl: float | None = None


def prune_to_folder(model: str, config: PruneConfig, out: str, overwrite: bool = False, resume: bool = False,
                    evaluate: dict[str, Any] | None = None, progress: bool = True,
                    check_loaded: Callable[[Any, Any], None] | None = None) -> FolderRun:
    """Open MODEL (a folder is read one layer at a time), prune it with `config` and write the
    pruned folder `out`. Methods that stream (`Method.sink`) write each layer as it is pruned,
    resumable with `resume`, and the folder appears atomically at the end. `evaluate`: keyword
    arguments of `evaluate_perplexity` to measure the dense and the pruned model. `check_loaded`:
    called with (model, tokenizer) once opened (the CLI's checks that need the model)."""
    from . import io

    io.check_output_dir(out, overwrite)
    opened, tok = open_for_pruning(model, config.dtype)
    if tok is None:
        raise ValueError(f"{model} has no usable tokenizer files (missing or unreadable); save the model's "
                         "tokenizer into that folder")
    if check_loaded is not None:
        check_loaded(opened, tok)
    dense_ppl = pruned_ppl = None
    if evaluate is not None:
        dense_ppl = _dense_perplexity(model, opened, tok, config, evaluate)
    sink = (distributed.rank_sink(lambda: io.ShardWriter(out, overwrite, release=evaluate is None, resume=resume))
            if get_method(config.method).sink else None)  # torchrun: rank 0 writes
    try:
        t0 = time.perf_counter()
        result = prune(opened, config, tokenizer=tok, progress=progress, sink=sink)
        seconds = time.perf_counter() - t0
        if evaluate is not None:
            pruned_ppl = evaluate_perplexity(result.model, tok, **evaluate)
            result.plan.timing.update({"perplexity_dense": dense_ppl, "perplexity_pruned": pruned_ppl})
        if sink is not None:
            from .runtime.source import layers_prefix

            sink.finish(result.model, result.plan, layers_prefix(result.model), tokenizer=tok)
        else:
            io.save_pruned(result.model, result.plan, out, tokenizer=tok, overwrite=overwrite)
    except BaseException:
        if sink is not None:
            sink.abort()
        raise
    return FolderRun(result, seconds, dense_ppl, pruned_ppl)


def _dense_perplexity(model: str, opened: Any, tok: Any, config: PruneConfig, evaluate: dict[str, Any]) -> float:
    """Perplexity of the dense model (loaded whole for this when it was opened layer by layer)."""
    from .io.resolve import load_model

    dense = opened if isinstance(opened, nn.Module) else load_model(model, config.dtype)[0]
    return evaluate_perplexity(dense, tok, **evaluate)


def _open(model_or_path: nn.Module | LayerSource | str, config: PruneConfig, tokenizer: Any
          ) -> tuple[nn.Module | LayerSource, Any]:
    """A MODEL string opened for pruning (checked before and after loading), with its tokenizer
    unless one is given; a model object or LayerSource as it is."""
    if not isinstance(model_or_path, str):
        return model_or_path, tokenizer
    from .preflight import check_context, check_model_spec, check_tokenizer

    check_model_spec(model_or_path)  # missing path, broken config.json or safetensors: fail before loading
    model, loaded_tok = open_for_pruning(model_or_path, config.dtype)
    tokenizer = tokenizer or loaded_tok
    check_context(model.config, config.seqlen, "seqlen")
    check_tokenizer(tokenizer, model.config)
    return model, tokenizer


def _check_supports(method: Method, masks: Any, sink: Any) -> None:
    """Refuse an argument the method cannot honour (instead of ignoring it)."""
    if masks is not None and not method.masks:
        raise ValueError(f"masks= replays kept units through the layer pipeline; method {method.name!r} "
                         "chooses its own")
    if sink is not None and not method.sink:
        raise ValueError(f"sink= receives layers as they are pruned; method {method.name!r} prunes the whole "
                         "model at once: save the result with save_pruned")


def _check_reachable(model: Any, config: PruneConfig) -> None:
    """An unreachable sparsity fails before calibration (planning.max_sparsity); the whole-model
    rankings (global, flap) apply no per-module cap."""
    from .arch import get_adapter
    from .allocation.budget import check_reachable

    check_reachable(config, get_adapter(model.config))


def evaluate_perplexity(model: nn.Module, tokenizer: Any, data: str = "wiki", seqlen: int = 512,
                        windows: int | None = 64, device: str = "auto", batch_size: int = 4,
                        progress: bool = True) -> float:
    """Perplexity per PROTOCOL.md on the evaluation side of `data` (first `windows` windows)."""
    ids = tokenize(tokenizer, load_text(data, split="eval"))
    return perplexity(model, eval_windows(ids, seqlen, windows), resolve_device(device), batch_size, progress)
