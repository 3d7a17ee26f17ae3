"""reconstruct/activations.py: HF activation names, and each activation's first and second
derivatives against autograd."""

from __future__ import annotations

import pytest
import torch

from structprune.reconstruct.activations import curvature, resolve_activation

NAMES = ["relu", "gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_tanh", "gelu_fast", "silu", "swish"]


@pytest.mark.parametrize("act", NAMES)
def test_derivatives_equal_autograd(act):
    name, fn, grad = resolve_activation(act)
    t = torch.linspace(-6, 6, 241, dtype=torch.float64)[torch.arange(241) != 120]  # relu: no kink at 0
    x = t.clone().requires_grad_(True)
    (first,) = torch.autograd.grad(fn(x).sum(), x, create_graph=True)
    torch.testing.assert_close(grad(t), first.detach(), rtol=1e-10, atol=1e-12)
    if name == "relu":
        assert torch.equal(curvature(name)(t), torch.zeros_like(t))
    else:
        (second,) = torch.autograd.grad(first.sum(), x)
        torch.testing.assert_close(curvature(name)(t), second, rtol=1e-9, atol=1e-12)


def test_hf_names_map_to_the_canonical_ones():
    assert {act: resolve_activation(act)[0] for act in NAMES} == {
        "relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
        "gelu_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "silu": "silu", "swish": "silu"}
    _, fn, _ = resolve_activation("gelu_pytorch_tanh")
    t = torch.linspace(-4, 4, 81, dtype=torch.float64)
    torch.testing.assert_close(fn(t), torch.nn.functional.gelu(t, approximate="tanh"))


def test_unknown_activation_lists_the_supported_ones():
    with pytest.raises(ValueError, match=r"act='tanh' is not supported; choose one of \['gelu', "):
        resolve_activation("tanh")
