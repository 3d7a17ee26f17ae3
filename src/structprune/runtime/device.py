"""The compute device: choosing it, and moving tensors and layers onto it (onload) and back."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


def to_device(obj: Any, device: torch.device | str, dtype: torch.dtype | None = None) -> Any:
    """Move tensors inside nested tuples/lists/dicts (floating ones cast to `dtype` if given)."""
    if isinstance(obj, torch.Tensor):
        if dtype is not None and obj.is_floating_point():
            return obj.to(device=device, dtype=dtype)
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device, dtype) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device, dtype) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device, dtype) for k, v in obj.items()}
    return obj


def device_copy(layer: nn.Module, device: torch.device | str, dtype: torch.dtype) -> nn.Module:
    """A fresh copy of a host layer on the compute device (the source is never modified)."""
    return copy.deepcopy(layer).to(device=device, dtype=dtype)


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available else cpu; a requested device that is missing is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"device={name!r} is not a valid torch device string (try 'cpu', 'cuda', 'cuda:0')") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={name!r} requested but CUDA is not available here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={name!r} requested but MPS is not available here; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device={name!r} is not supported; use cpu, cuda or mps")
    return dev
