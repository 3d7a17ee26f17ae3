"""runtime/source.py: a saved folder read layer by layer equals the model; streaming from safetensors gives the
in-memory result with one dense layer resident at a time."""

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
    for allocation in ("uniform", "softmax", "sensitivity"):
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
    config = sp.PruneConfig.from_flat(sparsity=0.3, nsamples=8, seqlen=24, device="cpu", allocation="uniform", rho=1.0,
                                      **cfg)
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


@pytest.mark.parametrize("fam", ["llama", "gpt2"])
def test_safetensors_source_reads_each_layer_as_the_model_has_it(fam, tmp_path):
    """Layer i read from a saved folder has the model's layer-i tensors, exactly, on the host."""
    from structprune.arch import get_adapter

    model = tiny_model(fam)
    model.save_pretrained(tmp_path)
    src = SafetensorsSource(tmp_path)
    layers = get_adapter(model.config).decoder_layers(model)
    for i, dense in enumerate(layers):
        got = src.layer(i).state_dict()
        want = dense.state_dict()
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) and got[k].device.type == "cpu" for k in want), i


@pytest.mark.parametrize("fam", ["llama", "gpt2"])
def test_total_params_count_tied_tensors_once(fam, tmp_path):
    """gpt2 ties its head to the embedding: the folder and the model count that tensor once."""
    from structprune.runtime.source import ModelSource

    model = tiny_model(fam)
    model.save_pretrained(tmp_path)
    want = sum(p.numel() for p in model.parameters())
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == (fam == "gpt2")
    assert SafetensorsSource(tmp_path).total_params() == want == ModelSource(model).total_params()
