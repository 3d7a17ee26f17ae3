"""The linear sensitivity estimate against the exact measured sensitivities on a real model.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/sensitivity_rank.py \
        --reference benchmarks/results/plans/structprune-sens4-ffn@0.3.calib-wiki-64x512.json.gz \
        --nsamples 16 --json benchmarks/results/sensitivity_linear_rank.json

The reference plan holds the exact rule's measured curves ({"i.kind": [[fraction, held-back NLL
increase]]}) with its calibration (nsamples x seqlen, seed) and the held-back windows
(max(2, nsamples // 8) windows, seed + 1, as `api.calibration_data`). This script re-draws the SAME
held-back windows, takes the first `--nsamples` of the reference's calibration windows for the
re-fit Grams and scores, runs `sensitivity.linear.measure` at the reference's fractions, and reports
per module kind and fraction the Spearman rank correlation over layers of the estimate (and of its
first- and second-order terms alone) with the exact increases, plus the allocation each gives
(`allocation.sensitivity_split`) and the layer forwards counted by hooks.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from structprune import allocation as alloc
from structprune.sensitivity import linear
from structprune.arch import get_adapter
from structprune.config import PruneConfig
from structprune.data import calibration_windows, load_text, tokenize
from structprune.io.resolve import load_model
from structprune.plan import PrunePlan
from structprune.allocation.budget import module_params, prunable_keys, prunable_sparsity
from structprune.sensitivity import fractions
from structprune.runtime.hooks import calibration_mode
from structprune.runtime.stream import LayerStream


def ranks(x: list[float]) -> list[float]:
    """Ranks 1..n, ties averaged."""
    order = sorted(range(len(x)), key=lambda i: x[i])
    r = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return r


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = torch.tensor(ranks(a), dtype=torch.float64), torch.tensor(ranks(b), dtype=torch.float64)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def interpolate(curve: list, f: float) -> float:
    """A measured curve [[removed fraction, increase]] at f, piecewise linear from (0, 0)."""
    pts = [(0.0, 0.0)] + [(float(a), float(b)) for a, b in curve]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if f <= x1 + 1e-12:
            return y0 + (y1 - y0) * (f - x0) / (x1 - x0)
    return pts[-1][1]


def exact_cost(exact: dict, mods: list[str], kept: list[float]) -> float:
    """The summed EXACT increase (the exact rule's additive model) of an allocation."""
    return sum(interpolate(exact[m], 1.0 - k) for m, k in zip(mods, kept))


def allocation_summary(exact: dict, terms: dict, keys: list, params: list[int], sparsity: float,
                       max_sparsity: float) -> dict:
    """Allocations from the exact and the estimated curves (and the uniform one), each scored by
    the exact curves' additive model; how much of the uniform -> exact-optimum gap the estimate closes."""
    mods = [f"{i}.{k}" for i, k in keys]
    kept_exact = alloc.sensitivity_split([exact[m] for m in mods], params, sparsity, max_sparsity)
    kept_est = alloc.sensitivity_split([[(f, a + b) for f, a, b in terms[m]] for m in mods], params, sparsity,
                                       max_sparsity)
    kept_second = alloc.sensitivity_split([[(f, b) for f, _, b in terms[m]] for m in mods], params, sparsity,
                                          max_sparsity)
    c_opt, c_est = exact_cost(exact, mods, kept_exact), exact_cost(exact, mods, kept_est)
    c_uni = exact_cost(exact, mods, [1.0 - sparsity] * len(mods))
    return {"kept_exact_curves": kept_exact, "kept_estimated_curves": kept_est,
            "kept_spearman": spearman(kept_est, kept_exact),
            "kept_mean_abs_difference": sum(abs(a - b) for a, b in zip(kept_est, kept_exact)) / len(mods),
            "summed_exact_increase": {"exact_curves": c_opt, "estimated_curves": c_est, "uniform": c_uni,
                                      "second_order_term_only": exact_cost(exact, mods, kept_second)},
            "gap_closed": (c_uni - c_est) / (c_uni - c_opt) if c_uni != c_opt else 1.0}


class LayerCounter:
    """Counts decoder-layer forwards (one per call, i.e. per batch) and head calls by hooks on the
    model's own modules; the hooks travel into every device copy (deepcopy keeps them)."""

    def __init__(self, layers: torch.nn.ModuleList, head: torch.nn.Module) -> None:
        self.counts = {"layer": 0, "head": 0}
        self.handles = [m.register_forward_pre_hook(self._hook("layer")) for m in layers]
        self.handles.append(head.register_forward_pre_hook(self._hook("head")))

    def _hook(self, name: str):
        counts = self.counts

        def hook(_m, _a):
            counts[name] += 1
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _resummarise(args: argparse.Namespace, ref: PrunePlan) -> None:
    """--resummarise: recompute the allocation summary of --json from its stored terms."""
    result = json.loads(Path(args.json).read_text())
    rc = ref.config
    keys = [(int(m.split(".")[0]), m.split(".")[1]) for m in ref.allocation["curves"]]
    keys.sort()
    params = [lp.dense_shape["intermediate_size"] if k == "mlp" else lp.dense_shape["num_heads"]
              for i, k in keys for lp in [ref.layers[i]]]
    if len({k for _, k in keys}) > 1:
        raise ValueError("--resummarise handles one module kind (parameters per module are then equal up "
                         "to the shared neuron cost)")
    result.update(allocation_summary(ref.allocation["curves"], result["terms"], keys, params,
                                     result["prunable_sparsity"], rc["max_layer_sparsity"]))
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("kept_spearman", "summed_exact_increase", "gap_closed")}))


def _rank_table(keys: list, removed: list[float], exact: dict, terms: dict) -> dict:
    """Per module kind: Spearman of estimate vs exact increase, by fraction and pooled."""
    table = {}
    for kind in sorted({k for _, k in keys}):
        mods = [f"{i}.{k}" for i, k in keys if k == kind]
        rows = []
        for j, f in enumerate(removed):
            ex = [exact[m][j][1] for m in mods]
            est = [terms[m][j][1] + terms[m][j][2] for m in mods]
            first = [terms[m][j][1] for m in mods]
            second = [terms[m][j][2] for m in mods]
            rows.append({"removed": f, "spearman": spearman(est, ex), "spearman_first": spearman(first, ex),
                         "spearman_second": spearman(second, ex),
                         "exact_mean": sum(ex) / len(ex), "estimate_mean": sum(est) / len(est)})
        pooled_ex = [exact[m][j][1] for m in mods for j in range(len(removed))]
        pooled_est = [terms[m][j][1] + terms[m][j][2] for m in mods for j in range(len(removed))]
        table[kind] = {"by_fraction": rows, "spearman_pooled": spearman(pooled_est, pooled_ex)}
    return table


def _print_result(result: dict, table: dict, base: float, seconds: float) -> None:
    print(f"dense held-back NLL {base:.4f} (reference {result['reference_holdout_nll_dense']})")
    for kind, t in table.items():
        print(f"{kind}: pooled Spearman {t['spearman_pooled']:.3f}")
        print("  removed  spearman  first-only  second-only  exact-mean  estimate-mean")
        for r in t["by_fraction"]:
            print(f"  {r['removed']:.3f}    {r['spearman']:+.3f}    {r['spearman_first']:+.3f}      "
                  f"{r['spearman_second']:+.3f}       {r['exact_mean']:.4f}      {r['estimate_mean']:.4f}")
    print(f"allocation: Spearman of kept fractions {result['kept_spearman']:.3f}, mean |diff| "
          f"{result['kept_mean_abs_difference']:.3f}; summed exact increase "
          + ", ".join(f"{k} {v:.4f}" for k, v in result["summed_exact_increase"].items())
          + f"; gap uniform -> exact optimum closed {result['gap_closed']:.0%}")
    print(f"layer forwards {result['layer_forwards']} (exact rule: {result['exact_rule_layer_forwards_formula']}), "
          f"head calls {result['head_calls']}, {seconds:.0f} s")



def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--reference", required=True, help="a plan (.json or .json.gz) of the exact rule with curves")
    ap.add_argument("--nsamples", type=int, default=16, help="calibration windows for the Grams (a prefix)")
    ap.add_argument("--json", required=True)
    ap.add_argument("--resummarise", action="store_true",
                    help="recompute the allocation summary of an existing --json from its stored terms (no model run)")
    return ap


def main() -> None:
    args = _parser().parse_args()

    ref = PrunePlan.load(args.reference)
    if args.resummarise:
        _resummarise(args, ref)
        return
    rc = ref.config
    exact = ref.allocation["curves"]
    model, tok = load_model(args.model, "float32")
    ad = get_adapter(model.config)
    layers = ad.decoder_layers(model)
    config = PruneConfig.from_flat(**{**rc, "nsamples": args.nsamples, "device": "cpu", "sensitivity": "linear"})
    ids = tokenize(tok, load_text(rc["calib"], split="calib"))
    calib = calibration_windows(ids, rc["nsamples"], rc["seqlen"], rc["seed"])[:args.nsamples]
    holdout = calibration_windows(ids, max(2, rc["nsamples"] // 8), rc["seqlen"], rc["seed"] + 1)
    keys = prunable_keys(config, ad)
    sparsity = prunable_sparsity(config, ad)
    removed = fractions(sparsity, config.max_layer_sparsity)
    ref_removed = [f for f, _ in exact[f"{keys[0][0]}.{keys[0][1]}"]]
    if [round(f, 9) for f in removed] != [round(f, 9) for f in ref_removed]:
        raise ValueError(f"fractions {removed} differ from the reference's {ref_removed}")
    counter = LayerCounter(layers, model.get_output_embeddings())
    t0 = time.perf_counter()
    with calibration_mode(model):
        stream = LayerStream.capture(model, layers, calib, config.batch_size)
        hold = LayerStream.capture(model, layers, holdout, config.batch_size)
        counter.counts.update(layer=0, head=0)
        curves, base, info = linear.measure(config, ad, model, lambda i: layers[i], stream, hold, holdout, keys,
                                            removed, progress=True)
    seconds = time.perf_counter() - t0
    counter.remove()
    terms = info["terms"]

    table = _rank_table(keys, removed, exact, terms)
    params = module_params(ad)
    p = [params[k] for k in keys]
    summary = allocation_summary(exact, terms, keys, p, sparsity, config.max_layer_sparsity)
    n_layers = ad.num_layers
    result = {
        "model": args.model, "reference": args.reference,
        "reference_calibration": f"{rc['nsamples']}x{rc['seqlen']}", "calibration": f"{args.nsamples}x{rc['seqlen']}",
        "holdout_windows": int(holdout.shape[0]), "fractions": removed, "prunable_sparsity": sparsity,
        "holdout_nll_dense": base, "reference_holdout_nll_dense": ref.allocation.get("holdout_nll_dense"),
        "estimate": "[sum_t g.delta + 1/2 sum_t (g.delta)^2] / N (sensitivity.linear.taylor_terms)",
        "rank": table,
        **summary,
        "layer_forwards": counter.counts["layer"], "head_calls": counter.counts["head"],
        "layers": n_layers, "calibration_batches": len(stream), "holdout_batches": len(hold),
        "exact_rule_layer_forwards_formula": (len(stream) + len(hold)) * n_layers
        + len(hold) * len(removed) * len(keys) // n_layers * n_layers * (n_layers + 1) // 2,
        "seconds": seconds, "terms": terms,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    _print_result(result, table, base, seconds)

if __name__ == "__main__":
    main()
