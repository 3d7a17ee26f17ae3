"""runtime/device.py: choosing the compute device and moving nested inputs and layers onto it."""

from __future__ import annotations

import pytest
import torch

from structprune.runtime.device import device_copy, resolve_device, to_device


def test_to_device_casts_floating_tensors_in_nested_containers_only():
    x, ids = torch.ones(2, dtype=torch.float32), torch.arange(3)
    out = to_device({"a": (x, [ids, 7]), "b": None}, "cpu", torch.float64)
    assert out["a"][0].dtype == torch.float64 and out["a"][1][0].dtype == torch.int64
    assert isinstance(out["a"], tuple) and isinstance(out["a"][1], list) and out["a"][1][1] == 7 and out["b"] is None
    assert to_device(x, "cpu") is x  # already there, no dtype: no copy


def test_device_copy_leaves_the_source_layer_alone():
    layer = torch.nn.Linear(3, 2)
    copy = device_copy(layer, "cpu", torch.float64)
    assert copy.weight.dtype == torch.float64 and layer.weight.dtype == torch.float32
    with torch.no_grad():
        copy.weight.zero_()
    assert layer.weight.abs().sum() > 0


def test_resolve_device_auto_and_errors_name_the_value():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device='nonsense' is not a valid torch device"):
        resolve_device("nonsense")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda:0' requested but CUDA is not available"):
            resolve_device("cuda:0")
    with pytest.raises(ValueError, match="device='meta' is not supported"):
        resolve_device("meta")
