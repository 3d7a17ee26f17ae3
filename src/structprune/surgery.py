"""Slicing primitives: physically remove rows or columns of linear layers, with checked indices.

Weights are handled in nn.Linear layout [out, in]. Some families store [in, out] (GPT-2's
Conv1D); their adapter registers that module kind here (`register_transposed`), and the helpers
below read and write either layout through `get_weight` / `set_weight`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class TransposedKind:
    """A module kind that stores its weight [in, out]: how to recognise one, and how to record
    its new output size once its weight is replaced."""

    matches: Callable[[nn.Module], bool]
    set_out_features: Callable[[nn.Module, int], None]


_TRANSPOSED: list[TransposedKind] = []


def register_transposed(kind: TransposedKind) -> TransposedKind:
    """Declare a module kind with [in, out] weights (called by the family's adapter module)."""
    _TRANSPOSED.append(kind)
    return kind


def _transposed_kind(module: nn.Module) -> TransposedKind | None:
    return next((kind for kind in _TRANSPOSED if kind.matches(module)), None)


def is_transposed(module: nn.Module) -> bool:
    """True for a registered [in, out] module kind (GPT-2's Conv1D), False for nn.Linear."""
    return _transposed_kind(module) is not None


def get_weight(module: nn.Module) -> torch.Tensor:
    """The module's weight in [out, in] layout (a view; do not modify in place)."""
    return module.weight.T if is_transposed(module) else module.weight


def get_bias(module: nn.Module) -> torch.Tensor | None:
    return getattr(module, "bias", None)


def set_weight(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Replace the module's weight (given in [out, in] layout) and, if given, its bias."""
    ref = module.weight
    w = weight.detach().to(device=ref.device, dtype=ref.dtype)
    kind = _transposed_kind(module)
    if kind is not None:
        module.weight = nn.Parameter(w.T.contiguous(), requires_grad=ref.requires_grad)
        kind.set_out_features(module, w.shape[0])
    else:
        module.weight = nn.Parameter(w.contiguous(), requires_grad=ref.requires_grad)
        module.in_features, module.out_features = w.shape[1], w.shape[0]
    if bias is not None:
        if getattr(module, "bias", None) is None:
            raise ValueError(f"{type(module).__name__} has no bias; cannot set one")
        module.bias = nn.Parameter(bias.detach().to(device=ref.device, dtype=ref.dtype).contiguous(),
                                   requires_grad=module.bias.requires_grad)


def _check_index(index: torch.Tensor, size: int, what: str) -> torch.Tensor:
    index = torch.as_tensor(index, dtype=torch.long).flatten().cpu()
    if index.numel() == 0:
        raise ValueError(f"{what}: keeping zero units is not supported (keep at least one)")
    if int(index.min()) < 0 or int(index.max()) >= size:
        raise IndexError(f"{what}: index out of range [0, {size}): min {int(index.min())}, max {int(index.max())}")
    if index.unique().numel() != index.numel():
        raise ValueError(f"{what}: duplicate indices in keep set")
    return index


def slice_rows(module: nn.Module, index: torch.Tensor, name: str = "module") -> None:
    """Keep only output features `index` (rows in [out, in] layout), bias too."""
    w = get_weight(module)
    idx = _check_index(index, w.shape[0], f"{name} ({type(module).__name__}) rows").to(w.device)
    bias = get_bias(module)
    new_bias = None if bias is None else bias.detach()[idx]
    set_weight(module, w.detach()[idx], None)
    if bias is not None:
        module.bias = nn.Parameter(new_bias.contiguous(), requires_grad=bias.requires_grad)


def slice_cols(module: nn.Module, index: torch.Tensor, name: str = "module") -> None:
    """Keep only input features `index` (columns in [out, in] layout); the bias is unchanged."""
    w = get_weight(module)
    idx = _check_index(index, w.shape[1], f"{name} ({type(module).__name__}) columns").to(w.device)
    set_weight(module, w.detach()[:, idx], None)


def head_columns(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Feature indices [len(heads) * head_dim] of the given heads, in head order."""
    heads = torch.as_tensor(heads, dtype=torch.long).flatten()
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).flatten()
