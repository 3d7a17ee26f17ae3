"""Text sources and windows (PROTOCOL.md)."""

from __future__ import annotations

import json

import pytest
import torch

from structprune.data import calibration_windows, eval_windows, load_text, wiki_text


def test_wiki_splits_are_disjoint_and_follow_protocol():
    ev, cal = wiki_text("eval"), wiki_text("calib")
    ev_paras, cal_paras = set(ev.split("\n\n")), set(cal.split("\n\n"))
    assert len(ev) > 1_000_000 and len(cal) > 1_000_000
    # a few identical paragraphs may exist in the source, but the splits are different articles
    assert len(ev_paras & cal_paras) < 0.01 * len(ev_paras)


def test_text_and_jsonl_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    assert load_text(str(tmp_path / "a.txt")) == "hello world"
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": " one "}) + "\n" + json.dumps({"text": "two"}) + "\n")
    assert load_text(str(tmp_path / "b.jsonl")) == "one\n\ntwo"
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="'text' field"):
        load_text(str(tmp_path / "c.jsonl"))
    with pytest.raises(FileNotFoundError, match="neither a file nor a known name"):
        load_text(str(tmp_path / "missing.txt"))


def test_calibration_windows_deterministic_and_too_short_message():
    ids = torch.arange(1000)
    a = calibration_windows(ids, 4, 100, seed=0)
    b = calibration_windows(ids, 4, 100, seed=0)
    assert torch.equal(a, b) and a.shape == (4, 100)
    assert not torch.equal(a, calibration_windows(ids, 4, 100, seed=1))
    with pytest.raises(ValueError, match="needs at least 2049"):
        calibration_windows(ids, 4, 2048, seed=0)


def test_eval_windows_non_overlapping_from_start():
    ids = torch.arange(1000)
    w = eval_windows(ids, 100, 3)
    assert torch.equal(w[1], torch.arange(100, 200))
    with pytest.raises(ValueError, match="too short"):
        eval_windows(ids, 100, 11)


def test_offline_dataset_names_fail_with_alternatives():
    pytest.importorskip("datasets")
    with pytest.raises(RuntimeError, match="offline alternatives"):
        load_text("wikitext2")
