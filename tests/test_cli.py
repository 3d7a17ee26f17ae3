"""CLI: clear errors (non-zero exit, nothing written) and a working prune -> info -> eval loop."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_WORDS, save_tiny_folder

from structprune.cli import main


@pytest.fixture
def tiny_folder(tmp_path):
    """A tiny Llama checkpoint with a real tokenizer-free setup: a word-level tokenizer file."""
    words = TINY_WORDS
    folder = tmp_path / "tiny"
    save_tiny_folder(folder)
    g = torch.Generator().manual_seed(0)
    text = " ".join(words[i] for i in torch.randint(0, 90, (3000,), generator=g).tolist())
    (tmp_path / "calib.txt").write_text(text)
    return folder


def _run(capsys, *argv):
    code = main(list(map(str, argv)))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_prune_info_eval_round_trip(tiny_folder, tmp_path, capsys):
    calib = tmp_path / "calib.txt"
    out = tmp_path / "out"
    code, stdout, _ = _run(capsys, "prune", tiny_folder, "--sparsity", 0.3, "--out", out, "--calib", calib,
                           "--nsamples", 8, "--seqlen", 32, "--device", "cpu", "--no-progress", "--eval",
                           "--data", calib, "--eval-seqlen", 32, "--windows", 4)
    assert code == 0, stdout
    assert "sparsity" in stdout and "perplexity" in stdout
    code, stdout, _ = _run(capsys, "info", out)
    assert code == 0 and "neurons" in stdout
    code, stdout, _ = _run(capsys, "info", out, "--json")
    assert abs(json.loads(stdout)["actual_sparsity"] - 0.3) < 0.03
    code, stdout, _ = _run(capsys, "eval", out, "--data", calib, "--seqlen", 32, "--windows", 4, "--no-progress")
    assert code == 0 and "perplexity" in stdout


@pytest.mark.parametrize("case,args,message", [
    ("missing model", ["prune", "/nonexistent/model", "--out", "{out}"], "does not exist"),
    ("bad sparsity", ["prune", "{model}", "--sparsity", "0.97", "--out", "{out}"], "sparsity=0.97"),
    ("negative sparsity", ["prune", "{model}", "--sparsity", "-0.1", "--out", "{out}"], "sparsity=-0.1"),
    ("busy output", ["prune", "{model}", "--out", "{busy}"], "not empty"),
    ("short calibration", ["prune", "{model}", "--out", "{out}", "--calib", "{calib}", "--nsamples", "200",
                           "--seqlen", "32"], "needs at least 6400"),
    ("missing device", ["prune", "{model}", "--out", "{out}", "--device", "cuda:7"], "not available"),
])
def test_bad_input_clear_error_nothing_written(tiny_folder, tmp_path, capsys, case, args, message):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    subs = {"{model}": str(tiny_folder), "{out}": str(tmp_path / "new_out"), "{busy}": str(busy),
            "{calib}": str(tmp_path / "calib.txt")}
    argv = [subs.get(a, a) for a in args] + ["--no-progress", "--calib", subs["{calib}"]] * (
        "--calib" not in args)
    code, _, err = _run(capsys, *argv)
    assert code == 2, case
    assert message in err, err
    assert not (tmp_path / "new_out").exists()
    assert [p.name for p in busy.iterdir()] == ["x"]


def test_unsupported_architecture(tmp_path, capsys):
    from transformers import BertConfig

    folder = tmp_path / "bert"
    BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=32).save_pretrained(folder)
    code, _, err = _run(capsys, "prune", folder, "--out", tmp_path / "o", "--no-progress")
    assert code == 2
    assert "unsupported architecture model_type='bert'" in err and "llama" in err
    assert not (tmp_path / "o").exists()


def test_global_method_from_cli(tiny_folder, tmp_path, capsys):
    out = tmp_path / "g"
    code, stdout, _ = _run(capsys, "prune", tiny_folder, "--method", "global", "--sparsity", 0.3, "--out", out,
                           "--calib", tmp_path / "calib.txt", "--nsamples", 4, "--seqlen", 32, "--device", "cpu",
                           "--no-progress")
    assert code == 0, stdout
    assert json.loads((out / "structprune_plan.json").read_text())["allocation"]["rule"] == "global-taylor"


def test_chunk_tokens_option_reaches_the_run(tiny_folder, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, _ = _run(capsys, "prune", tiny_folder, "--sparsity", 0.3, "--out", out, "--calib",
                           tmp_path / "calib.txt", "--nsamples", 8, "--seqlen", 32, "--batch-size", 8,
                           "--chunk-tokens", 64, "--device", "cpu", "--no-progress")
    assert code == 0, stdout
    code, stdout, _ = _run(capsys, "info", out, "--json")
    assert json.loads(stdout)["config"]["chunk_tokens"] == 64


def test_modules_and_selection_options_reach_the_run(tiny_folder, tmp_path, capsys):
    """--modules mlp keeps every head; --selection obs is recorded in the plan."""
    out = tmp_path / "out"
    code, stdout, _ = _run(capsys, "prune", tiny_folder, "--sparsity", 0.2, "--out", out, "--calib",
                           tmp_path / "calib.txt", "--nsamples", 4, "--seqlen", 32, "--modules", "mlp",
                           "--selection", "obs", "--allocation", "softmax", "--temperature", "1x", "--device", "cpu",
                           "--no-progress")
    assert code == 0, stdout
    plan = json.loads((out / "structprune_plan.json").read_text())
    assert plan["config"]["selection"] == "obs" and plan["config"]["prune_attention"] is False
    assert all(len(lp["kept_heads"]) == lp["dense_shape"]["num_heads"] for lp in plan["layers"])
    assert abs(plan["actual_sparsity"] - 0.2) < 0.02
