"""Optional recovery after pruning: LoRA fine-tuning on calibration-split text, merged back.

The pruned model gets low-rank adapters (PEFT LoRA) on every linear projection of its decoder
layers, is trained on next-token prediction over windows of the CALIBRATION split (never the
evaluation text), and the adapters are merged into the weights, so the result is again a plain
dense model of the same (pruned) shapes that transformers reloads without PEFT.

Memory: unlike pruning, training holds the whole (pruned) model and its activations for one
batch on the device: O(model), not O(layer). LoRA keeps the optimizer state to the adapters
(2 x rank x (in + out) per projection). Numerics: float32 training; a step whose loss or
gradients are not finite is skipped and counted; too many skips stop the run and return the
input weights unchanged, so no NaN ever reaches a weight.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import get_adapter
from .surgery import is_transposed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneConfig:
    """LoRA recovery settings.

    steps / batch_size / seqlen: optimizer steps, windows per step, tokens per window; the
    training windows (steps x batch_size) are drawn from the calibration split with `seed`
    (default 1, so not the pruning calibration windows of seed 0).
    rank / alpha: LoRA rank and scaling (alpha / rank). lr: AdamW peak learning rate, with
    `warmup` linear warm-up steps then cosine decay to zero. max_skips: non-finite steps
    tolerated before giving up (the input weights are then returned).
    """

    steps: int = 100
    batch_size: int = 2
    seqlen: int = 512
    rank: int = 8
    alpha: float = 16.0
    lr: float = 3e-4
    warmup: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 1
    text: str = "wiki"
    max_skips: int = 5
    device: str = "auto"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: must be >= 1")
        if self.seqlen < 8:
            raise ValueError(f"seqlen={self.seqlen!r} is invalid: windows must be at least 8 tokens")
        if not self.lr > 0 or not self.alpha > 0:
            raise ValueError(f"lr={self.lr!r}, alpha={self.alpha!r}: both must be positive")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def lora_targets(model: nn.Module) -> list[str]:
    """Full names of the linear projections inside the decoder layers (LoRA targets): each
    nn.Linear and each [in, out] module kind an adapter registered (GPT-2's Conv1D)."""
    name_of = {id(m): n for n, m in model.named_modules()}
    names = [f"{name_of[id(layer)]}.{sub}"
             for layer in get_adapter(model.config).decoder_layers(model)
             for sub, module in layer.named_modules() if isinstance(module, nn.Linear) or is_transposed(module)]
    if not names:
        raise ValueError(f"no linear projections found in the decoder layers of {type(model).__name__}")
    return names


def _lr_factor(step: int, config: FinetuneConfig) -> float:
    if step < config.warmup:
        return (step + 1) / config.warmup
    span = max(1, config.steps - config.warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - config.warmup) / span)))


def lora_finetune(model: nn.Module, windows: torch.Tensor, config: FinetuneConfig, device: torch.device | str = "cpu",
                  progress: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """Fine-tune a copy of `model` with LoRA on `windows` [steps * batch_size, seqlen] (token
    ids of calibration text) and merge the adapters. Returns (merged model on the host, eval
    mode; info: losses, skipped steps, seconds). `model` itself is never modified."""
    from peft import LoraConfig, get_peft_model

    need = config.steps * config.batch_size
    if windows.shape[0] < need:
        raise ValueError(f"{windows.shape[0]} training windows for {config.steps} steps x {config.batch_size}; "
                         f"pass at least {need}")
    t0 = time.perf_counter()
    torch.manual_seed(config.seed)
    work = copy.deepcopy(model).float().to(device)
    peft_model = get_peft_model(work, LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0,
                                                 target_modules=lora_targets(work), bias="none"))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, config))
    peft_model.train()
    losses: list[float] = []
    skipped = 0
    bar = tqdm(range(config.steps), desc="LoRA fine-tuning", disable=not progress, unit="step")
    for step in bar:
        batch = windows[step * config.batch_size:(step + 1) * config.batch_size].to(device)
        loss = peft_model(input_ids=batch, labels=batch, use_cache=False).loss
        if torch.isfinite(loss):
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        if not torch.isfinite(loss) or not torch.isfinite(norm):
            skipped += 1
            opt.zero_grad(set_to_none=True)
            log.warning("LoRA step %d: non-finite loss or gradient, step skipped (%d so far)", step, skipped)
            if skipped > config.max_skips:
                log.warning("LoRA fine-tuning gave up after %d non-finite steps; returning the input weights",
                            skipped)
                return model, {"skipped": skipped, "gave_up": True, "losses": losses}
            continue
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    merged = peft_model.merge_and_unload().to("cpu").eval()
    for name, p in merged.named_parameters():
        if not torch.isfinite(p).all():
            log.warning("LoRA merge produced non-finite values in %s; returning the input weights", name)
            return model, {"skipped": skipped, "gave_up": True, "losses": losses}
    k = max(1, len(losses) // 10)
    info = {"config": config.to_dict(), "steps_done": len(losses), "skipped": skipped, "gave_up": False,
            "loss_first": sum(losses[:k]) / k if losses else None,
            "loss_last": sum(losses[-k:]) / k if losses else None,
            "tokens": len(losses) * config.batch_size * config.seqlen, "seconds": time.perf_counter() - t0}
    log.info("LoRA fine-tuning: %d steps, loss %.4f -> %.4f (mean of first/last tenth), %.0f s", len(losses),
             info["loss_first"] or float("nan"), info["loss_last"] or float("nan"), info["seconds"])
    return merged, info
