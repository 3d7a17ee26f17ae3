"""Float32 vs float64 Gram sums for the least-squares re-fit, on real activations (issue 5).

Large statistics (one (n+1)^2 matrix above `GramAccumulator.float64_max_bytes`, e.g. OPT-6.7B's
FFN: 16,385^2) are summed in float32 to halve their memory. This checks what that costs on the
default model: SmolLM2-135M's o_proj and down_proj inputs over the calibration windows (PROTOCOL.md),
summed both ways, then the same re-fit (30% of the columns with the lowest Wanda-style scores
removed, damping 0.01) from each; prints the relative difference of the re-fit errors and weights.

    python benchmarks/gram_precision.py --nsamples 16 --seqlen 512
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from structprune.config import PruneConfig
from structprune.api import calibration_data
from structprune.io.resolve import load_model
from structprune.reconstruct.lstsq import refit_consumer
from structprune.stats import GramAccumulator

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--remove", type=float, default=0.3, help="fraction of columns removed before the re-fit")
    p.add_argument("--damp", type=float, default=0.01)
    p.add_argument("--out", default=str(RESULTS / "gram_precision.json"))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m")
    model.eval()
    windows = calibration_data(tok, PruneConfig.from_flat(nsamples=args.nsamples, seqlen=args.seqlen))
    mods = {}
    for i, layer in enumerate(model.model.layers):
        mods[f"{i}.o_proj"] = layer.self_attn.o_proj
        mods[f"{i}.down_proj"] = layer.mlp.down_proj
    accs = {k: {dt: GramAccumulator(m.in_features, dtype=dt) for dt in (torch.float64, torch.float32)}
            for k, m in mods.items()}
    def hook(key: str):
        def add(_m: torch.nn.Module, a: tuple) -> None:
            for acc in accs[key].values():
                acc.add_batch(a[0])
        return add

    handles = [m.register_forward_pre_hook(hook(k)) for k, m in mods.items()]
    t0 = time.perf_counter()
    with torch.no_grad():
        for s in range(0, windows.shape[0], args.batch):
            model(input_ids=windows[s:s + args.batch], use_cache=False)
    for h in handles:
        h.remove()
    rows = []
    for k, m in mods.items():
        a64, a32 = accs[k][torch.float64], accs[k][torch.float32]
        w = m.weight.detach().float()
        score = w.norm(dim=0) * a64.input_norm
        n = w.shape[1]
        keep = score.argsort(descending=True)[: n - int(args.remove * n)].sort().values
        w64, _, e64 = refit_consumer(w, None, a64, keep, args.damp)
        w32, _, e32 = refit_consumer(w, None, a32, keep, args.damp)
        rows.append({"module": k, "n": n, "error_none": e64["error_none"], "error_f64": e64["error"],
                     "error_f32": e32["error"], "rel_error_diff": abs(e32["error"] - e64["error"]) / e64["error"],
                     "rel_weight_diff": float((w32 - w64).norm() / w64.norm())})
    worst = max(r["rel_error_diff"] for r in rows)
    worst_w = max(r["rel_weight_diff"] for r in rows)
    for r in rows:
        print(f"{r['module']:>14}  error none {r['error_none']:.5g}  re-fit f64 {r['error_f64']:.6g}  "
              f"f32 {r['error_f32']:.6g}  rel diff {r['rel_error_diff']:.2e}  weights {r['rel_weight_diff']:.2e}")
    print(f"\nworst relative difference of the re-fit error: {worst:.2e}; of the weights: {worst_w:.2e} "
          f"({len(rows)} projections, {args.nsamples} x {args.seqlen} tokens, {time.perf_counter() - t0:.0f} s)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"protocol": vars(args) | {"model": "smollm2-135m", "calibration": "wiki calib split"},
                               "worst_rel_error_diff": worst, "worst_rel_weight_diff": worst_w, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
