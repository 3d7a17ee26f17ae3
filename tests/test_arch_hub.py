"""Non-uniform pruned folders load with plain transformers (trust_remote_code) where structprune is absent."""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import FAMILIES, logits, tiny_model, windows

import structprune as sp
from structprune.arch.hub import HUB_CLASSES, MODELING_NAME
from structprune.io import save_pruned


def _non_uniform(family: str):
    """A tiny pruned model of `family` whose folder needs remote code (per-layer or head-pruned shapes)."""
    for sparsity in (0.4, 0.5, 0.3):
        cfg = sp.PruneConfig.from_flat(sparsity=sparsity, nsamples=8, seqlen=24, batch_size=4, device="cpu",
                             allocation="softmax")
        res = sp.prune(tiny_model(family), cfg, calib_windows=windows(8), progress=False)
        if not res.model.config.structprune["vanilla"]:
            return res
    raise AssertionError(f"no non-vanilla tiny {family} model found")


# Runs in a fresh interpreter: -I (no PYTHONPATH, no cwd, no user site) and -S (no .pth files, so the
# editable structprune install is invisible); only the bare site-packages folder is put on sys.path.
_PLAIN = textwrap.dedent("""
    import importlib.util, json, sys
    sys.path.append(sys.argv[1])
    assert importlib.util.find_spec("structprune") is None, "structprune is importable"
    import torch
    from transformers import AutoModelForCausalLM
    jobs = json.loads(sys.argv[2])
    ids = torch.load(sys.argv[3])
    for folder, out in jobs:
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
        with torch.no_grad():
            result = {"class": type(model).__name__, "logits": model(input_ids=ids, use_cache=False).logits,
                      "generated": model.generate(ids[:1, :6], max_new_tokens=8, do_sample=False,
                                                  pad_token_id=0)}
        torch.save(result, out)
    # save_pretrained of a remote-code model copies the modeling file: the copy loads the same way
    model.save_pretrained("copy")
    again = AutoModelForCausalLM.from_pretrained("copy", trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)
    print("ok")
""")



def _reference(out, ids):
    """(logits, greedy continuation) of a saved folder loaded with structprune: what plain loading must match."""
    ref = sp.load_pruned(out)
    with torch.no_grad():
        return logits(ref, ids), ref.generate(ids[:1, :6], max_new_tokens=8, do_sample=False, pad_token_id=0)

def _run_plain(tmp_path, jobs: list[tuple[str, str]], ids: torch.Tensor) -> subprocess.CompletedProcess:
    torch.save(ids, tmp_path / "ids.pt")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-I", "-S", "-c", _PLAIN, site.getsitepackages()[0], json.dumps(jobs),
                           str(tmp_path / "ids.pt")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)


def test_non_uniform_folders_load_without_structprune(tmp_path):
    """Every family: trust_remote_code loading in a structprune-free interpreter gives load_pruned's
    logits and greedy tokens (KV cache with per-layer head counts)."""
    ids = windows(2)
    jobs, expected = [], {}
    for family in FAMILIES:
        res = _non_uniform(family)
        out = save_pruned(res.model, res.plan, tmp_path / family)
        config = json.loads((out / "config.json").read_text())
        assert config["auto_map"]["AutoModelForCausalLM"] == f"modeling_structprune.{HUB_CLASSES[family]}"
        assert (out / MODELING_NAME).is_file()
        expected[family] = _reference(out, ids)
        jobs.append((str(out), str(tmp_path / f"{family}.pt")))
    proc = _run_plain(tmp_path, jobs, ids)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
    for family in FAMILIES:
        got = torch.load(tmp_path / f"{family}.pt")
        assert got["class"] == HUB_CLASSES[family]
        torch.testing.assert_close(got["logits"], expected[family][0], rtol=1e-5, atol=1e-5)
        assert torch.equal(got["generated"], expected[family][1]), family


def test_plain_interpreter_really_lacks_structprune(tmp_path):
    """The isolation the test above relies on: the same interpreter setup cannot import structprune."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    code = "import sys; sys.path.append(sys.argv[1]); import structprune"
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", code, site.getsitepackages()[0]], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "No module named 'structprune'" in proc.stderr


def test_uniform_folder_stays_plain(tmp_path):
    """A vanilla (uniform, expressible) folder gets no remote code: plain from_pretrained loads it."""
    cfg = sp.PruneConfig.from_flat(sparsity=0.25, nsamples=8, seqlen=24, device="cpu", prune_attention=False,
                                   allocation="uniform")
    res = sp.prune(tiny_model("llama"), cfg, calib_windows=windows(8), progress=False)
    out = save_pruned(res.model, res.plan, tmp_path / "m")
    assert "auto_map" not in json.loads((out / "config.json").read_text())
    assert not (out / MODELING_NAME).exists()


def test_load_pruned_and_sharded_writer_unaffected_by_auto_map(tmp_path):
    """load_pruned (no trust_remote_code) still rebuilds a folder that carries auto_map; the layer-wise
    ShardWriter writes the same remote code."""
    from structprune.io import ShardWriter
    from structprune.runtime.source import layers_prefix

    res = _non_uniform("llama")
    out = save_pruned(res.model, res.plan, tmp_path / "m")
    torch.testing.assert_close(logits(sp.load_pruned(out), windows(2)), logits(res.model, windows(2)))
    cfg = sp.PruneConfig.from_flat(sparsity=0.4, nsamples=8, seqlen=24, batch_size=4, device="cpu", allocation="softmax")
    sink = ShardWriter(tmp_path / "s", release=True)
    sharded = sp.prune(tiny_model("llama"), cfg, calib_windows=windows(8), progress=False, sink=sink)
    folder = sink.finish(sharded.model, sharded.plan, layers_prefix(sharded.model))
    assert "auto_map" in json.loads((folder / "config.json").read_text()) and (folder / MODELING_NAME).is_file()


def test_modeling_file_is_self_contained():
    """The copied file may import only torch, transformers and the standard library."""
    import ast
    from pathlib import Path

    import structprune.arch.hub as hub

    tree = ast.parse(Path(hub.__file__).with_name(MODELING_NAME).read_text())
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
    assert roots <= {"torch", "transformers", "__future__", "typing"}, roots
    assert not any(isinstance(n, ast.ImportFrom) and n.level for n in ast.walk(tree))


@pytest.mark.parametrize("bad", [{"layers": []}, {"version": 99, "layers": []}])
def test_modeling_file_rejects_bad_shapes(bad):
    from structprune.arch.modeling_structprune import StructpruneLlamaForCausalLM

    from conftest import tiny_config

    config = tiny_config("llama")
    config.structprune = {"version": 1, **bad}
    with pytest.raises(ValueError, match="structprune"):
        StructpruneLlamaForCausalLM(config)


def test_real_checkpoint_layouts_load_without_structprune(tmp_path):
    """The shrunk real-checkpoint layouts of test_layouts (Gemma 3 with one KV group and heads x head_dim
    != hidden, Qwen3 head_dim 128, 15 heads on 5 KV heads, ...) pruned to per-layer shapes (or to a
    uniform shape a plain config cannot express) load with trust_remote_code alone."""
    from test_layouts import LAYOUTS, layout_model

    ids = windows(2, 16)
    jobs, expected = [], {}
    for name in LAYOUTS:
        for allocation in ("uniform", "softmax"):
            cfg = sp.PruneConfig.from_flat(sparsity=0.3, nsamples=4, seqlen=16, batch_size=4, device="cpu", rho=1.0,
                                 allocation=allocation, temperature="1x")
            res = sp.prune(layout_model(name), cfg, calib_windows=windows(4, 16), progress=False)
            if not res.model.config.structprune["vanilla"]:
                break
        assert not res.model.config.structprune["vanilla"], name
        out = save_pruned(res.model, res.plan, tmp_path / name)
        expected[name] = _reference(out, ids)
        jobs.append((str(out), str(tmp_path / f"{name}.pt")))
    proc = _run_plain(tmp_path, jobs, ids)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
    for name in LAYOUTS:
        got = torch.load(tmp_path / f"{name}.pt")
        torch.testing.assert_close(got["logits"], expected[name][0], rtol=1e-5, atol=1e-5)
        assert torch.equal(got["generated"], expected[name][1]), name
