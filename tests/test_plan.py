"""The pruning plan as data (plan.py): JSON and .json.gz round trips, the compact form without
scores, version check, replay onto a dense model."""

from __future__ import annotations

import copy
import gzip
import json

import pytest
from conftest import tiny_model, windows

import structprune as sp
from structprune.arch import get_adapter
from structprune.plan import PLAN_VERSION, PrunePlan, apply_plan


@pytest.fixture(scope="module")
def pruned():
    model = tiny_model("llama")
    cfg = sp.PruneConfig.from_flat(sparsity=0.3, nsamples=4, seqlen=16, device="cpu")
    return model, sp.prune(copy.deepcopy(model), cfg, calib_windows=windows(4, 16), progress=False)


@pytest.mark.parametrize("name", ["plan.json", "plan.json.gz"])
def test_round_trip_keeps_every_field(pruned, tmp_path, name):
    plan = pruned[1].plan
    plan.save(tmp_path / name)
    again = PrunePlan.load(tmp_path / name)
    assert again == plan
    assert again.to_dict() == plan.to_dict()
    assert json.loads(json.dumps(plan.to_dict())) == plan.to_dict()  # JSON-serialisable as it is


def test_gz_is_gzip_and_byte_stable(pruned, tmp_path):
    plan = pruned[1].plan
    plan.save(tmp_path / "a.json.gz")
    plan.save(tmp_path / "b.json.gz")
    raw = (tmp_path / "a.json.gz").read_bytes()
    assert raw == (tmp_path / "b.json.gz").read_bytes()  # mtime 0: the same plan, the same bytes
    assert json.loads(gzip.decompress(raw))["actual_sparsity"] == plan.actual_sparsity


def test_compact_plan_drops_scores_and_still_replays(pruned, tmp_path):
    dense, res = pruned
    res.plan.save(tmp_path / "c.json.gz", scores=False)
    compact = PrunePlan.load(tmp_path / "c.json.gz")
    assert all(lp.head_scores == [] and lp.neuron_scores == [] for lp in compact.layers)
    assert any(lp.neuron_scores for lp in res.plan.layers)  # the full plan had them
    for full, small in zip(res.plan.layers, compact.layers):  # what a replay needs is kept
        assert (small.kept_heads, small.kept_kv_heads, small.kept_neurons) == \
            (full.kept_heads, full.kept_kv_heads, full.kept_neurons)
        assert (small.attn_keep_target, small.mlp_keep_target) == (full.attn_keep_target, full.mlp_keep_target)
    assert compact.actual_sparsity == res.plan.actual_sparsity
    replay = copy.deepcopy(dense)
    ad = get_adapter(replay.config)
    apply_plan(replay, ad, compact)
    assert [ad.layer_shape(layer) for layer in ad.decoder_layers(replay)] == \
        [ad.layer_shape(layer) for layer in ad.decoder_layers(res.model)] == compact.shapes()


def test_newer_version_is_refused_naming_it(pruned):
    data = pruned[1].plan.to_dict()
    data["version"] = PLAN_VERSION + 1
    with pytest.raises(ValueError, match=f"plan version {PLAN_VERSION + 1} is newer"):
        PrunePlan.from_dict(data)


def test_replay_onto_a_model_with_other_depth_is_refused(pruned):
    dense, res = pruned
    short = PrunePlan.from_dict({**res.plan.to_dict(), "layers": [res.plan.layers[0].__dict__]})
    with pytest.raises(ValueError, match="plan has 1 layers but the model has"):
        apply_plan(copy.deepcopy(dense), get_adapter(dense.config), short)
