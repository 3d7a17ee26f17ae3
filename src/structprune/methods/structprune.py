"""The layer pipeline (STRUPRUNE) as a registered method: one decoder layer at a time,
scored on the pruned stream, re-fitted, sliced (pipeline.py)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import PruneConfig
from ..pipeline import prune_model
from ..plan import PrunePlan
from ..runtime.source import LayerSource
from . import register_method


@register_method("structprune", masks=True, sink=True, round_to=True, distributed=True, holdout=True)
def run(model: nn.Module | LayerSource, windows: torch.Tensor, holdout: torch.Tensor | None, config: PruneConfig,
        progress: bool, masks: PrunePlan | None, sink: Any) -> tuple[nn.Module, PrunePlan]:
    """`pipeline.prune_model` on calibration `windows` [n, seqlen] and held-back `holdout`."""
    return prune_model(model, windows, config, progress=progress, holdout=holdout, masks=masks, sink=sink)
