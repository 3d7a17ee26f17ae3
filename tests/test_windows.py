"""Calibration and held-back windows: one draw, disjoint by construction, the same for every method."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_WORDS

from structprune.api import calibration_data
from structprune.data import held_back_count, split_windows, validation_windows
from structprune.methods import PRESETS, method_config
from structprune.plan import PrunePlan
from structprune.planning import needs_holdout


def test_held_back_windows_never_share_a_token_with_calibration_windows():
    """Token ids equal to their positions: a shared id is a shared position."""
    ids = torch.arange(128 * 40 + 17)
    for nsamples in range(1, 129):
        for needs in (False, True):
            h = held_back_count(nsamples, needs)
            calib, held = split_windows(ids, nsamples, 40, seed=nsamples, n_holdout=h)
            assert calib.shape == (nsamples - h, 40)
            assert (held is None) == (h == 0)
            used = calib.flatten().tolist() + ([] if held is None else held.flatten().tolist())
            assert len(used) == len(set(used)) == nsamples * 40, nsamples  # no position twice
            assert all(torch.equal(w, torch.arange(int(w[0]), int(w[0]) + 40)) for w in calib)  # contiguous text
            if held is not None:
                assert not set(calib.flatten().tolist()) & set(held.flatten().tolist())


def test_validation_windows_share_no_token_with_any_calibration_draw_and_ignore_nsamples():
    """Token ids equal to their positions: the validation windows (the permutation's last slots) are
    the same for every nsamples and never meet a calibration or held-back window of the same seed."""
    ids = torch.arange(100 * 40 + 17)
    val = validation_windows(ids, 40, seed=5, nsamples=92)
    assert val.shape == (8, 40)
    assert all(torch.equal(w, torch.arange(int(w[0]), int(w[0]) + 40)) for w in val)  # contiguous text
    for nsamples in range(1, 93):
        assert torch.equal(validation_windows(ids, 40, seed=5, nsamples=nsamples), val)
        calib, held = split_windows(ids, nsamples, 40, seed=5, n_holdout=held_back_count(nsamples, True))
        used = set(calib.flatten().tolist()) | (set() if held is None else set(held.flatten().tolist()))
        assert not used & set(val.flatten().tolist()), nsamples
    assert not torch.equal(validation_windows(ids, 40, seed=6, nsamples=8), val)  # seeded


def test_validation_windows_refuse_a_text_too_short_for_both():
    ids = torch.arange(100 * 40)
    validation_windows(ids, 40, seed=0, nsamples=92)
    with pytest.raises(ValueError, match=r"too short for 93 calibration and 8 validation windows"):
        validation_windows(ids, 40, seed=0, nsamples=93)


def test_held_back_count_comes_from_the_budget():
    assert [held_back_count(n, False) for n in (1, 7, 8, 16, 64, 128)] == [0, 0, 1, 2, 8, 16]
    assert [held_back_count(n, True) for n in (1, 2, 7, 8, 64)] == [0, 1, 1, 1, 8]


def test_draw_is_deterministic_and_seeded():
    ids = torch.arange(5000)
    a = split_windows(ids, 16, 64, seed=3, n_holdout=2)
    b = split_windows(ids, 16, 64, seed=3, n_holdout=2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], split_windows(ids, 16, 64, seed=4, n_holdout=2)[0])
    # a larger hold-out takes its windows from the end of the same draw
    c, held = split_windows(ids, 16, 64, seed=3, n_holdout=3)
    assert torch.equal(c, a[0][:13]) and torch.equal(held[0], a[0][13])


def test_too_short_text_names_the_need():
    with pytest.raises(ValueError, match=r"needs at least 6400.*lower --nsamples/--seqlen"):
        split_windows(torch.arange(6399), 100, 64, seed=0)


class _WordTokenizer:
    def __call__(self, text, add_special_tokens=False, return_attention_mask=False):
        return {"input_ids": [int(w[1:]) for w in text.split()]}


@pytest.mark.parametrize("nsamples", [4, 16, 64])
def test_every_method_calibrates_on_the_same_windows(tmp_path, nsamples):
    """Baselines and adaptive methods: the same calibration windows (adaptive ones, with fewer
    than 8 windows, hold one of them back); held-back windows disjoint from all of them."""
    g = torch.Generator().manual_seed(0)
    (tmp_path / "c.txt").write_text(" ".join(TINY_WORDS[i] for i in torch.randint(0, 90, (9000,), generator=g)))
    tok = _WordTokenizer()
    seen = {}
    for name in sorted(PRESETS):
        cfg = method_config(name, nsamples=nsamples, seqlen=32, calib=str(tmp_path / "c.txt"))
        seen[name] = (needs_holdout(cfg), *calibration_data(tok, cfg, holdout=True))
    assert any(n for n, _, _ in seen.values()) and not all(n for n, _, _ in seen.values())
    widest = max((c for _, c, _ in seen.values()), key=len)
    for name, (needs, calib, held) in seen.items():
        assert torch.equal(calib, widest[: len(calib)]), name
        assert len(calib) == nsamples - held_back_count(nsamples, needs)
        if nsamples >= 8:
            assert len(calib) == nsamples - nsamples // 8, name  # then every method: exactly the same windows
        if held is not None:
            rows = {tuple(w.tolist()) for w in calib}
            assert not rows & {tuple(w.tolist()) for w in held}, name


def test_cli_and_bench_calibrate_on_the_same_windows(tmp_path, capsys):
    """`structprune prune` and `structprune bench quality` draw the same windows (one function):
    with equal settings they keep exactly the same units, adaptive (held-back search) or not."""
    import json

    from conftest import save_tiny_folder

    from structprune.cli import main

    save_tiny_folder(tmp_path / "tiny")
    g = torch.Generator().manual_seed(0)
    (tmp_path / "c.txt").write_text(" ".join(TINY_WORDS[i] for i in torch.randint(0, 90, (2000,), generator=g)))
    (tmp_path / "e.txt").write_text(" ".join(TINY_WORDS[i] for i in torch.randint(0, 90, (400,), generator=g)))
    common = ["--calib", str(tmp_path / "c.txt"), "--nsamples", "16", "--seqlen", "16", "--device", "cpu"]
    assert main(["bench", "quality", "--model", str(tmp_path / "tiny"), "--texts", str(tmp_path / "e.txt"),
                 "--windows", "2", "--methods", "structprune", "wanda-sp", "--sparsities", "0.3",
                 "--out", str(tmp_path / "res" / "q.json"), *common]) == 0
    for method in ("structprune", "wanda-sp"):
        out = tmp_path / method
        assert main(["prune", str(tmp_path / "tiny"), "--method", method, "--sparsity", "0.3", "--out", str(out),
                     "--no-progress", *common]) == 0
        cli = json.loads((out / "structprune_plan.json").read_text())
        # the harness keeps compact plans (no per-unit scores): the kept units and targets must agree
        bench = PrunePlan.load(next((tmp_path / "res" / "plans").glob(f"{method}@0.3*.json.gz"))).to_dict()
        for a, b in zip(cli["layers"], bench["layers"], strict=True):
            assert (a["kept_heads"], a["kept_neurons"]) == (b["kept_heads"], b["kept_neurons"]), method
            assert a["mlp_keep_target"] == pytest.approx(b["mlp_keep_target"], rel=1e-9), method
    capsys.readouterr()
