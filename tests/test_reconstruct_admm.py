"""Structured ADMM reconstruction of an MLP block (reconstruct/admm.py; its steps are in
test_reconstruct_admm_steps.py): the loop's invariants (sparsity 0 changes nothing, never worse than one-shot
least squares, accepted objective non-increasing, no NaN on degenerate inputs)."""

from __future__ import annotations

import math

import pytest
import torch

from structprune.linalg import damped_cholesky_solve
from structprune.reconstruct.activations import resolve_activation
from structprune.reconstruct.admm import admm_mlp

D_IN, D_FFN, D_OUT, T = 16, 32, 12, 256
COMBOS = [("relu", False), ("gelu", False), ("gelu_new", False), ("gelu_pytorch_tanh", True),
          ("silu", True), ("relu", True), ("gelu_tanh", False)]


def make_problem(act: str, gated: bool, seed: int = 0, t: int = T, noise: float = 0.1, bias: bool | None = None,
                 dtype: torch.dtype = torch.float64):
    """Random MLP block; x is the dense input plus noise (the 'pruned stream'), y the dense output."""
    g = torch.Generator().manual_seed(seed)
    bias = (not gated) if bias is None else bias
    mix = torch.randn(D_IN, D_IN, generator=g, dtype=dtype) / D_IN**0.5
    xd = torch.randn(t, D_IN, generator=g, dtype=dtype) @ mix + 0.2
    x = xd + noise * torch.randn(t, D_IN, generator=g, dtype=dtype)
    ws = [torch.randn(D_FFN, D_IN, generator=g, dtype=dtype) / D_IN**0.5 for _ in range(2 if gated else 1)]
    bs = [0.1 * torch.randn(D_FFN, generator=g, dtype=dtype) if bias else None for _ in ws]
    w2 = torch.randn(D_OUT, D_FFN, generator=g, dtype=dtype) / D_FFN**0.5
    b2 = 0.1 * torch.randn(D_OUT, generator=g, dtype=dtype) if bias else None
    return x, mlp(xd, ws, bs, w2, b2, act, gated), ws, bs, w2, b2


def mlp(x, ws, bs, w2, b2, act, gated):
    _, fn, _ = resolve_activation(act)
    m = [x @ w.T + (0 if b is None else b) for w, b in zip(ws, bs)]
    h = fn(m[0]) * m[1] if gated else fn(m[0])
    return h @ w2.T + (0 if b2 is None else b2)


def block_error(x, y, res, act, gated):
    out = mlp(x.double(), [w.double() for w in res.producers],
              [None if b is None else b.double() for b in res.producer_biases],
              res.consumer.double(), None if res.consumer_bias is None else res.consumer_bias.double(), act, gated)
    return float(((y.double() - out) ** 2).sum()) / x.shape[0]


def one_shot_error(x, y, ws, bs, w2, b2, keep, act, gated, damp=0.01):
    """Independent one-shot baseline: ridge least squares of y on the kept true activations."""
    _, fn, _ = resolve_activation(act)
    m = [x @ w[keep].T + (0 if b is None else b[keep]) for w, b in zip(ws, bs)]
    h = fn(m[0]) * m[1] if gated else fn(m[0])
    if b2 is not None:
        h = torch.cat([h, torch.ones(h.shape[0], 1, dtype=h.dtype)], dim=1)
    w = damped_cholesky_solve(h.T @ h, y.T @ h, damp)
    return float(((y - h @ w.T) ** 2).sum()) / x.shape[0]


def keep_half(seed: int = 1) -> torch.Tensor:
    return torch.randperm(D_FFN, generator=torch.Generator().manual_seed(seed))[: D_FFN // 2].sort().values


# ------------------------------------------------------------------------------- the loop


@pytest.mark.parametrize("act,gated", COMBOS)
def test_sparsity_zero_returns_original_weights(act, gated):
    x, _, ws, bs, w2, b2 = make_problem(act, gated, bias=True)
    y = mlp(x, ws, bs, w2, b2, act, gated)  # target: the dense MLP on the same x
    res = admm_mlp(x, y, ws, bs, w2, b2, torch.arange(D_FFN), act, gated, iters=3)
    for got, want in zip(res.producers, ws):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)
    for got, want in zip(res.producer_biases, bs):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(res.consumer, w2, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(res.consumer_bias, b2, rtol=1e-6, atol=1e-8)
    assert res.history[res.best_iter]["recon_error"] < 1e-10


def test_sparsity_zero_float32():
    x, _, ws, bs, w2, b2 = make_problem("relu", False, dtype=torch.float32)
    y = mlp(x, ws, bs, w2, b2, "relu", False)
    res = admm_mlp(x, y, ws, bs, w2, b2, torch.arange(D_FFN), "relu", False)
    assert res.consumer.dtype == torch.float32 and res.producers[0].dtype == torch.float32
    torch.testing.assert_close(res.consumer, w2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(res.producers[0], ws[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("act,gated", COMBOS)
def test_objective_non_increasing_and_beats_one_shot(act, gated):
    x, y, ws, bs, w2, b2 = make_problem(act, gated)
    keep = keep_half()
    res = admm_mlp(x, y, ws, bs, w2, b2, keep, act, gated, iters=5, beta=10.0)
    accepted = [h for h in res.history if h["accepted"]]
    objs = [h["objective"] for h in accepted]
    assert all(b <= a for a, b in zip(objs, objs[1:]))
    # the ADMM surrogate never rises between consecutive accepted iterations
    surs = [h["surrogate"] for h in res.history]
    if res.rejected == 0:
        assert all(b <= a * (1 + 1e-9) for a, b in zip(surs, surs[1:]))
    e = block_error(x, y, res, act, gated)
    assert e == pytest.approx(res.history[res.best_iter]["objective"], rel=1e-6)
    base = one_shot_error(x, y, ws, bs, w2, b2, keep, act, gated)
    assert e <= base * (1 + 1e-9)
    assert e < 0.98 * base  # and it actually helps on this problem
    assert res.history[0]["objective"] <= base * (1 + 1e-9)


def test_chunking_does_not_change_the_result():
    x, y, ws, bs, w2, b2 = make_problem("silu", True)
    keep = keep_half()
    a = admm_mlp(x, y, ws, bs, w2, b2, keep, "silu", True, iters=2, chunk_tokens=10_000)
    b = admm_mlp(x, y, ws, bs, w2, b2, keep, "silu", True, iters=2, chunk_tokens=37)
    for wa, wb in zip(a.producers + [a.consumer], b.producers + [b.consumer]):
        torch.testing.assert_close(wa, wb, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("act,gated", [("relu", False), ("silu", True)])
def test_gradient_steps_option(act, gated):
    x, y, ws, bs, w2, b2 = make_problem(act, gated)
    keep = keep_half()
    res = admm_mlp(x, y, ws, bs, w2, b2, keep, act, gated, iters=3, sgd_steps=20)
    assert block_error(x, y, res, act, gated) <= one_shot_error(x, y, ws, bs, w2, b2, keep, act, gated) * (1 + 1e-9)


def _all_finite(res) -> bool:
    ts = [*res.producers, res.consumer, *(b for b in res.producer_biases if b is not None)]
    if res.consumer_bias is not None:
        ts.append(res.consumer_bias)
    return all(bool(torch.isfinite(t).all()) for t in ts)


@pytest.mark.parametrize("act,gated", COMBOS)
@pytest.mark.parametrize("case", ["dead_neurons", "constant_input", "tiny_t", "huge_scale", "zero_target"])
def test_no_nan_on_adversarial_inputs(act, gated, case):
    t = 8 if case == "tiny_t" else 64
    x, y, ws, bs, w2, b2 = make_problem(act, gated, t=t, bias=True)
    keep = keep_half()
    if case == "dead_neurons":
        for w in ws:
            w[keep[:6]] = 0.0
        for b in bs:
            b[keep[:6]] = 0.0 if act != "relu" else -1.0
        w2[:, keep[6:9]] = 0.0
    elif case == "constant_input":
        x = torch.ones_like(x) * 0.5
    elif case == "huge_scale":
        x, y = x * 1e4, y * 1e6
    elif case == "zero_target":
        y = torch.zeros_like(y)
    res = admm_mlp(x, y, ws, bs, w2, b2, keep, act, gated, iters=3, beta=10.0)
    assert _all_finite(res)
    assert all(math.isfinite(h["objective"]) or not h["accepted"] for h in res.history)
    e = block_error(x, y, res, act, gated)
    assert math.isfinite(e)
    assert e <= res.history[0]["objective"] * (1 + 1e-6) + 1e-9 * float((y.double() ** 2).mean())


def test_keep_nothing():
    x, y, ws, bs, w2, b2 = make_problem("relu", False)
    res = admm_mlp(x, y, ws, bs, w2, b2, torch.zeros(0, dtype=torch.long), "relu", False)
    assert res.producers[0].shape == (0, D_IN) and res.consumer.shape == (D_OUT, 0)
    assert _all_finite(res)


def test_invalid_arguments_name_the_value():
    x, y, ws, bs, w2, b2 = make_problem("relu", False)
    keep = keep_half()
    with pytest.raises(ValueError, match="act='tanh'"):
        admm_mlp(x, y, ws, bs, w2, b2, keep, "tanh", False)
    with pytest.raises(ValueError, match="keep indices"):
        admm_mlp(x, y, ws, bs, w2, b2, torch.tensor([0, D_FFN]), "relu", False)
    with pytest.raises(ValueError, match="beta"):
        admm_mlp(x, y, ws, bs, w2, b2, keep, "relu", False, beta=0.0)
    with pytest.raises(ValueError, match="producer"):
        admm_mlp(x, y, ws, bs, w2, b2, keep, "relu", True)
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        admm_mlp(bad, y, ws, bs, w2, b2, keep, "relu", False)
