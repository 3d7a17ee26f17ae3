"""Head / KV / hidden layouts of real checkpoints, shrunk: prune, save, reload for every `modules`
choice and a range of sparsities.

The tiny models in conftest.py all have 2 KV groups and a hidden size every kept head count
divides; real checkpoints do not (Gemma 3: 4 query heads on ONE KV head, 4 x head_dim != hidden;
Qwen3: head_dim 128 with hidden / heads = 64; 15 heads on 5 KV heads; 14 on 2). Each layout here
keeps the real head / KV structure and the attention / MLP parameter ratio (hidden size, head_dim
and FFN width divided by the same factor), so the rounding to whole heads is as coarse as on the
real model. Transformers' own config rules (Llama and Gemma 3 ask hidden % heads == 0; OPT and
GPT-2 derive head_dim from the head count) decide whether the output is a plain checkpoint.
"""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, logits, windows
from transformers import AutoModelForCausalLM

import structprune as sp
from structprune.arch import get_adapter
from structprune.io import save_pruned
from structprune.allocation.budget import max_sparsity

# name: (model_type, hidden, heads, kv heads, head_dim, FFN width, layers); real checkpoint in the comment
LAYOUTS = {
    "gemma3-270m": ("gemma3_text", 40, 4, 1, 16, 128, 4),  # 640, 4 / 1, head_dim 256 (4 x 256 != 640), 2048
    "smollm2-135m": ("llama", 36, 9, 3, 4, 96, 2),  # 576, 9 / 3, 64, 1536
    "smollm2-360m": ("llama", 60, 15, 5, 4, 160, 2),  # 960, 15 / 5, 64, 2560
    "qwen2.5-0.5b": ("qwen2", 56, 14, 2, 4, 304, 2),  # 896, 14 / 2, 64, 4864
    "qwen3-0.6b": ("qwen3", 32, 16, 8, 4, 96, 2),  # 1024, 16 / 8, head_dim 128 (16 x 128 != 1024), 3072
    "mistral-7b": ("mistral", 128, 32, 8, 4, 448, 2),  # 4096, 32 / 8, 128, 14336 (Llama-3-8B alike)
    "opt-125m": ("opt", 48, 12, 12, 4, 192, 2),  # 768, 12 / 12, 64, 3072
    "gpt2": ("gpt2", 48, 12, 12, 4, 192, 2),  # 768, 12 / 12, 64, 3072
}
MODULES = {"both": {}, "mlp": {"prune_attention": False}, "attention": {"prune_mlp": False}}
SPARSITIES = (0.1, 0.3, 0.5, 0.7)


def layout_config(name: str):
    from transformers import (Gemma3TextConfig, GPT2Config, LlamaConfig, MistralConfig, OPTConfig, Qwen2Config,
                              Qwen3Config)

    family, hidden, heads, kv, head_dim, ffn, n_layers = LAYOUTS[name]
    common = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=n_layers,
                  num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=64)
    if family == "gemma3_text":
        return Gemma3TextConfig(**common, head_dim=head_dim, sliding_window=8,
                                layer_types=["sliding_attention", "full_attention"] * (n_layers // 2))
    if family == "llama":
        return LlamaConfig(**common, head_dim=head_dim)
    if family == "qwen2":
        return Qwen2Config(**common)  # head_dim = hidden / heads, as in Qwen2.5
    if family == "qwen3":
        return Qwen3Config(**common, head_dim=head_dim)
    if family == "mistral":
        return MistralConfig(**common, head_dim=head_dim)
    if family == "opt":
        return OPTConfig(vocab_size=VOCAB, hidden_size=hidden, ffn_dim=ffn, num_hidden_layers=n_layers,
                         num_attention_heads=heads, word_embed_proj_dim=hidden, max_position_embeddings=64)
    if family == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_inner=ffn, n_layer=n_layers, n_head=heads, n_positions=64)
    raise ValueError(name)


def layout_model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(layout_config(name), dtype=torch.float32).eval()
    with torch.no_grad():  # widen the near-degenerate random init so every unit matters
        for pname, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 1.2 / p.shape[-1] ** 0.5)
            elif "bias" in pname:
                p.normal_(0, 0.05)
    return model


def test_layouts_are_those_of_the_checkpoints():
    """The shrunk configs keep what makes the real ones hard: one KV group, heads x head_dim != hidden."""
    for name, (family, hidden, heads, kv, head_dim, _, _) in LAYOUTS.items():
        ad = get_adapter(layout_config(name))
        assert (ad.num_heads, ad.num_kv_heads, ad.head_dim, ad.hidden_size) == (heads, kv, head_dim, hidden), name
    assert get_adapter(layout_config("gemma3-270m")).num_kv_heads == 1
    assert all(LAYOUTS[n][2] * LAYOUTS[n][4] != LAYOUTS[n][1] for n in ("gemma3-270m", "qwen3-0.6b"))


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("modules", list(MODULES))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_prune_save_reload(layout, modules, sparsity, tmp_path):
    """Every layout x modules x sparsity either prunes, saves and reloads to the same logits within
    1 point of the requested actual sparsity, or (only when the model cannot reach it) fails before
    any work with the reachable maximum in the message."""
    model = layout_model(layout)
    cfg = sp.PruneConfig.from_flat(sparsity=sparsity, nsamples=4, seqlen=16, batch_size=4, device="cpu",
                                   allocation="uniform", rho=1.0, **MODULES[modules])
    ids = windows(4, 16)
    top = max_sparsity(get_adapter(model.config), modules, cfg.max_layer_sparsity)
    if sparsity > top:
        with pytest.raises(ValueError, match=rf"at most {top:.4f}"):
            sp.prune(model, cfg, calib_windows=ids, progress=False)
        return
    res = sp.prune(model, cfg, calib_windows=ids, progress=False)
    assert abs(res.plan.actual_sparsity - sparsity) <= 0.01, res.plan.shapes()
    out = save_pruned(res.model, res.plan, tmp_path / "m")
    ref = logits(res.model, ids[:2])
    assert torch.isfinite(ref).all()
    if res.model.config.structprune["vanilla"]:
        again = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    else:
        again = sp.load_pruned(out)
    torch.testing.assert_close(logits(again, ids[:2]), ref, rtol=1e-4, atol=1e-5)


def test_config_transformers_rejects_falls_back_to_per_layer_shapes(tmp_path):
    """3 of 4 heads at hidden 40: Gemma 3's config rule (hidden % heads == 0) rejects the plain config,
    so the dense config with per-layer shapes is written; 2 of 4 stays a plain checkpoint."""
    from structprune.arch import LayerShape
    from structprune.arch.base import config_problem

    ad = get_adapter(layout_config("gemma3-270m"))
    three = ad.shaped_config([LayerShape(3, 1, 64)] * ad.num_layers)
    assert three.structprune["vanilla"] is False and three.num_attention_heads == 4
    assert config_problem(three) is None
    three.save_pretrained(tmp_path / "three")  # what used to raise after every layer was pruned
    two = ad.check_shapes([LayerShape(2, 1, 64)] * ad.num_layers)
    assert two.structprune["vanilla"] is True and two.num_attention_heads == 2
    with pytest.raises(ValueError, match="layer 1"):  # not whole KV groups
        get_adapter(layout_config("smollm2-135m")).check_shapes([LayerShape(9, 3, 96), LayerShape(4, 3, 96)])


def _save_folder(model, folder) -> None:
    """`model` with the word-level tokenizer of conftest.save_tiny_folder."""
    from conftest import TINY_WORDS
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>"] + TINY_WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    model.save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>").save_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    text = " ".join(TINY_WORDS[i] for i in torch.randint(0, len(TINY_WORDS), (3000,), generator=g).tolist())
    (folder.parent / "calib.txt").write_text(text)


def _issue_folder(tmp_path):
    """The issue's model: hidden 64, 4 query heads on ONE KV head, head_dim 16 (small Gemma 3)."""
    from transformers import Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
                           sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    folder = tmp_path / "gemma"
    _save_folder(AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval(), folder)
    return folder


CLI_ARGS = ["--nsamples", 8, "--seqlen", 16, "--device", "cpu", "--no-progress"]


def _cli(*argv) -> int:
    from structprune.cli import main

    return main([str(a) for a in argv])


def test_cli_one_kv_group_model_saves_and_reloads(tmp_path, capsys):
    """`structprune prune DIR --sparsity 0.2 --rho 1` on the issue's model keeps 3 of 4 heads (attention
    pruned as much as the MLP) and writes a folder that reloads (it used to die in config.save_pretrained
    after every layer was pruned)."""
    from structprune.io import load_plan

    folder = _issue_folder(tmp_path)
    out = tmp_path / "out"
    assert _cli("prune", folder, "--sparsity", 0.2, "--rho", 1, "--out", out, "--calib", tmp_path / "calib.txt",
                *CLI_ARGS) == 0
    model = sp.load_pruned(out)
    plan = load_plan(out)
    assert {s.num_heads for s in plan.shapes()} == {3}
    assert abs(plan.actual_sparsity - 0.2) <= 0.01
    assert torch.isfinite(logits(model, windows(2, 16))).all()


def test_cli_unreachable_sparsity_fails_before_any_work(tmp_path, capsys):
    """0.95 is above what the model can lose: a clear error with the reachable maximum, nothing written."""
    from structprune.io import partial_dir

    folder = _issue_folder(tmp_path)
    out = tmp_path / "out"
    assert _cli("prune", folder, "--sparsity", 0.95, "--out", out, "--calib", tmp_path / "calib.txt", *CLI_ARGS) == 2
    err = capsys.readouterr().err
    top = max_sparsity(get_adapter(AutoModelForCausalLM.from_pretrained(folder).config), "both", 0.9)
    assert "sparsity=0.95 cannot be reached" in err and f"at most {top:.4f}" in err and "--max-layer-sparsity" in err
    assert not out.exists() and not partial_dir(out).exists()


def test_failed_final_write_resumes_to_the_same_bytes(tmp_path, monkeypatch, capsys):
    """Every layer is pruned, then the last write (config, plan) fails once: the finished layers stay
    beside --out and `--resume` ends with exactly the files of an uninterrupted run."""
    import json

    from structprune.io import checkpoint as io
    from structprune.io import PLAN_NAME, partial_dir

    folder = _issue_folder(tmp_path)
    args = ["--sparsity", 0.2, "--rho", 1, "--calib", tmp_path / "calib.txt", *CLI_ARGS]
    ref = tmp_path / "ref"
    assert _cli("prune", folder, "--out", ref, *args) == 0

    out = tmp_path / "out"
    write = io._write_metadata
    calls = []

    def full_disk_once(*a, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        return write(*a, **kw)

    monkeypatch.setattr(io, "_write_metadata", full_disk_once)
    with pytest.raises(OSError, match="No space left"):
        _cli("prune", folder, "--out", out, *args)
    assert not out.exists()
    assert sorted(p.name for p in partial_dir(out).glob("model-layer-*")) == [
        "model-layer-00000.safetensors", "model-layer-00001.safetensors"]
    assert _cli("prune", folder, "--out", out, *args) == 2  # a leftover run is named, not overwritten
    assert "--resume" in capsys.readouterr().err
    assert _cli("prune", folder, "--out", out, *args, "--resume") == 0
    assert not partial_dir(out).exists()
    weights = sorted(p.name for p in ref.glob("*.safetensors"))
    assert weights == sorted(p.name for p in out.glob("*.safetensors")) and len(weights) == 3
    for name in weights:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name

    def plan(path):
        d = json.loads((path / PLAN_NAME).read_text())
        d.pop("timing")
        d["allocation"].pop("seconds")
        return d

    assert plan(out) == plan(ref)
    assert json.loads((out / "config.json").read_text()) == json.loads((ref / "config.json").read_text())


def test_max_sparsity_keeps_one_head_group_and_one_neuron_per_layer():
    from conftest import tiny_config

    ad = get_adapter(tiny_config("llama"))  # hidden 32, 4 heads on 2 KV heads of 8, 48 gated neurons
    unit, neuron = 2 * 32 * 8, 3 * 32
    attn, mlp = 6 * unit, 48 * neuron
    total = attn + mlp
    assert max_sparsity(ad, "both", 1.0) == pytest.approx(1 - (2 * unit + neuron) / total)
    assert max_sparsity(ad, "both", 0.5) == pytest.approx(0.5)  # the cap binds, not the single head
    assert max_sparsity(ad, "both", 0.9) == pytest.approx(1 - (2 * unit + neuron) / total)
    assert max_sparsity(ad, "mlp", 0.9) == pytest.approx(1 - (attn + 0.1 * mlp) / total)
    assert max_sparsity(ad, "attention", 1.0) == pytest.approx(1 - (2 * unit + mlp) / total)
    with pytest.raises(ValueError, match="modules='heads'"):
        max_sparsity(ad, "heads")


@pytest.mark.parametrize("method,sparsity,message", [
    ("global", 0.9, "modules=both at most"),  # whole-model rankings used to stop short silently
    ("flap", 0.9, "modules=both at most"),
    ("wanda-sp", 0.5, r"modules=mlp \(rho=0\) at most"),  # used to fail in the rho split after the capture
])
def test_unreachable_sparsity_fails_before_calibration(method, sparsity, message):
    """No tokenizer and no windows: an error about them would mean the check came after calibration."""
    from conftest import tiny_model

    from structprune.methods import method_config

    with pytest.raises(ValueError, match=message):
        sp.prune(tiny_model("opt"), method_config(method, sparsity=sparsity, device="cpu"), progress=False)


@pytest.mark.parametrize("modules", list(MODULES))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_reachable_maximum_is_reached(layout, modules):
    """max_sparsity is not just a safe bound: the default configuration (max_layer_sparsity 0.9,
    rho searched) run at it (rounded down to a percent) lands within 1 point; just above, it refuses."""
    import math

    model = layout_model(layout)
    top = max_sparsity(get_adapter(model.config), modules, 0.9)
    sparsity = math.floor(top * 100) / 100
    cfg = sp.PruneConfig.from_flat(sparsity=sparsity, nsamples=4, seqlen=16, batch_size=4, device="cpu", **MODULES[modules])
    res = sp.prune(model, cfg, calib_windows=windows(4, 16), progress=False)
    assert abs(res.plan.actual_sparsity - sparsity) <= 0.01
    with pytest.raises(ValueError, match="cannot be reached"):
        sp.prune(model, cfg.replace(sparsity=min(0.95, top + 0.005)), calib_windows=windows(4, 16), progress=False)


def test_an_illegal_planned_shape_fails_before_the_first_layer(tmp_path):
    """Replayed masks whose layer 1 keeps 3 query heads on 2 KV heads: refused before layer 0 is pruned
    (it used to fail inside layer 1, after layer 0's work)."""
    from conftest import tiny_model

    from structprune.io import ShardWriter

    model = tiny_model("llama")  # 4 query heads on 2 KV heads
    cfg = sp.PruneConfig.from_flat(sparsity=0.3, nsamples=4, seqlen=16, batch_size=4, device="cpu", rho=1.0)
    plan = sp.prune(model, cfg, calib_windows=windows(4, 16), progress=False).plan
    plan.layers[1].kept_heads, plan.layers[1].kept_kv_heads = [0, 1, 2], [0, 1]
    sink = ShardWriter(tmp_path / "m")
    with pytest.raises(ValueError, match="layer 1: shape"):
        sp.prune(model, cfg, calib_windows=windows(4, 16), progress=False, masks=plan, sink=sink)
    assert sink.layers_written == []
