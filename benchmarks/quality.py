"""Quality benchmark (PROTOCOL.md): methods x actual sparsity on the default model.

Prints a Markdown table and writes JSON (resumable: finished cells are kept and skipped).

    python benchmarks/quality.py                       # the issue-2 grid
    python benchmarks/quality.py --methods random wanda-sp structprune --sparsities 0.2 0.3 0.5
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

import structprune as sp
from structprune.api import calibration_data, needs_holdout
from structprune.data import eval_windows, load_text, tokenize
from structprune.loading import load_model
from structprune.methods import method_config
from structprune.streaming import calibration_mode

RESULTS = Path(__file__).parent / "results"


def dense_forward_seconds(model: torch.nn.Module, windows: torch.Tensor, batch_size: int) -> float:
    """Time of one dense forward pass of the calibration set through the decoder (reference)."""
    base = model.get_submodule("model") if hasattr(model, "model") else model
    t0 = time.perf_counter()
    with calibration_mode(model):
        for start in range(0, windows.shape[0], batch_size):
            base(input_ids=windows[start : start + batch_size], use_cache=False)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", nargs="+", default=["random", "wanda-sp", "structprune"])
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.2, 0.3, 0.5])
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=64)
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="extra PruneConfig fields for every structprune-family cell, e.g. target=local")
    p.add_argument("--tag", default="", help="suffix for the method name in the table")
    p.add_argument("--masks-from", default=None, metavar="METHODTAG",
                   help="replay the kept units of cell METHODTAG@sparsity (compare re-fits on equal masks)")
    p.add_argument("--out", default=str(RESULTS / "quality.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(out.read_text()) if out.exists() else {"cells": {}}
    plans = out.parent / "plans"
    plans.mkdir(exist_ok=True)
    model, tok = load_model(args.model)
    calib = calibration_data(tok, sp.PruneConfig(nsamples=args.nsamples, seqlen=args.seqlen))
    ev = eval_windows(tokenize(tok, load_text("wiki", "eval")), args.seqlen, args.windows)
    results["protocol"] = {"model": args.model, "calib": f"wiki calib split, {args.nsamples} x {args.seqlen}, seed 0",
                           "eval": f"wiki eval split, first {args.windows} x {args.seqlen}, float32",
                           "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    if "dense" not in results:
        results["dense"] = {"perplexity": sp.perplexity(model, ev, progress=False),
                            "params": sum(p.numel() for p in model.parameters())}
    ref = dense_forward_seconds(model, calib, 8)
    results["dense_forward_seconds_last"] = ref
    extra = dict(kv.split("=", 1) for kv in args.set)
    for method in args.methods:
        for s in args.sparsities:
            key = f"{method}{args.tag}@{s}"
            if key in results["cells"]:
                continue
            overrides = {k: _field(k, v) for k, v in extra.items()}
            cfg = method_config(method, sparsity=s, nsamples=args.nsamples, seqlen=args.seqlen, **overrides)
            masks = None
            if args.masks_from:
                masks = sp.PrunePlan.load(plans / f"{args.masks_from}@{s}.json")
            holdout = None
            if needs_holdout(cfg):
                _, holdout = calibration_data(tok, cfg, holdout=True)
            t0 = time.perf_counter()
            res = sp.prune(model, cfg, calib_windows=calib, progress=False, holdout_windows=holdout, masks=masks)
            seconds = time.perf_counter() - t0
            ppl = sp.perplexity(res.model, ev, progress=False)
            results["cells"][key] = {
                "method": method + args.tag, "requested": s, "actual": res.plan.actual_sparsity,
                "perplexity": ppl, "params": res.plan.params_pruned, "prune_seconds": seconds,
                "time_ratio": seconds / ref, "config": cfg.to_dict(),
                "allocation": {k: v for k, v in res.plan.allocation.items() if k != "importance"},
                "kept": {"heads": [len(lp.kept_heads) for lp in res.plan.layers],
                         "neurons": [len(lp.kept_neurons) for lp in res.plan.layers]},
            }
            res.plan.save(plans / f"{key}.json")
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps(results, indent=1))
            os.replace(tmp, out)
            print(f"{key}: actual {res.plan.actual_sparsity:.3f} ppl {ppl:.2f} ({seconds:.0f} s, "
                  f"{seconds / ref:.1f}x dense fwd)", flush=True)
    print(render(results))
    return 0


def _field(name: str, text: str):
    """A --set value typed like the PruneConfig default ("false" is False for booleans)."""
    default = getattr(sp.PruneConfig(), name)
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise SystemExit(f"--set {name}={text}: expected true or false")
        return text.lower() in ("true", "1")
    return type(default)(text)


def render(results: dict) -> str:
    cells = results["cells"]
    methods = list(dict.fromkeys(c["method"] for c in cells.values()))
    levels = sorted({c["requested"] for c in cells.values()})
    lines = [f"Dense perplexity: {results['dense']['perplexity']:.2f} ({results['protocol']['eval']})", "",
             "| method | " + " | ".join(f"{s:.0%}" for s in levels) + " |",
             "|---|" + "---|" * len(levels)]
    for m in methods:
        row = []
        for s in levels:
            c = next((c for c in cells.values() if c["method"] == m and c["requested"] == s), None)
            row.append("-" if c is None else f"{c['perplexity']:.2f} (actual {c['actual']:.3f}, {c['time_ratio']:.1f}x)")
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
