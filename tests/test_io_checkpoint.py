"""Save -> load round trips, vanilla reload, atomic writes."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import logits, tiny_model, windows
from transformers import AutoModelForCausalLM

import structprune as sp
from structprune.io import PLAN_NAME, save_pruned


def _pruned(family: str, sparsity: float = 0.3):
    model = tiny_model(family)
    cfg = sp.PruneConfig.from_flat(sparsity=sparsity, nsamples=8, seqlen=24, batch_size=4, device="cpu")
    return sp.prune(model, cfg, calib_windows=windows(8), progress=False)


def test_save_load_identical_logits(family, tmp_path):
    res = _pruned(family)
    out = save_pruned(res.model, res.plan, tmp_path / "m")
    loaded = sp.load_pruned(out)
    ids = windows(2)
    torch.testing.assert_close(logits(loaded, ids), logits(res.model, ids))
    plan = json.loads((out / PLAN_NAME).read_text())
    assert len(plan["layers"]) == 3 and abs(plan["actual_sparsity"] - res.plan.actual_sparsity) < 1e-12


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text", "opt", "gpt2"])
def test_uniform_shapes_reload_with_plain_transformers(family, tmp_path):
    """MLP-only pruning gives uniform shapes -> a vanilla checkpoint for every family."""
    model = tiny_model(family)
    cfg = sp.PruneConfig.from_flat(sparsity=0.25, nsamples=8, seqlen=24, device="cpu", prune_attention=False,
                                   allocation="uniform")
    res = sp.prune(model, cfg, calib_windows=windows(8), progress=False)
    assert res.model.config.structprune["vanilla"]
    out = save_pruned(res.model, res.plan, tmp_path / "m")
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = windows(2)
    torch.testing.assert_close(logits(plain, ids), logits(res.model, ids))


def test_refuses_non_empty_output_and_overwrite_replaces(tmp_path):
    res = _pruned("llama")
    target = tmp_path / "m"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not empty.*--overwrite"):
        save_pruned(res.model, res.plan, target)
    assert (target / "keep.txt").read_text() == "precious"
    save_pruned(res.model, res.plan, target, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / PLAN_NAME).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary folders left behind


def test_allocation_plot_written_beside_model(tmp_path):
    res = _pruned("llama")
    out = save_pruned(res.model, res.plan, tmp_path / "m")
    png = (out / "allocation.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000


def test_shard_writer_layer_by_layer_reloads(family, tmp_path):
    """Layers written as they finish (then freed) make a sharded checkpoint that reloads exactly."""
    from structprune.io import INDEX_NAME, ShardWriter
    from structprune.runtime.source import layers_prefix

    model = tiny_model(family)
    cfg = sp.PruneConfig.from_flat(sparsity=0.3, nsamples=8, seqlen=24, batch_size=4, device="cpu")
    ref = sp.prune(model, cfg, calib_windows=windows(8), progress=False)
    sink = ShardWriter(tmp_path / "s", release=True)
    res = sp.prune(model, cfg, calib_windows=windows(8), progress=False, sink=sink)
    assert sink.layers_written == [0, 1, 2]
    assert all(p.is_meta for n, p in res.model.named_parameters() if ".0." in n or ".1." in n)  # freed
    assert all(p.is_meta for p in res.model.get_input_embeddings().parameters())  # written after allocation, freed
    assert res.plan.actual_sparsity == ref.plan.actual_sparsity
    out = sink.finish(res.model, res.plan, layers_prefix(res.model))
    assert (out / INDEX_NAME).is_file() and len(list(out.glob("model-layer-*.safetensors"))) == 3
    ids = windows(2)
    torch.testing.assert_close(logits(sp.load_pruned(out), ids), logits(ref.model, ids))
    if res.model.config.structprune["vanilla"]:
        plain = AutoModelForCausalLM.from_pretrained(out).eval()
        torch.testing.assert_close(logits(plain, ids), logits(ref.model, ids))


def test_shard_writer_abort_leaves_nothing(tmp_path):
    from structprune.io import ShardWriter

    sink = ShardWriter(tmp_path / "s")
    sink.abort()
    assert list(tmp_path.iterdir()) == []


class _Interrupted(Exception):
    pass


def _interrupting(sink, after: int):
    """Make `sink` stop the run (as Ctrl-C or a lost machine would) once `after` layers are on disk."""
    write = sink.write_layer

    def write_layer(index, prefix, layer):
        if len(sink.layers_written) == after:
            raise _Interrupted
        write(index, prefix, layer)

    sink.write_layer = write_layer
    return sink


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("options", [{}, {"target": "dense", "scorer": "random"}])
def test_interrupted_run_resumes_to_the_same_model(family, options, tmp_path):
    """A run stopped after two layers continues from its shards and ends with exactly the model
    an uninterrupted run writes; the finished layers are not pruned again."""
    from structprune.io import ShardWriter, partial_dir
    from structprune.runtime.source import layers_prefix

    model = tiny_model(family)
    cfg = sp.PruneConfig.from_flat(sparsity=0.3, nsamples=8, seqlen=24, batch_size=4, device="cpu", **options)
    ref = sp.prune(model, cfg, calib_windows=windows(8), progress=False)
    out = tmp_path / "m"
    sink = _interrupting(ShardWriter(out), after=2)
    with pytest.raises(_Interrupted):
        sp.prune(model, cfg, calib_windows=windows(8), progress=False, sink=sink)
    sink.abort()  # what the CLI does on any exception: finished layers stay
    assert sorted(p.name for p in partial_dir(out).glob("model-layer-*")) == [
        "model-layer-00000.safetensors", "model-layer-00001.safetensors"]
    with pytest.raises(FileExistsError, match="--resume"):
        ShardWriter(out)
    sink = ShardWriter(out, resume=True)
    res = sp.prune(model, cfg, calib_windows=windows(8), progress=False, sink=sink)
    assert sink.layers_written == [0, 1, 2]
    assert [lp.kept_neurons for lp in res.plan.layers] == [lp.kept_neurons for lp in ref.plan.layers]
    sink.finish(res.model, res.plan, layers_prefix(res.model))
    assert not partial_dir(out).exists()
    ids = windows(2)
    torch.testing.assert_close(logits(sp.load_pruned(out), ids), logits(ref.model, ids))


def test_resume_with_another_configuration_starts_over(tmp_path):
    from structprune.io import ShardWriter
    from structprune.runtime.source import layers_prefix

    model = tiny_model("llama")
    cfg = sp.PruneConfig.from_flat(sparsity=0.3, nsamples=8, seqlen=24, batch_size=4, device="cpu")
    sink = _interrupting(ShardWriter(tmp_path / "m"), after=1)
    with pytest.raises(_Interrupted):
        sp.prune(model, cfg, calib_windows=windows(8), progress=False, sink=sink)
    sink.abort()
    other = cfg.replace(sparsity=0.5)
    ref = sp.prune(model, other, calib_windows=windows(8), progress=False)
    sink = ShardWriter(tmp_path / "m", resume=True)
    res = sp.prune(model, other, calib_windows=windows(8), progress=False, sink=sink)
    out = sink.finish(res.model, res.plan, layers_prefix(res.model))
    assert res.plan.actual_sparsity == ref.plan.actual_sparsity
    torch.testing.assert_close(logits(sp.load_pruned(out), windows(2)), logits(ref.model, windows(2)))
