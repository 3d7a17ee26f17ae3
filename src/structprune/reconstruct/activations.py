"""Activation functions of HF MLP configs with their first and second derivatives (float64 maths)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

Activation = Callable[[Tensor], Tensor]

_ACT_ALIASES = {
    "relu": "relu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "silu": "silu",
    "swish": "silu",
}
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _gelu_tanh(t: Tensor) -> Tensor:
    return 0.5 * t * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (t + 0.044715 * t**3)))


def _gelu_tanh_grad(t: Tensor) -> Tensor:
    th = torch.tanh(_SQRT_2_OVER_PI * (t + 0.044715 * t**3))
    return 0.5 * (1.0 + th) + 0.5 * t * (1.0 - th * th) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * t * t)


def _gelu_tanh_curv(t: Tensor) -> Tensor:
    th = torch.tanh(_SQRT_2_OVER_PI * (t + 0.044715 * t**3))
    s1 = _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * t * t)
    s2 = _SQRT_2_OVER_PI * 6 * 0.044715 * t
    return (1.0 - th * th) * (s1 + 0.5 * t * (s2 - 2.0 * th * s1 * s1))


def _gelu_curv(t: Tensor) -> Tensor:
    return torch.exp(-0.5 * t * t) / math.sqrt(2.0 * math.pi) * (2.0 - t * t)


def _silu_curv(t: Tensor) -> Tensor:
    s = torch.sigmoid(t)
    return s * (1.0 - s) * (2.0 + t * (1.0 - 2.0 * s))


def _gelu_grad(t: Tensor) -> Tensor:
    cdf = 0.5 * (1.0 + torch.erf(t / math.sqrt(2.0)))
    return cdf + t * torch.exp(-0.5 * t * t) / math.sqrt(2.0 * math.pi)


def _silu_grad(t: Tensor) -> Tensor:
    s = torch.sigmoid(t)
    return s * (1.0 + t * (1.0 - s))


_ACTS: dict[str, tuple[Activation, Activation, Activation]] = {  # function, first and second derivative
    "relu": (torch.relu, lambda t: (t > 0).to(t.dtype), torch.zeros_like),
    "gelu": (torch.nn.functional.gelu, _gelu_grad, _gelu_curv),
    "gelu_tanh": (_gelu_tanh, _gelu_tanh_grad, _gelu_tanh_curv),
    "silu": (torch.nn.functional.silu, _silu_grad, _silu_curv),
}


def resolve_activation(act: str) -> tuple[str, Activation, Activation]:
    """Canonical name, function and derivative of an activation named as in HF configs."""
    name = _ACT_ALIASES.get(act)
    if name is None:
        raise ValueError(f"act={act!r} is not supported; choose one of {sorted(_ACT_ALIASES)}")
    fn, grad, _ = _ACTS[name]
    return name, fn, grad


def curvature(name: str) -> Activation:
    """Second derivative of the canonical activation `name` (from `resolve_activation`)."""
    return _ACTS[name][2]
