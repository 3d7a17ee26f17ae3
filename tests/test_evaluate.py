"""Perplexity (evaluate.py): exp(mean next-token NLL) over the windows, in float32, any batch size."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model, windows

from structprune.evaluate import perplexity


def _by_hand(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].double(), dim=-1)
    nll = -logp.gather(-1, ids[:, 1:, None]).sum()
    return math.exp(float(nll) / ids[:, 1:].numel())


def test_perplexity_is_exp_mean_next_token_nll(family):
    model = tiny_model(family)
    ids = windows(5, 16)
    assert perplexity(model, ids, progress=False) == pytest.approx(_by_hand(model, ids), rel=1e-5)


def test_batch_size_does_not_change_the_result():
    model = tiny_model("llama")
    ids = windows(5, 16)
    one = perplexity(model, ids, batch_size=1, progress=False)
    assert perplexity(model, ids, batch_size=4, progress=False) == pytest.approx(one, rel=1e-6)


def test_a_model_that_knows_nothing_scores_the_vocabulary_size():
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight.zero_()  # uniform next-token distribution
    vocab = model.config.vocab_size
    assert perplexity(model, windows(2, 16), progress=False) == pytest.approx(vocab, rel=1e-5)


def test_model_stays_where_it_was_and_in_its_mode():
    model = tiny_model("llama").train()
    perplexity(model, windows(2, 16), device="cpu", progress=False)
    assert next(model.parameters()).device.type == "cpu"
    assert model.training  # calibration_mode restores train mode
