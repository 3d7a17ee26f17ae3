"""Streaming from safetensors: same result as in memory, one dense layer resident at a time."""

from __future__ import annotations

import gc
import weakref

import torch
from conftest import logits, tiny_model, windows

import structprune as sp
from structprune.source import SafetensorsSource


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
    cfg = sp.PruneConfig(sparsity=0.3, nsamples=8, seqlen=24, batch_size=4, device="cpu")
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
        cfg = sp.PruneConfig(sparsity=0.3, nsamples=8, seqlen=24, device="cpu", allocation=allocation,
                             temperature="1.0")
        res = sp.prune(src, cfg, calib_windows=windows(8), progress=False)
        assert src.peak == 1, (allocation, src.peak)
        assert src.loads >= 3
        assert all(not p.is_meta for p in res.model.parameters())
