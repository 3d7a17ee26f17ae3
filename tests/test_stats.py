"""Calibration statistics: Gram sums and per-column statistics against direct products."""

from __future__ import annotations

import pytest
import torch

from structprune.stats import GramAccumulator


def _inputs(seed: int, n: int = 12, tokens: int = 400) -> tuple[torch.Tensor, torch.Tensor]:
    """(dense-stream inputs, pruned-stream inputs) [tokens, n], float64."""
    g = torch.Generator().manual_seed(seed)
    xd = torch.randn(tokens, n, generator=g, dtype=torch.float64) + 0.5
    return xd, xd + 0.1 * torch.randn(tokens, n, generator=g, dtype=torch.float64)


def _augment(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)


def test_single_stream_keeps_one_matrix_and_splits_exactly_when_a_dense_stream_arrives():
    xd, xp = _inputs(3)
    acc = GramAccumulator(12)
    acc.add_batch(xp[:200])
    assert acc.single_stream and acc.cross is acc.gram and acc.gram_d is acc.gram
    acc.add_batch(xp[200:], xd[200:])  # the streams part after the first batch
    assert not acc.single_stream and acc.cross is not acc.gram and acc.gram_d is not acc.gram
    acc.add_batch(xp[:50])  # single-stream batch after the split: its dense input is x_p
    p, d = _augment(torch.cat([xp, xp[:50]])), _augment(torch.cat([xp[:200], xd[200:], xp[:50]]))
    for got, ref in ((acc.gram, p.T @ p), (acc.cross, d.T @ p), (acc.gram_d, d.T @ d)):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(acc.gram, acc.gram.T, rtol=0, atol=0)  # mirrored blocks: exactly symmetric


def test_blocked_accumulation_equals_one_product():
    _, xp = _inputs(4, n=40, tokens=300)
    small, big = GramAccumulator(40), GramAccumulator(40)
    small.block_elems = 41 * 3  # three rows per block, and a ragged last block
    small.add_batch(xp)
    big.add_batch(xp)
    torch.testing.assert_close(small.gram, big.gram, rtol=1e-6, atol=1e-4)


def test_gram_dtype_follows_size(monkeypatch):
    assert GramAccumulator(100).dtype == torch.float64
    monkeypatch.setattr(GramAccumulator, "float64_max_bytes", 8 * 50 * 50)
    assert GramAccumulator(49).gram.dtype == torch.float64 and GramAccumulator(50).gram.dtype == torch.float32
    assert GramAccumulator(50, dtype=torch.float64).gram.dtype == torch.float64
    with pytest.raises(ValueError, match="dtype"):
        GramAccumulator(8, dtype=torch.float16)


def test_column_statistics_equal_direct_ones():
    """input_norm, input_mean and input_var (what the scorers read) from the running sums."""
    _, xp = _inputs(5)
    for full in (True, False):
        acc = GramAccumulator(12, full=full)
        for chunk in xp.split(150):
            acc.add_batch(chunk)
        assert acc.count == 400
        torch.testing.assert_close(acc.input_norm, xp.norm(dim=0).float())
        torch.testing.assert_close(acc.input_mean, xp.mean(0).float().double(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(acc.input_var, xp.var(0, unbiased=False).float().double(), rtol=1e-5, atol=1e-6)
        assert acc.gram.numel() == (13 * 13 if full else 0)


def test_released_sums_refuse_more_batches_but_keep_scores():
    _, xp = _inputs(6)
    acc = GramAccumulator(12)
    acc.add_batch(xp)
    norm = acc.input_norm.clone()
    acc.release()
    assert acc.released and acc.gram.numel() == 0
    torch.testing.assert_close(acc.input_norm, norm)
    with pytest.raises(RuntimeError, match="released"):
        acc.check_live()
    with pytest.raises(RuntimeError, match="released"):
        acc.add_batch(xp)
