"""Perplexity per PROTOCOL.md: exp(mean next-token NLL) over non-overlapping windows, float32."""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from .runtime.hooks import calibration_mode


def perplexity(model: nn.Module, windows: torch.Tensor, device: torch.device | str = "cpu",
               batch_size: int = 4, progress: bool = True, desc: str = "perplexity") -> float:
    """Perplexity of `model` on token `windows` [n, seqlen]; logits are upcast to float32.

    The model is moved to `device` for the duration and moved back to where it was.
    """
    home = next(model.parameters()).device
    model.to(device)
    nll, count = 0.0, 0
    try:
        with calibration_mode(model):
            for start in tqdm(range(0, windows.shape[0], batch_size), desc=desc, disable=not progress,
                              unit="batch"):
                ids = windows[start : start + batch_size].to(device)
                logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
                target = ids[:, 1:]
                loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                   reduction="sum")
                nll += float(loss)
                count += target.numel()
    finally:
        model.to(home)
    return math.exp(nll / count)
