"""Unit importance: one score per attention head (query head) or FFN neuron.

Scores come from the consumer projection (o_proj for heads, down_proj for neurons):
W [out, n] in Linear layout and statistics of its input over the calibration tokens.
A unit owns a set of input columns (a head: head_dim columns; a neuron: one column).
Scorers are pure functions registered by name.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .stats import GramAccumulator

Scorer = Callable[[torch.Tensor, GramAccumulator, torch.Generator], torch.Tensor]
_SCORERS: dict[str, Scorer] = {}


def register_scorer(name: str) -> Callable[[Scorer], Scorer]:
    def wrap(fn: Scorer) -> Scorer:
        _SCORERS[name] = fn
        return fn

    return wrap


def available_scorers() -> list[str]:
    return sorted(_SCORERS)


@register_scorer("wanda")
def wanda(weight: torch.Tensor, stats: GramAccumulator, gen: torch.Generator) -> torch.Tensor:
    """Per column c: ||W[:, c]||_2 * ||X_c||_2 (weight magnitude times input-activation norm)."""
    return weight.detach().float().cpu().norm(dim=0) * stats.input_norm.cpu()


@register_scorer("magnitude")
def magnitude(weight: torch.Tensor, stats: GramAccumulator, gen: torch.Generator) -> torch.Tensor:
    """Per column: ||W[:, c]||_2 (no calibration data)."""
    return weight.detach().float().cpu().norm(dim=0)


@register_scorer("flap")
def flap(weight: torch.Tensor, stats: GramAccumulator, gen: torch.Generator) -> torch.Tensor:
    """FLAP fluctuation: Var(X_c) * ||W[:, c]||_2^2 (An et al., AAAI 2024)."""
    return stats.input_var.float().cpu() * weight.detach().float().cpu().norm(dim=0) ** 2


@register_scorer("random")
def random(weight: torch.Tensor, stats: GramAccumulator, gen: torch.Generator) -> torch.Tensor:
    """Uniform random scores from the run's seeded generator (a floor baseline)."""
    return torch.rand(weight.shape[1], generator=gen)


def column_scores(name: str, weight: torch.Tensor, stats: GramAccumulator, gen: torch.Generator) -> torch.Tensor:
    if name not in _SCORERS:
        raise ValueError(f"scorer={name!r} is unknown; choose one of {available_scorers()}")
    scores = _SCORERS[name](weight, stats, gen)
    return torch.nan_to_num(scores.float(), nan=0.0, posinf=0.0, neginf=0.0)


def unit_scores(columns: torch.Tensor, unit_size: int) -> torch.Tensor:
    """Sum column scores over units of `unit_size` consecutive columns: [n / unit_size]."""
    return columns.reshape(-1, unit_size).sum(dim=1)
