"""Bit-for-bit reproduction: every pruning result must equal the one recorded on commit 3b2dcf4.

The golden records under tests/golden/ were written by tests/golden/make_golden.py on commit
3b2dcf4, before the issue-15 refactor moved modules around. A case is one public-API run
(`structprune.prune`) of a tiny in-process model (conftest.tiny_model) on fixed windows; its
record holds what a reader cares about (each layer's kept heads, KV heads and neurons, the
plan's actual sparsity, the allocation's rule and numbers such as temperature and rho) and
sha256 prefixes of every tensor of the pruned state dict ("=dense" where it equals the
unpruned model's, which keeps the records small) and of the logits on fixed ids.
Hashes are exact: any change of arithmetic order, dtype, seed or RNG draw fails the case,
naming the layer or tensor that differs. Every case was checked equal under OMP_NUM_THREADS=1
and 2, so no tolerance is needed.

Only the public API is used (structprune.prune, structprune.PruneConfig), so module moves
inside the package cannot break this file. The named methods' presets are written out here
(a copy of methods.METHODS at 3b2dcf4) for the same reason.

Intended behaviour changes since, each re-recorded case by case (`make_golden.py --only`):
- issue 18 made the sensitivity rule (linear) the default allocation. The cases recorded with the
  old default (uniform, rho searched) now name allocation "uniform" and reproduce unchanged;
  "<family>/default" cases record the new default. The sensitivity cases name
  sensitivity_max_step=2.0 (the value they were recorded with; the default is now 1.5); the linear
  estimate's move to the consumer's output left these two cases' plans and weights unchanged.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

import structprune as sp
from conftest import FAMILIES, TINY_WORDS, save_tiny_folder, tiny_model, windows

GOLDEN_DIR = Path(__file__).parent / "golden"
HASH_CHARS = 12  # 48 bits of sha256: enough to tell any two results apart, small enough to store
DENSE = "=dense"  # stored instead of a hash for a tensor equal to the unpruned model's (embeddings, norms)

BASE = dict(sparsity=0.3, nsamples=8, seqlen=24, batch_size=3, device="cpu")  # 8 windows in batches 3 + 3 + 2

METHODS: dict[str, dict[str, Any]] = {  # methods.METHODS at 3b2dcf4
    "structprune": {"scorer": "wanda", "allocation": "uniform"},  # the allocation default at 3b2dcf4
    "wanda-sp": {"scorer": "wanda", "allocation": "uniform", "reconstruction": "none", "rho": 0.0},
    "magnitude": {"scorer": "magnitude", "allocation": "uniform", "reconstruction": "none", "rho": 0.0},
    "random": {"scorer": "random", "allocation": "uniform", "reconstruction": "none", "rho": 0.0},
    "flap": {"scorer": "flap", "allocation": "flap", "reconstruction": "none", "bias_compensation": True},
    "global": {"scope": "global", "reconstruction": "none"},
}

# Each option takes its own code path; run on llama (GQA: 4 heads over 2 KV heads) and opt (biases, ReLU MLP).
# Allocation "uniform" with rho "auto" is the "structprune" method's case. On opt, bias-compensation equals
# recon-lstsq (its projections have biases already).
OPTIONS: dict[str, dict[str, Any]] = {
    "closed-form": {"allocation": "closed-form"},
    "softmax": {"allocation": "softmax", "temperature": "auto"},
    "softmax-fixed-T": {"allocation": "softmax", "temperature": "0.1x"},
    "softmax-modular": {"allocation": "softmax-modular"},
    "sensitivity-exact": {"allocation": "sensitivity", "sensitivity": "exact", "sensitivity_max_step": 2.0},
    "sensitivity-linear": {"allocation": "sensitivity", "sensitivity": "linear", "sensitivity_max_step": 2.0},
    "recon-none": {"allocation": "uniform", "reconstruction": "none", "rho": 1.0},
    "recon-lstsq": {"allocation": "uniform", "reconstruction": "lstsq", "rho": 1.0},
    "recon-admm": {"allocation": "uniform", "reconstruction": "admm", "rho": 1.0, "admm_iters": 2, "admm_attn_steps": 2},
    "selection-obs": {"allocation": "uniform", "selection": "obs", "rho": 1.0},
    "target-dense": {"allocation": "uniform", "target": "dense", "rho": 1.0},
    "target-local": {"allocation": "uniform", "target": "local", "rho": 1.0, "scorer": "magnitude"},  # default; magnitude: not recon-lstsq
    "target-residual": {"allocation": "uniform", "target": "residual", "target_mix": 0.5, "rho": 1.0},
    "bias-compensation": {"allocation": "uniform", "bias_compensation": True, "rho": 1.0},
    "mlp-only": {"allocation": "uniform", "prune_attention": False},
    "attention-only": {"allocation": "uniform", "prune_mlp": False, "sparsity": 0.2},  # at most 0.27 reachable
    "round-to-8": {"allocation": "uniform", "round_to": 8},
    # the 0.4 cap binds: without it the last layer keeps a single neuron
    "max-layer-sparsity": {"allocation": "softmax", "temperature": "0.01x", "max_layer_sparsity": 0.4},
    "layer-importance-raw": {"allocation": "softmax", "layer_importance": "raw"},
    "flap-kind-paper": {**METHODS["flap"], "flap_standardise": "kind", "flap_square_attention": False},
}
OPTION_FAMILIES = ("llama", "opt")


@functools.lru_cache(maxsize=None)
def cases() -> dict[str, dict[str, Any]]:
    """Every case by name: family, config fields and where the held-back windows come from."""
    out = {f"{fam}/{name}": dict(family=fam, config={**BASE, **fields}, holdout="given")
           for fam in FAMILIES for name, fields in METHODS.items()}
    out.update({f"{fam}/{name}": dict(family=fam, config={**BASE, **fields}, holdout="given")
                for fam in OPTION_FAMILIES for name, fields in OPTIONS.items()})
    # the pipeline's own hold-out: the last nsamples // 8 of the given windows
    out["llama/softmax-internal-holdout"] = dict(family="llama", config={**BASE, "allocation": "softmax"},
                                                 holdout="internal")
    # replay of a plan's kept units (prune(masks=...)) with a re-fit
    out["llama/masks-replay"] = dict(family="llama", config={**BASE, "rho": 1.0}, holdout="given",
                                     masks={**BASE, "allocation": "softmax", "reconstruction": "none"})
    # a safetensors folder read layer by layer, windows drawn by the API from a local text file
    out["llama-folder/text-file"] = dict(family="llama", config={**BASE, "allocation": "uniform"}, holdout="file")
    # the default configuration since issue 18 (allocation "sensitivity", linear)
    out.update({f"{fam}/default": dict(family=fam, config=dict(BASE), holdout="given") for fam in FAMILIES})
    return out


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().cpu().numpy().tobytes()).hexdigest()[:HASH_CHARS]


def tensor_digests(state: dict[str, torch.Tensor], dense: dict[str, torch.Tensor]) -> dict[str, dict[str, str]]:
    """{group: {name: digest or DENSE}}, grouped by decoder layer ("model.layers.0") or "top"."""
    out: dict[str, dict[str, str]] = {}
    for name, t in state.items():
        match = re.match(r"(.*?\.\d+)\.(.*)", name)
        group, rest = match.groups() if match else ("top", name)
        out.setdefault(group, {})[rest] = DENSE if name in dense and same(t, dense[name]) else digest(t)
    return out


def calibration_text() -> str:
    """A deterministic text over the tiny tokenizer's words (2,000 tokens, 20 to a line)."""
    words = [TINY_WORDS[(i * 37 + i // 90) % len(TINY_WORDS)] for i in range(2000)]
    return "\n".join(" ".join(words[i:i + 20]) for i in range(0, len(words), 20))


def run_case(case: dict[str, Any], tmp: Path) -> sp.PruneResult:
    """Prune as the case says, through the public API only."""
    config = sp.PruneConfig.from_flat(**case["config"])
    if case["holdout"] == "file":
        folder, text = tmp / "model", tmp / "calib.txt"
        save_tiny_folder(folder)
        text.write_text(calibration_text(), encoding="utf-8")
        return sp.prune(str(folder), config.replace(calib=str(text)), progress=False)
    holdout = windows(2, seed=7) if case["holdout"] == "given" else None
    masks = None
    if "masks" in case:
        masks = sp.prune(tiny_model(case["family"]), sp.PruneConfig.from_flat(**case["masks"]), calib_windows=windows(8),
                         holdout_windows=windows(2, seed=7), progress=False).plan
    return sp.prune(tiny_model(case["family"]), config, calib_windows=windows(8), holdout_windows=holdout,
                    progress=False, masks=masks)


def record(case: dict[str, Any], tmp: Path) -> dict[str, Any]:
    """What is compared: plan decisions, plan numbers and hashes of the weights and logits."""
    res = run_case(case, tmp)
    plan, model = res.plan, res.model
    alloc = {k: v for k, v in plan.allocation.items()
             if k == "rule" or (isinstance(v, (int, float)) and not isinstance(v, bool) and k != "seconds")}
    with torch.no_grad():
        logits = model(input_ids=windows(2, seqlen=16, seed=123), use_cache=False).logits
    return {
        "actual_sparsity": plan.actual_sparsity,
        "allocation": alloc,
        "layers": [{"kept_heads": lp.kept_heads, "kept_kv_heads": lp.kept_kv_heads, "kept_neurons": lp.kept_neurons}
                   for lp in plan.layers],
        "tensors": tensor_digests(model.state_dict(), tiny_model(case["family"]).state_dict()),
        "logits": digest(logits),
    }


def golden_file(name: str) -> Path:
    return GOLDEN_DIR / f"{name.split('/')[0]}.json"


@functools.lru_cache(maxsize=None)
def load_golden(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def differences(want: dict[str, Any], got: dict[str, Any]) -> list[str]:
    """Readable lines naming each layer, number or tensor that differs."""
    out = []
    if want["actual_sparsity"] != got["actual_sparsity"]:
        out.append(f"actual_sparsity {want['actual_sparsity']!r} -> {got['actual_sparsity']!r}")
    for key in sorted(set(want["allocation"]) | set(got["allocation"])):
        w, g = want["allocation"].get(key, "<absent>"), got["allocation"].get(key, "<absent>")
        if w != g:
            out.append(f"allocation[{key!r}] {w!r} -> {g!r}")
    if len(want["layers"]) != len(got["layers"]):
        out.append(f"{len(want['layers'])} layers -> {len(got['layers'])}")
    for i, (w, g) in enumerate(zip(want["layers"], got["layers"])):
        for key in w:
            if w[key] != g[key]:
                out.append(f"layer {i} {key}: {w[key]} -> {g[key]}")
    for group in sorted(set(want["tensors"]) | set(got["tensors"])):
        w_group, g_group = want["tensors"].get(group, {}), got["tensors"].get(group, {})
        for name in sorted(set(w_group) | set(g_group)):
            w, g = w_group.get(name, "<absent>"), g_group.get(name, "<absent>")
            if w != g:
                out.append(f"tensor {name if group == 'top' else group + '.' + name}: {w} -> {g}")
    if want["logits"] != got["logits"]:
        out.append(f"logits on fixed ids: {want['logits']} -> {got['logits']}")
    return out


@pytest.mark.parametrize("name", list(cases()))
def test_reproduces_golden(name: str, tmp_path: Path) -> None:
    want = load_golden(golden_file(name))[name]
    diffs = differences(want, record(cases()[name], tmp_path))
    if diffs:
        pytest.fail(f"case {name} differs from the 3b2dcf4 record:\n  " + "\n  ".join(diffs), pytrace=False)


def test_every_case_has_a_record() -> None:
    recorded = {n for p in GOLDEN_DIR.glob("*.json") for n in load_golden(p)}
    missing, extra = sorted(set(cases()) - recorded), sorted(recorded - set(cases()))
    assert not missing and not extra, f"cases without a record: {missing}; records without a case: {extra}"
