"""runtime/stream.py: the activation stream, batched windows run one layer at a time on the host."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model, windows

import structprune as sp
from structprune.arch import get_adapter
from structprune.runtime.hooks import calibration_mode, run_layer
from structprune.runtime.stream import LayerStream


def _stream(family: str = "llama", n: int = 5, batch: int = 2):
    from structprune.arch import get_adapter
    from structprune.runtime.hooks import calibration_mode
    from structprune.runtime.stream import LayerStream

    model = tiny_model(family)
    layers = get_adapter(model.config).decoder_layers(model)
    with calibration_mode(model):
        stream = LayerStream.capture(model, layers, windows(n), batch)
    return model, layers, stream


def test_stream_batches_windows_in_order_and_runs_a_layer_on_host_float32():
    from structprune.runtime.hooks import calibration_mode, run_layer

    model, layers, stream = _stream(n=5, batch=2)
    assert [x.shape[0] for x in stream] == [2, 2, 1] and stream.batch == 2 and stream.dtype == torch.float32
    seen = []
    with calibration_mode(model):
        layer = stream.onload(layers[0])
        nxt = stream.run(layer, 0, capture=[layer.mlp.down_proj],
                         visit=lambda b, x, inputs: seen.append((b, x is stream.hidden[b], len(inputs[0]))))
        want = [run_layer(layers[0], x, stream.calls[0]) for x in stream]
    assert seen == [(0, True, 1), (1, True, 1), (2, True, 1)]
    assert all(torch.equal(a, b) and a.dtype == torch.float32 and a.device.type == "cpu" for a, b in zip(nxt, want))
    assert nxt.calls is stream.calls and len(stream) == 3  # the input stream is left as it was
    assert not layer.mlp.down_proj._forward_pre_hooks  # capture hooks removed


def test_stream_capture_hooks_are_removed_when_the_forward_fails():
    model, layers, stream = _stream()
    layer = stream.onload(layers[0])

    def boom(*_):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        stream.run(layer, 0, capture=[layer.self_attn.o_proj], visit=boom)
    assert not layer.self_attn.o_proj._forward_pre_hooks


def test_stream_prefix_holds_whole_batches_up_to_the_token_count():
    _, _, stream = _stream(n=5, batch=2)
    seqlen = stream.hidden[0].shape[1]
    assert len(stream.prefix(1)) == 1 and len(stream.prefix(2 * seqlen + 1)) == 2 and len(stream.prefix(10**9)) == 3


def test_held_back_windows_are_batched_like_the_calibration_stream():
    """chunk_tokens bounds every device batch, the held-back ones too (planning.capture_holdout)."""
    from structprune.planning import capture_holdout
    from structprune.runtime.stream import device_batch

    model, _, stream = _stream(n=4, batch=device_batch(sp.PruneConfig.from_flat(batch_size=8, chunk_tokens=48, seqlen=24), 24))
    hold = capture_holdout(model, stream, windows(5, seed=3))
    assert stream.batch == 2 and [x.shape[0] for x in hold] == [2, 2, 1]
    assert len(capture_holdout(model, stream, windows(5)[:0])) == 0  # an empty shard


def test_layer_stream_equals_model_forward(family):
    """Capturing the layer-0 inputs and running layers one by one reproduces the model."""
    model = tiny_model(family)
    ids = windows(4)
    ad = get_adapter(model.config)
    layers = ad.decoder_layers(model)
    with calibration_mode(model):
        stream = LayerStream.capture(model, layers, ids, 3)
        hidden, calls = stream.hidden, stream.calls
        ref = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
        for b, h in enumerate(hidden):
            for i, layer in enumerate(layers):
                h = run_layer(layer, h, calls[i])
                if i < len(layers) - 1:  # the last entry of hidden_states has the final norm applied
                    torch.testing.assert_close(h, ref[i + 1][b * 3 : b * 3 + 3], rtol=1e-4, atol=1e-5)
