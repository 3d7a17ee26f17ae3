"""sensitivity/candidates.py: the removed fractions measured per module, and the candidate layers
(one module's lowest-scoring units masked out, the rest of the layer dense)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from structprune.arch import get_adapter
from structprune.planning import LayerScores
from structprune.sensitivity.candidates import candidate, fractions, steps
from structprune.stats import GramAccumulator
from structprune.surgery import get_weight


def test_fractions_are_multiples_of_the_sparsity_capped_and_unique():
    assert steps(1.5) == [0.5, 1.0, 1.5] and steps(2.0) == [0.5, 1.0, 1.5, 2.0] and steps(1.2) == [0.5, 1.0, 1.2]
    assert fractions(0.2, 0.9) == pytest.approx([0.1, 0.2, 0.3])
    assert fractions(0.2, 0.9, max_step=2.0) == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert fractions(0.3, 0.5, max_step=2.0) == pytest.approx([0.15, 0.3, 0.45, 0.5])
    assert fractions(0.4, 0.4) == pytest.approx([0.2, 0.4])
    assert fractions(0.0, 0.9) == []


@pytest.mark.parametrize("kind", ["attn", "mlp"])
def test_a_candidate_masks_the_lowest_scoring_units_of_one_module_only(kind):
    model = tiny_model("llama")
    ad = get_adapter(model.config)
    layer = ad.decoder_layers(model)[0]
    n_heads, n_neurons, hd = model.config.num_attention_heads, model.config.intermediate_size, ad.head_dim
    scores = LayerScores(heads=torch.arange(n_heads, dtype=torch.float32),
                         neurons=torch.arange(n_neurons, dtype=torch.float32))
    n = n_heads * hd if kind == "attn" else n_neurons
    cand = candidate(ad, layer, kind, scores, 0.5, GramAccumulator(n), damp=0.01, refit=False)
    o, down = get_weight(ad.o_proj(cand)), get_weight(ad.down_proj(cand))
    zero_cols = (o if kind == "attn" else down).abs().sum(0) == 0
    if kind == "attn":  # the two lowest-scoring query heads (here KV group 0, whole)
        assert zero_cols.reshape(n_heads, hd).all(1).tolist() == [True, True, False, False]
        assert torch.equal(down, get_weight(ad.down_proj(layer)))
    else:
        assert zero_cols.tolist() == [True] * (n_neurons // 2) + [False] * (n_neurons // 2)
        assert torch.equal(o, get_weight(ad.o_proj(layer)))
    kept = ~zero_cols
    dense = get_weight(ad.o_proj(layer) if kind == "attn" else ad.down_proj(layer))
    assert torch.equal((o if kind == "attn" else down)[:, kept], dense[:, kept])  # no re-fit: kept columns untouched


def test_max_step_is_validated_and_reaches_the_config():
    import structprune as sp
    from structprune.cli import build_parser
    from structprune.cli_options import config_from_args

    with pytest.raises(ValueError, match="sensitivity_max_step"):
        sp.PruneConfig.from_flat(sensitivity_max_step=0.2)
    args = build_parser().parse_args(["prune", "m", "--sensitivity-max-step", "2", "--out", "x"])
    assert config_from_args(args).allocation.sensitivity_max_step == 2.0
    assert sp.PruneConfig().allocation.sensitivity_max_step == 1.5
