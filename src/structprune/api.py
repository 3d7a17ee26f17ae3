"""The Python API: `prune`, `evaluate_perplexity` and friends, thin over the pipeline."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from . import distributed
from .config import PruneConfig
from .data import calibration_windows, eval_windows, load_text, tokenize
from .evaluate import perplexity
from .loading import open_for_pruning
from .pipeline import PruneResult, prune_model
from .planning import needs_holdout
from .source import LayerSource
from .streaming import resolve_device

log = logging.getLogger(__name__)


def calibration_data(tokenizer: Any, config: PruneConfig, holdout: bool = False
                     ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Calibration windows [nsamples, seqlen] from `config.calib` (the calibration split).

    holdout=True also returns max(2, nsamples // 8) held-back windows drawn with seed + 1
    (for the temperature search; still calibration text, never evaluation text).
    """
    ids = tokenize(tokenizer, load_text(config.calib, split="calib"))
    windows = calibration_windows(ids, config.nsamples, config.seqlen, config.seed)
    if not holdout:
        return windows
    return windows, calibration_windows(ids, max(2, config.nsamples // 8), config.seqlen, config.seed + 1)


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
        model, loaded_tok = open_for_pruning(model_or_path, config.dtype)
        tokenizer = tokenizer or loaded_tok
    else:
        model = model_or_path
    if calib_windows is None:
        if tokenizer is None:
            raise ValueError("no tokenizer: the model folder has none, so pass tokenizer= or calib_windows= "
                             "(calibration text must be tokenized)")
        if needs_holdout(config) and holdout_windows is None:
            calib_windows, holdout_windows = calibration_data(tokenizer, config, holdout=True)
        else:
            calib_windows = calibration_data(tokenizer, config)
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


def evaluate_perplexity(model: nn.Module, tokenizer: Any, data: str = "wiki", seqlen: int = 512,
                        windows: int | None = 64, device: str = "auto", batch_size: int = 4,
                        progress: bool = True) -> float:
    """Perplexity per PROTOCOL.md on the evaluation side of `data` (first `windows` windows)."""
    ids = tokenize(tokenizer, load_text(data, split="eval"))
    return perplexity(model, eval_windows(ids, seqlen, windows), resolve_device(device), batch_size, progress)
