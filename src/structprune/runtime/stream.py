"""The activation stream: calibration hidden states on the host, one decoder layer on the device.

What lives where (llm-compressor's sequential pipeline, with explicit onload/offload):
- host: the hidden states entering the current layer, one [windows, seqlen, hidden] float32
  tensor per device batch, and every layer's call arguments (masks, positions, rotary tables);
- device (`LayerStream.device`, in `LayerStream.dtype`): the layer being run and one batch.
A `LayerStream` is immutable in spirit: `run` returns the stream of the layer's outputs and
leaves its own batches as they were, so a caller can keep both (the dense and pruned streams).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import distributed
from ..arch import get_adapter
from .device import device_copy, to_device
from .hooks import StopForward, calibration_mode, capture_input, run_layer, strip_call

Call = tuple[tuple, dict]  # a decoder layer's (args, kwargs) besides the hidden states
Visit = Callable[[int, torch.Tensor, list[list[torch.Tensor]]], None]


def device_batch(config: Any, seqlen: int) -> int:
    """Calibration windows per device batch: at most `config.batch_size`, and at most
    `config.chunk_tokens` tokens (never less than one window). The activations on the compute
    device scale with it. At the defaults (8 windows of 512 tokens, 8192 tokens) it is batch_size."""
    return max(1, min(config.batch_size, config.chunk_tokens // seqlen))


@dataclass
class LayerStream:
    """Host-side hidden states of calibration windows entering one decoder layer.

    hidden: one float32 host tensor [b, seqlen, hidden] per device batch, in window order;
    calls: per decoder layer, the (args, kwargs) of a single-window call (they broadcast);
    batch: windows per batch (the last batch may hold fewer);
    device, dtype: where and in which precision layers and batches run."""

    hidden: list[torch.Tensor]
    calls: list[Call]
    batch: int
    device: torch.device
    dtype: torch.dtype

    @classmethod
    def capture(cls, model: nn.Module, layers: nn.ModuleList, windows: torch.Tensor, batch: int,
                device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> "LayerStream":
        """The hidden states entering layer 0 for `windows` [n, seqlen], in batches of `batch`.

        The embedding part of `model` runs on the host; the decoder layers are swapped for
        pass-through catchers for the duration and always restored, so no layer weight is used
        or moved. dtype: the run dtype (default: the model's)."""
        hidden, calls = _capture(model, layers, windows, batch)
        dtype = dtype if dtype is not None else next(model.parameters()).dtype
        return cls(hidden, calls, batch, torch.device(device), dtype)

    def __len__(self) -> int:
        return len(self.hidden)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.hidden)

    def with_hidden(self, hidden: list[torch.Tensor]) -> "LayerStream":
        """The same stream (calls, batching, device) carrying other hidden states."""
        return dataclasses.replace(self, hidden=hidden)

    def empty(self) -> "LayerStream":
        return self.with_hidden([])

    def onload(self, layer: nn.Module) -> nn.Module:
        """A copy of host `layer` on the device, in the run dtype (the host layer is not touched)."""
        return device_copy(layer, self.device, self.dtype)

    def call(self, index: int) -> Call:
        """Layer `index`'s call arguments on the device."""
        return to_device(self.calls[index], self.device, self.dtype)

    def batch_on_device(self, b: int) -> torch.Tensor:
        return self.hidden[b].to(self.device, self.dtype)

    def run(self, layer: nn.Module, index: int, capture: Sequence[nn.Module] = (),
            visit: Visit | None = None) -> "LayerStream":
        """Run `layer` (already on the device; decoder layer `index`) on every batch and return
        the stream of its outputs (host float32). capture: modules whose inputs are recorded per
        batch and handed to `visit(b, host batch, [inputs of each module])` after the forward."""
        call = self.call(index)
        out = []
        for b, x in enumerate(self.hidden):
            sinks: list[list[torch.Tensor]] = [[] for _ in capture]
            with contextlib.ExitStack() as hooks:
                for module, sink in zip(capture, sinks):
                    hooks.enter_context(capture_input(module, sink))
                y = run_layer(layer, x.to(self.device, self.dtype), call)
            if visit is not None:
                visit(b, x, sinks)
            out.append(y.float().cpu())
        return self.with_hidden(out)

    def prefix(self, tokens: int) -> "LayerStream":
        """The first batches holding at least `tokens` tokens (all if fewer); under torchrun,
        this rank's part of that prefix of the whole sharded stream."""
        if distributed.active():
            return self.with_hidden(distributed.token_prefix(self.hidden, tokens))
        out, have = [], 0
        for x in self.hidden:
            if have >= tokens:
                break
            out.append(x)
            have += x.shape[0] * x.shape[1]
        return self.with_hidden(out)


class _Catcher(nn.Module):
    """Stands in for a decoder layer: records its call and passes the hidden states through."""

    def __init__(self, index: int, record: dict[int, Call], stop: bool, attributes: dict[str, Any]) -> None:
        super().__init__()
        self.index = index
        self.record = record
        self.stop = stop
        for name, value in attributes.items():  # what the model's forward reads from its layers
            setattr(self, name, value)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.record[self.index] = (args, kwargs)
        if self.stop:
            self.record[-1] = ((hidden_states,), {})
            raise StopForward
        return hidden_states


def _capture(model: nn.Module, layers: nn.ModuleList, windows: torch.Tensor, batch: int
             ) -> tuple[list[torch.Tensor], list[Call]]:
    """(layer-0 input batches, host float32; per-layer single-window calls); see `LayerStream.capture`."""
    originals = list(layers)
    adapter = get_adapter(model.config)
    record: dict[int, Call] = {}
    n = len(originals)

    def run(ids: torch.Tensor, stop_at_first: bool) -> None:
        for i, layer in enumerate(originals):
            layers[i] = _Catcher(i, record, stop=(stop_at_first and i == 0) or i == n - 1,
                                 attributes=adapter.layer_attributes(layer))
        try:
            model(input_ids=ids, use_cache=False)
        except StopForward:
            pass

    hidden: list[torch.Tensor] = []
    try:
        with calibration_mode(model):
            run(windows[:1], stop_at_first=False)
            per_layer = [(record[i][0], strip_call(record[i][1])) for i in range(n)]
            for start in range(0, windows.shape[0], batch):
                run(windows[start : start + batch], stop_at_first=True)
                hidden.append(record[-1][0][0].detach().float().cpu())
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return hidden, per_layer
