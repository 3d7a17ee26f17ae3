"""The quality harness (`structprune bench quality`), its resume rule, the report, the text sources."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_WORDS, save_tiny_folder

from structprune.bench import BenchSettings, load_results, render, run_quality
from structprune.cli import main
from structprune.data import _rst_prose, load_text


@pytest.fixture
def tiny_run(tmp_path):
    """A tiny Llama folder with a word-level tokenizer, a calibration text and two evaluation texts
    (different word distributions, standing in for two domains)."""
    words = TINY_WORDS
    save_tiny_folder(tmp_path / "tiny")
    g = torch.Generator().manual_seed(0)
    for name, hi in (("calib", 90), ("a", 90), ("b", 30)):
        text = " ".join(words[i] for i in torch.randint(0, hi, (1500,), generator=g).tolist())
        (tmp_path / f"{name}.txt").write_text(text)
    return tmp_path


def _argv(root, out, *extra):
    return ["bench", "quality", "--model", str(root / "tiny"), "--calib", str(root / "calib.txt"),
            "--texts", str(root / "a.txt"), str(root / "b.txt"), "--nsamples", "4", "--seqlen", "16",
            "--windows", "4", "--device", "cpu", "--out", str(out), *map(str, extra)]


def test_harness_resumes_without_recomputing(tiny_run, capsys):
    out = tiny_run / "res" / "q.json"
    # an interrupted run: stops after its first cell (as a killed run would, the JSON is already written)
    assert main(_argv(tiny_run, out, "--methods", "flap", "magnitude", "--sparsities", 0.2, 0.5,
                      "--max-cells", 1)) == 0
    first = load_results(out)
    assert list(first["cells"]) == ["flap@0.2"]
    cell = first["cells"]["flap@0.2"]
    assert abs(cell["actual"] - 0.2) < 0.03
    assert set(cell["perplexity_by_text"]) == {str(tiny_run / "a.txt"), str(tiny_run / "b.txt")}
    assert cell["memory"]["peak_rss_bytes"] > 0 and cell["time_ratio"] > 0
    assert (out.parent / "plans" / "flap@0.2.calib-calib-4x16.json.gz").is_file()  # named after its calibration
    assert main(_argv(tiny_run, out, "--methods", "flap", "magnitude", "--sparsities", 0.2, 0.5)) == 0
    done = load_results(out)
    assert set(done["cells"]) == {"flap@0.2", "flap@0.5", "magnitude@0.2", "magnitude@0.5"}
    assert done["cells"]["flap@0.2"] == cell  # untouched: not recomputed
    for c in done["cells"].values():
        assert abs(c["actual"] - c["requested"]) < 0.03
    capsys.readouterr()
    assert main(_argv(tiny_run, out, "--methods", "flap", "--sparsities", 0.2)) == 0
    assert "every cell is finished" in capsys.readouterr().out

    # the report renders from the saved JSON alone
    assert main(["report", str(out.parent)]) == 0
    md = (out.parent / "q.md").read_text()
    assert "flap" in md and "magnitude" in md and "b.txt" in md
    assert (out.parent / "q_perplexity.png").read_bytes()[:4] == b"\x89PNG"
    assert (out.parent / "q_layers.png").read_bytes()[:4] == b"\x89PNG"  # flap chooses per-layer shapes


def test_harness_scores_the_validation_windows_of_the_calibration_text(tiny_run):
    """`--texts validation`: the calibration text's validation windows (8 x seqlen, disjoint from every
    calibration draw) are scored like an evaluation text and labelled as such in the protocol."""
    out = tiny_run / "val.json"
    argv = _argv(tiny_run, out, "--methods", "random", "--sparsities", "0.2")
    argv[argv.index("--texts") + 1: argv.index("--texts") + 3] = ["validation", str(tiny_run / "a.txt")]
    assert main(argv) == 0
    res = load_results(out)
    dense = res["dense"]["perplexity_by_text"]
    assert set(dense) == {"validation", str(tiny_run / "a.txt")} and dense["validation"] != dense[str(tiny_run / "a.txt")]
    assert "validation windows" in res["protocol"]["eval_texts"]["validation"]
    cell = next(iter(res["cells"].values()))
    assert cell["perplexity_by_text"]["validation"] > 0


def test_harness_keeps_a_precomputed_partial_file(tiny_run):
    out = tiny_run / "partial.json"
    run_quality(BenchSettings(model=str(tiny_run / "tiny"), methods=("random",), sparsities=(0.3,), nsamples=4,
                              seqlen=16, windows=4, calib=str(tiny_run / "calib.txt"),
                              texts=(str(tiny_run / "a.txt"),), device="cpu"), out, echo=lambda _: None)
    data = json.loads(out.read_text())
    data["cells"]["random@0.3"]["perplexity"] = 123.0  # a marker: a recomputed cell would lose it
    out.write_text(json.dumps(data))
    settings = BenchSettings(model=str(tiny_run / "tiny"), methods=("random", "structprune"), sparsities=(0.3,),
                             nsamples=4, seqlen=16, windows=4, calib=str(tiny_run / "calib.txt"),
                             texts=(str(tiny_run / "a.txt"),), device="cpu")
    res = run_quality(settings, out, echo=lambda _: None)
    assert res["cells"]["random@0.3"]["perplexity"] == 123.0
    assert "structprune@0.3" in res["cells"]
    assert "random" in render(res) and "structprune" in render(res)
    other = BenchSettings(**{**settings.__dict__, "nsamples": 8})
    with pytest.raises(ValueError, match="another --out"):
        run_quality(other, out, echo=lambda _: None)


def test_harness_refuses_calibration_text_as_evaluation_text(tiny_run):
    calib = str(tiny_run / "calib.txt")
    with pytest.raises(ValueError, match="both the calibration and an evaluation text"):
        run_quality(BenchSettings(model=str(tiny_run / "tiny"), calib=calib, texts=(calib,)), tiny_run / "x.json")


def test_report_renders_a_file_written_before_memory_and_texts(tmp_path):
    """Older result files (wiki perplexity only, no memory, no KV counts) still render."""
    cell = {"method": "structprune", "requested": 0.3, "actual": 0.301, "perplexity": 40.0, "prune_seconds": 10.0,
            "time_ratio": 2.0, "kept": {"heads": [9, 6], "neurons": [1000, 900]}}
    run = {"cells": {"structprune@0.3": cell}, "dense": {"perplexity": 14.33, "shape": {
        "num_heads": 9, "num_kv_heads": 3, "intermediate_size": 1536}},
           "protocol": {"eval": "wiki eval split, first 64 x 512, float32"}}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(run))
    assert main(["report", str(path)]) == 0
    assert "40.00" in (tmp_path / "old.md").read_text()
    assert (tmp_path / "old_layers.png").is_file() and (tmp_path / "old_perplexity.png").is_file()


def test_report_missing_path_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_rst_prose_keeps_paragraphs_and_drops_code_and_directives():
    rst = ("Title\n=====\n\nSome prose that\nwraps.\n\n.. note::\n\n   A note.\n\n::\n\n    code = 1\n\n"
           ">>> 1 + 1\n2\n\nMore prose.\n")
    assert _rst_prose(rst) == ["Title", "Some prose that wraps.", "More prose."]


def test_pydoc_missing_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("STRUCTPRUNE_PYDOC_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="apt-get install python3.11-doc"):
        load_text("pydoc", "eval")


def test_pydoc_splits_are_disjoint(tmp_path, monkeypatch):
    for i in range(4):
        (tmp_path / "tutorial").mkdir(exist_ok=True)
        (tmp_path / "tutorial" / f"f{i}.rst.txt").write_text(f"Document number {i} prose.\n")
    monkeypatch.setenv("STRUCTPRUNE_PYDOC_DIR", str(tmp_path))
    ev, cal = load_text("pydoc", "eval"), load_text("pydoc", "calib")
    assert "number 0" in ev and "number 2" in ev and "number 1" in cal and "number 3" in cal
    assert not set(ev.split("\n\n")) & set(cal.split("\n\n"))


def test_plans_of_runs_with_other_calibration_do_not_overwrite_each_other(tiny_run):
    plans = tiny_run / "res2" / "plans"
    for n, name in ((4, "a.json"), (2, "b.json")):
        assert main(_argv(tiny_run, tiny_run / "res2" / name, "--methods", "magnitude", "--sparsities", 0.3)
                    + ["--nsamples", str(n)]) == 0
    assert sorted(p.name for p in plans.iterdir()) == ["magnitude@0.3.calib-calib-2x16.json.gz",
                                                      "magnitude@0.3.calib-calib-4x16.json.gz"]
    assert BenchSettings().plan_name("flap@0.2") == "flap@0.2.json.gz"  # the harness default keeps the plain name
