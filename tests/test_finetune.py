"""LoRA recovery (finetune.py): real PEFT adapters, trained, merged back into plain weights."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_WORDS, logits, save_tiny_folder, tiny_model, windows

import structprune as sp
from structprune.cli import main
from structprune.finetune import FinetuneConfig, lora_finetune, lora_targets
from structprune.io import PLAN_NAME


def _loss(model, ids):
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids, use_cache=False).loss)


def test_lora_lowers_the_training_loss_and_merges_to_the_same_shapes(family):
    model = sp.prune(tiny_model(family), sp.PruneConfig.from_flat(sparsity=0.3, device="cpu", nsamples=8),
                     calib_windows=windows(8), progress=False).model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = windows(2, seed=3)
    train = batch.repeat(6, 1)  # the same two windows every step: the loss on them must fall
    tuned, info = lora_finetune(model, train, FinetuneConfig(steps=6, rank=4, lr=1e-2, warmup=1), progress=False)
    assert not info["gave_up"] and info["steps_done"] == 6
    assert _loss(tuned, batch) < _loss(model, batch)
    assert {k: v.shape for k, v in tuned.state_dict().items()} == {k: v.shape for k, v in before.items()}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # input untouched
    assert not any("lora" in k for k in tuned.state_dict())  # merged: plain weights only
    assert all(torch.isfinite(v).all() for v in tuned.state_dict().values())


def test_targets_are_the_decoder_projections_only(family):
    model = tiny_model(family)
    names = lora_targets(model)
    assert names and all("embed" not in n and "lm_head" not in n and "wte" not in n for n in names)
    per_layer = len(names) / model.config.num_hidden_layers
    assert per_layer == int(per_layer) and per_layer >= 4  # every layer, attention and MLP


def test_non_finite_training_gives_the_input_back():
    model = tiny_model("llama")
    # an absurd learning rate blows the adapters up after the first step: the next loss is not finite
    tuned, info = lora_finetune(model, windows(8), FinetuneConfig(steps=4, lr=1e30, warmup=1, max_skips=0),
                                progress=False)
    assert info["gave_up"] and info["skipped"] == 1 and tuned is model
    assert all(torch.isfinite(v).all() for v in tuned.state_dict().values())


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="steps"):
        FinetuneConfig(steps=0)
    with pytest.raises(ValueError, match="lr"):
        FinetuneConfig(lr=0)
    with pytest.raises(ValueError, match="windows"):
        lora_finetune(tiny_model("llama"), windows(2), FinetuneConfig(steps=2, batch_size=2), progress=False)


def test_cli_finetune_writes_a_folder_transformers_reloads(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "tiny"
    save_tiny_folder(folder)
    g = torch.Generator().manual_seed(0)
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(TINY_WORDS[i] for i in torch.randint(0, 90, (3000,), generator=g).tolist()))
    pruned = tmp_path / "pruned"
    assert main(["prune", str(folder), "--sparsity", "0.3", "--calib", str(text), "--nsamples", "4",
                 "--seqlen", "32", "--out", str(pruned), "--device", "cpu", "--no-progress"]) == 0
    tuned = tmp_path / "tuned"
    assert main(["finetune", str(pruned), "--out", str(tuned), "--steps", "3", "--lora-batch-size", "2",
                 "--lora-seqlen", "32", "--lora-text", str(text), "--device", "cpu", "--no-progress"]) == 0
    assert "training loss" in capsys.readouterr().out
    plan = sp.PrunePlan.load(tuned / PLAN_NAME)
    assert plan.finetune["steps_done"] == 3 and plan.finetune["config"]["rank"] == 8
    # the default allocation gives per-layer shapes: the folder carries its modeling file (no structprune)
    reloaded = AutoModelForCausalLM.from_pretrained(tuned, trust_remote_code=True).eval()
    ours = sp.load_pruned(tuned)
    ids = windows(2, seed=5)
    assert torch.allclose(logits(reloaded, ids), logits(ours, ids), atol=1e-5)
    original = sp.load_pruned(pruned)
    assert not torch.allclose(logits(original, ids), logits(ours, ids))  # training changed the weights
    # not a pruned folder: a clear error, nothing written
    assert main(["finetune", str(folder), "--out", str(tmp_path / "x"), "--device", "cpu"]) == 2
    assert not (tmp_path / "x").exists()
