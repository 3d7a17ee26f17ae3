"""Forward hooks and the calibration context. Every hook is registered through a handle that
a `finally` removes, so a failed or stopped forward never leaves one behind."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


class StopForward(Exception):
    """Raised by a hook to end a forward early (the rest of the layer is not needed)."""


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


@contextlib.contextmanager
def capture_input(module: nn.Module, sink: list[torch.Tensor]) -> Iterator[None]:
    """Append the first positional input of every `module` call to `sink` (detached)."""

    def hook(_mod: nn.Module, args: tuple) -> None:
        sink.append(args[0].detach())

    handle = module.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def capture_output(module: nn.Module, sink: list[torch.Tensor], stop: bool = True) -> Iterator[None]:
    """Append `module`'s output (graph kept) to `sink`; with `stop`, then end the forward (StopForward)."""

    def hook(_m: nn.Module, _args: tuple, output: torch.Tensor) -> None:
        sink.append(output)
        if stop:
            raise StopForward

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def stop_after(module: nn.Module) -> Iterator[None]:
    """End the forward (StopForward) right after `module` has seen its input."""

    def hook(_m: nn.Module, _args: tuple) -> None:
        raise StopForward

    handle = module.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def run_layer(layer: nn.Module, hidden: torch.Tensor, call: tuple[tuple, dict]) -> torch.Tensor:
    """One decoder layer's forward; returns the output hidden states."""
    args, kwargs = call
    out = layer(hidden, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def run_until_stopped(layer: nn.Module, hidden: torch.Tensor, call: tuple[tuple, dict]) -> None:
    """`run_layer` for its hooks' sake: a StopForward raised by one of them ends it quietly."""
    try:
        run_layer(layer, hidden, call)
    except StopForward:
        pass


def strip_call(obj: Any) -> Any:
    """Drop caches and flags that must not be replayed into single-layer calls."""
    if isinstance(obj, dict):
        return {k: v for k, v in obj.items() if k not in ("cache", "past_key_values", "past_key_value", "use_cache")}
    return obj
