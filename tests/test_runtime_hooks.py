"""runtime/hooks.py: the calibration context and the capture hooks, always restored or removed,
also when the forward fails."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model, windows

from structprune.arch import get_adapter
from structprune.runtime.hooks import (StopForward, calibration_mode, capture_input, capture_output, run_layer,
                                       run_until_stopped, stop_after, strip_call)
from structprune.runtime.stream import LayerStream


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))


def test_calibration_mode_is_eval_no_grad_no_cache_and_restores_on_error():
    model = tiny_model("llama").train()
    model.config.use_cache = True
    with pytest.raises(RuntimeError, match="boom"):
        with calibration_mode(model):
            assert not model.training and model.config.use_cache is False and not torch.is_grad_enabled()
            raise RuntimeError("boom")
    assert model.training and model.config.use_cache is True and torch.is_grad_enabled()


def test_capture_input_records_every_call_and_removes_its_hook():
    net, x = _mlp(), torch.randn(5, 4)
    sink: list[torch.Tensor] = []
    with capture_input(net[2], sink):
        net(x)
        net(x[:2])
    assert [t.shape[0] for t in sink] == [5, 2]
    torch.testing.assert_close(sink[0], net[1](net[0](x)))
    assert not net[2]._forward_pre_hooks


def test_capture_output_stops_the_forward_and_keeps_the_graph():
    net, x = _mlp(), torch.randn(5, 4)
    sink: list[torch.Tensor] = []
    with capture_output(net[0], sink):
        with pytest.raises(StopForward):
            net(x)
    assert len(sink) == 1 and sink[0].requires_grad and not net[0]._forward_hooks
    with capture_output(net[0], sink, stop=False):
        out = net(x)
    assert out.shape == (5, 2) and len(sink) == 2


def test_stop_after_ends_the_forward_before_the_module_runs_and_is_removed():
    net = _mlp()
    ran: list[bool] = []
    net[2].register_forward_hook(lambda *_: ran.append(True))
    with stop_after(net[2]):
        with pytest.raises(StopForward):
            net(torch.randn(2, 4))
    assert not ran and len(net[2]._forward_pre_hooks) == 0


def test_run_until_stopped_swallows_only_stop_forward():
    model = tiny_model("llama")
    layers = get_adapter(model.config).decoder_layers(model)

    def fail(*_):
        raise ValueError("other")

    with calibration_mode(model):
        stream = LayerStream.capture(model, layers, windows(2), 2)
        x, call = stream.hidden[0], stream.calls[0]
        sink: list[torch.Tensor] = []
        with capture_input(layers[0].mlp.down_proj, sink), stop_after(layers[0].mlp.down_proj):
            run_until_stopped(layers[0], x, call)
        assert len(sink) == 1 and run_layer(layers[0], x, call).shape == x.shape
        handle = layers[0].mlp.register_forward_pre_hook(fail)
        try:
            with pytest.raises(ValueError, match="other"):
                run_until_stopped(layers[0], x, call)
        finally:
            handle.remove()


def test_strip_call_drops_caches_and_cache_flags_only():
    kwargs = {"cache": 1, "past_key_values": 2, "past_key_value": 3, "use_cache": True, "attention_mask": 4}
    assert strip_call(kwargs) == {"attention_mask": 4}
    assert strip_call((1, 2)) == (1, 2)
