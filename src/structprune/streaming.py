"""Plumbing for the layer loop: capture the decoder-layer inputs, run one layer at a time,
move tensors between the host and the compute device, and hook projection inputs.

What lives where:
- host: the full model (or its skeleton), the calibration hidden states of both streams
  ([nsamples, seqlen, hidden] each, float32), the per-layer call arguments;
- device: one decoder layer (dense copy and pruned copy), one batch of hidden states,
  the running statistics of the projection being pruned.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


class _StopForward(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for a decoder layer: records its call and passes the hidden states through."""

    def __init__(self, index: int, record: dict[int, tuple[tuple, dict]], stop: bool, original: nn.Module) -> None:
        super().__init__()
        self.index = index
        self.record = record
        self.stop = stop
        # Some models read attributes of their layers (e.g. attention_type); mirror them.
        for name in ("attention_type", "layer_type", "is_sliding"):
            if hasattr(original, name):
                setattr(self, name, getattr(original, name))

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.record[self.index] = (args, kwargs)
        if self.stop:
            self.record[-1] = ((hidden_states,), {})
            raise _StopForward
        return hidden_states


@contextlib.contextmanager
def calibration_mode(model: nn.Module) -> Iterator[None]:
    """no_grad, eval, no KV cache; restored in `finally`."""
    was_training = model.training
    use_cache = getattr(model.config, "use_cache", None)
    model.eval()
    model.config.use_cache = False
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
        if use_cache is not None:
            model.config.use_cache = use_cache


def _strip(obj: Any) -> Any:
    """Drop caches and flags that must not be replayed into single-layer calls."""
    if isinstance(obj, dict):
        return {k: v for k, v in obj.items() if k not in ("cache", "past_key_values", "past_key_value", "use_cache")}
    return obj


def capture_layer_inputs(
    model: nn.Module, layers: nn.ModuleList, windows: torch.Tensor, batch_size: int
) -> tuple[list[torch.Tensor], list[tuple[tuple, dict]]]:
    """Run the embedding part of `model` on the host and return
    (hidden states entering layer 0, one [b, seqlen, hidden] float32 tensor per batch;
     per-layer (args, kwargs) for a single-window call, which broadcast over the batch).

    The decoder layers are swapped for pass-through catchers for the duration and always
    restored, so no layer weight is used or moved.
    """
    originals = list(layers)
    record: dict[int, tuple[tuple, dict]] = {}
    n = len(originals)

    def run(ids: torch.Tensor, stop_at_first: bool) -> None:
        for i, layer in enumerate(originals):
            layers[i] = _Catcher(i, record, stop=(stop_at_first and i == 0) or i == n - 1, original=layer)
        try:
            model(input_ids=ids, use_cache=False)
        except _StopForward:
            pass

    hidden: list[torch.Tensor] = []
    try:
        with calibration_mode(model):
            run(windows[:1], stop_at_first=False)
            per_layer = [(record[i][0], _strip(record[i][1])) for i in range(n)]
            for start in range(0, windows.shape[0], batch_size):
                run(windows[start : start + batch_size], stop_at_first=True)
                hidden.append(record[-1][0][0].detach().float().cpu())
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return hidden, per_layer


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


def run_layer(layer: nn.Module, hidden: torch.Tensor, call: tuple[tuple, dict]) -> torch.Tensor:
    """One decoder layer's forward; returns the output hidden states."""
    args, kwargs = call
    out = layer(hidden, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


@contextlib.contextmanager
def capture_input(module: nn.Module, sink: list[torch.Tensor]) -> Iterator[None]:
    """Append the first positional input of every `module` call to `sink` (handle always removed)."""

    def hook(_mod: nn.Module, args: tuple) -> None:
        sink.append(args[0].detach())

    handle = module.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


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
