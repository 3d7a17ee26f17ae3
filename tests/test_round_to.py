"""--round-to N: kept FFN neurons per layer a multiple of N, the actual sparsity still met."""

from __future__ import annotations

import pytest
import torch
from conftest import windows
from transformers import AutoModelForCausalLM, LlamaConfig

import structprune as sp
from structprune.selection import neuron_count


def test_neuron_count_multiples():
    assert neuron_count(100 * 3, 3, 256) == 100  # no rounding by default
    assert neuron_count(100 * 3, 3, 256, multiple=32) == 96
    assert neuron_count(113 * 3, 3, 256, multiple=32) == 128
    assert neuron_count(5 * 3, 3, 256, multiple=32) == 32  # at least one multiple
    assert neuron_count(250 * 3, 3, 256, multiple=32) == 256  # the dense width is nearer than 224
    assert neuron_count(40 * 3, 3, 48, multiple=32) == 48  # ties go to keeping everything


def _model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=256, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 1.2 / p.shape[-1] ** 0.5)
    return model


@pytest.mark.parametrize("sparsity", [0.2, 0.35])
@pytest.mark.parametrize("allocation", ["uniform", "softmax"])
def test_round_to_keeps_multiples_and_meets_sparsity(sparsity, allocation):
    """Every layer keeps a multiple of 32 neurons (or all); rounding is carried over layers, so the actual
    sparsity stays within a point of the unrounded run (rounding every layer the same way would miss it)."""
    kw = dict(sparsity=sparsity, nsamples=8, seqlen=24, batch_size=4, device="cpu", allocation=allocation,
              temperature="1x")
    plain = sp.prune(_model(), sp.PruneConfig.from_flat(**kw), calib_windows=windows(8), progress=False)
    rounded = sp.prune(_model(), sp.PruneConfig.from_flat(**kw, round_to=32), calib_windows=windows(8), progress=False)
    kept = [len(lp.kept_neurons) for lp in rounded.plan.layers]
    assert all(k % 32 == 0 or k == 256 for k in kept), kept
    assert [len(lp.kept_heads) for lp in rounded.plan.layers] == [len(lp.kept_heads) for lp in plain.plan.layers]
    assert abs(rounded.plan.actual_sparsity - plain.plan.actual_sparsity) < 0.01
    assert abs(rounded.plan.actual_sparsity - sparsity) < 0.01


def test_round_to_validation_and_cli():
    from structprune.cli import build_parser
    from structprune.cli_options import config_from_args as _config

    with pytest.raises(ValueError, match="round_to"):
        sp.PruneConfig.from_flat(round_to=0)
    with pytest.raises(ValueError, match="round_to"):
        sp.PruneConfig.from_flat(round_to=64, scope="global", reconstruction="none")
    args = build_parser().parse_args(["prune", "m", "--round-to", "64"])
    assert _config(args).round_to == 64
    assert _config(build_parser().parse_args(["prune", "m"])).round_to == 1


def test_resumed_run_carries_the_rounding_of_finished_layers(tmp_path):
    """An interrupted --round-to run resumes to the same shapes: the replayed layers' rounding is carried."""
    from test_io_checkpoint import _interrupting, _Interrupted

    from structprune.io import ShardWriter

    cfg = sp.PruneConfig.from_flat(sparsity=0.35, nsamples=8, seqlen=24, batch_size=4, device="cpu", round_to=32)
    ref = sp.prune(_model(), cfg, calib_windows=windows(8), progress=False)
    assert len({len(lp.kept_neurons) for lp in ref.plan.layers}) > 1  # the carry changes shapes over depth
    sink = _interrupting(ShardWriter(tmp_path / "m"), after=3)
    with pytest.raises(_Interrupted):
        sp.prune(_model(), cfg, calib_windows=windows(8), progress=False, sink=sink)
    sink.abort()
    res = sp.prune(_model(), cfg, calib_windows=windows(8), progress=False, sink=ShardWriter(tmp_path / "m", resume=True))
    assert [len(lp.kept_neurons) for lp in res.plan.layers] == [len(lp.kept_neurons) for lp in ref.plan.layers]
