"""The Python API: `prune`, `evaluate_perplexity` and friends, thin over the pipeline."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from . import distributed
from .config import PruneConfig
from .data import calibration_windows, eval_windows, held_back_count, load_text, split_windows, tokenize
from .evaluate import perplexity
from .io.resolve import open_for_pruning
from .pipeline import PruneResult, prune_model
from .planning import needs_holdout
from .source import LayerSource
from .streaming import resolve_device

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
    windows kept apart for the temperature search (drawn automatically from config.calib).
    `masks`: a PrunePlan whose kept units are replayed (compare re-fits on equal masks).
    `sink`: an `io.ShardWriter` that receives each layer as soon as it is pruned.
    """
    config = config or PruneConfig()
    resolve_device(config.device)  # fail fast on a missing device
    distributed.check_supported(config)  # under torchrun: refuse what does not run sharded yet
    if isinstance(model_or_path, str):
        from .preflight import check_context, check_model_spec, check_tokenizer

        check_model_spec(model_or_path)  # missing path, broken config.json or safetensors: fail before loading
        model, loaded_tok = open_for_pruning(model_or_path, config.dtype)
        tokenizer = tokenizer or loaded_tok
        check_context(model.config, config.seqlen, "seqlen")
        check_tokenizer(tokenizer, model.config)
    else:
        model = model_or_path
    _check_reachable(model, config)
    if calib_windows is None:
        if tokenizer is None:
            raise ValueError("no tokenizer: the model folder has none, so pass tokenizer= or calib_windows= "
                             "(calibration text must be tokenized)")
        calib_windows, held = calibration_data(tokenizer, config, holdout=True)
        holdout_windows = held if holdout_windows is None else holdout_windows
    if config.scope == "global":
        from .global_taylor import prune_global
        from .pipeline import clean_copy

        whole = model if isinstance(model, nn.Module) else clean_copy(model)
        pruned, plan = prune_global(whole, calib_windows, config, progress=progress)
    elif config.allocation == "flap":
        from .flap import prune_flap

        if masks is not None:
            raise ValueError("masks= replays kept units through the layer pipeline; allocation 'flap' has its own")
        pruned, plan = prune_flap(model, calib_windows, config, progress=progress, sink=sink)
    else:
        pruned, plan = prune_model(model, calib_windows, config, progress=progress, holdout=holdout_windows,
                                   masks=masks, sink=sink)
    return PruneResult(model=pruned, plan=plan, tokenizer=tokenizer)


def _check_reachable(model: Any, config: PruneConfig) -> None:
    """An unreachable sparsity fails before calibration (planning.max_sparsity); the whole-model
    rankings (global, flap) apply no per-module cap."""
    from .arch import get_adapter
    from .planning import check_reachable

    check_reachable(config, get_adapter(model.config))


def evaluate_perplexity(model: nn.Module, tokenizer: Any, data: str = "wiki", seqlen: int = 512,
                        windows: int | None = 64, device: str = "auto", batch_size: int = 4,
                        progress: bool = True) -> float:
    """Perplexity per PROTOCOL.md on the evaluation side of `data` (first `windows` windows)."""
    ids = tokenize(tokenizer, load_text(data, split="eval"))
    return perplexity(model, eval_windows(ids, seqlen, windows), resolve_device(device), batch_size, progress)
