"""structprune bench speed: dense vs pruned timings on tiny folders (structure and work ratios, never times)."""

from __future__ import annotations

import json

import torch
from conftest import save_tiny_folder, windows

import structprune as sp
from structprune.cli import main
from structprune.io import save_pruned
from structprune.speed import matmul_weights


def test_bench_speed_cli_on_a_per_layer_folder(tmp_path):
    dense_dir = tmp_path / "dense"
    save_tiny_folder(dense_dir)
    from structprune.io.resolve import load_model

    dense, tok = load_model(str(dense_dir))
    cfg = sp.PruneConfig.from_flat(sparsity=0.4, nsamples=8, seqlen=24, batch_size=4, device="cpu", allocation="softmax")
    res = sp.prune(dense, cfg, calib_windows=windows(8), progress=False)
    assert not res.model.config.structprune["vanilla"]
    pruned_dir = save_pruned(res.model, res.plan, tmp_path / "pruned", tokenizer=tok)
    out = tmp_path / "speed.json"
    assert main(["bench", "speed", str(pruned_dir), "--dense", str(dense_dir), "--batch", "1", "2",
                 "--devices", "cpu", "--seqlen", "16", "--prompt-len", "4", "--new-tokens", "3", "--repeats", "2",
                 "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert [(run["device"], run["batch"]) for run in r["runs"]] == [("cpu", 1), ("cpu", 2)]
    # the work ratio is counted from the real modules: the pruned model's Linear weights over the dense one's
    assert r["matmul_weights"] == {"dense": matmul_weights(dense), "pruned": matmul_weights(res.model)}
    assert r["matmul_flops_ratio"] < 1.0
    assert abs(r["decoder_linear_kept"] - (1 - res.plan.actual_sparsity)) < 1e-9
    for run in r["runs"]:
        for name in ("dense", "pruned"):
            assert len(run[name]["prefill_s"]) == 2 and run[name]["decode_tokens_per_s"] > 0
        assert run["prefill_ratio"] > 0 and run["decode_ratio"] > 0


def test_matmul_weights_counts_linear_and_head_not_embeddings():
    from conftest import tiny_model

    model = tiny_model("gpt2")  # Conv1D layers, tied head
    c = model.config
    per_layer = 3 * c.n_embd * c.n_embd + c.n_embd * c.n_embd + 2 * c.n_embd * c.n_inner
    assert matmul_weights(model) == c.n_layer * per_layer + c.vocab_size * c.n_embd
    assert torch.equal(model.lm_head.weight, model.transformer.wte.weight)
