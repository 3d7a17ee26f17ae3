"""Streaming from safetensors: same result as in memory, one dense layer resident at a time."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from conftest import logits, tiny_model, windows

import structprune as sp
from structprune.runtime.source import SafetensorsSource


class TrackingSource(SafetensorsSource):
    """Counts the dense layers alive at any moment (a hook on the layer loader)."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.alive: set[int] = set()
        self.peak = 0
        self.loads = 0

    def layer(self, index: int):
        gc.collect()
        layer = super().layer(index)
        key = id(layer)
        self.alive.add(key)
        weakref.finalize(layer, self.alive.discard, key)
        self.peak = max(self.peak, len(self.alive))
        self.loads += 1
        return layer


def test_safetensors_stream_equals_in_memory(family, tmp_path):
    model = tiny_model(family)
    model.save_pretrained(tmp_path / "dense")
    cfg = sp.PruneConfig.from_flat(sparsity=0.3, nsamples=8, seqlen=24, batch_size=4, device="cpu")
    ids = windows(8)
    mem = sp.prune(model, cfg, calib_windows=ids, progress=False)
    disk = sp.prune(str(tmp_path / "dense"), cfg, calib_windows=ids, progress=False)
    assert disk.plan.shapes() == mem.plan.shapes()
    torch.testing.assert_close(logits(disk.model, ids[:2]), logits(mem.model, ids[:2]), rtol=1e-4, atol=1e-5)
    assert disk.plan.params_dense == mem.plan.params_dense


def test_at_most_one_dense_layer_resident(tmp_path):
    model = tiny_model("llama")
    model.config.num_hidden_layers = 3
    model.save_pretrained(tmp_path / "dense")
    for allocation in ("uniform", "softmax"):
        src = TrackingSource(tmp_path / "dense")
        cfg = sp.PruneConfig.from_flat(sparsity=0.3, nsamples=8, seqlen=24, device="cpu", allocation=allocation,
                             temperature="1.0")
        res = sp.prune(src, cfg, calib_windows=windows(8), progress=False)
        assert src.peak == 1, (allocation, src.peak)
        assert src.loads >= 3
        assert all(not p.is_meta for p in res.model.parameters())


class RecordingSource(TrackingSource):
    """Also logs each layer load into a shared event list, and the batch size (windows) of every
    forward run by a copy of a loaded layer (the hook travels with the device copies)."""

    def __init__(self, *a, events: list, **kw) -> None:
        super().__init__(*a, **kw)
        self.events = events
        self.batches: list[int] = []

    def layer(self, index: int):
        layer = super().layer(index)
        self.events.append(("load", index))
        layer.register_forward_pre_hook(lambda _m, args: self.batches.append(args[0].shape[0]))
        return layer


def _recording_run(folder, tmp_path, **cfg):
    from structprune.io import ShardWriter

    events: list = []

    class RecordingWriter(ShardWriter):
        def write_layer(self, index, prefix, layer):
            events.append(("write", index))
            return super().write_layer(index, prefix, layer)

    src = RecordingSource(folder, events=events)
    sink = RecordingWriter(tmp_path / f"out-{len(list(tmp_path.iterdir()))}", release=True)
    config = sp.PruneConfig.from_flat(sparsity=0.3, nsamples=8, seqlen=24, device="cpu", rho=1.0, **cfg)
    res = sp.prune(src, config, calib_windows=windows(8), progress=False, sink=sink)
    return src, events, res


def test_layers_stream_in_and_out_one_at_a_time(tmp_path):
    """Layer i is loaded, pruned and written to its shard before layer i + 1 is loaded."""
    model = tiny_model("opt")
    model.save_pretrained(tmp_path / "dense")
    src, events, _ = _recording_run(tmp_path / "dense", tmp_path)
    assert events == [(kind, i) for i in range(3) for kind in ("load", "write")]
    assert src.peak == 1


def test_chunk_tokens_bounds_the_device_batch(tmp_path):
    """chunk_tokens caps the calibration tokens per device forward; the result is the same."""
    model = tiny_model("opt")
    model.save_pretrained(tmp_path / "dense")
    full, _, ref = _recording_run(tmp_path / "dense", tmp_path, batch_size=8)
    small, _, res = _recording_run(tmp_path / "dense", tmp_path, batch_size=8, chunk_tokens=48)
    assert max(full.batches) == 8
    assert max(small.batches) == 2 and sum(small.batches) == sum(full.batches)
    assert res.plan.shapes() == ref.plan.shapes()
    for a, b in zip(res.plan.layers, ref.plan.layers):
        assert a.kept_neurons == b.kept_neurons and a.kept_heads == b.kept_heads


# --- the activation stream (runtime/stream.py) -------------------------------------------------

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
