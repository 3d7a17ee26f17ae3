"""Cost of the sensitivity allocation against depth: exact (quadratic) vs linear, counted.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/sensitivity_cost.py \
        --json benchmarks/results/sensitivity_cost.json

Random-weight OPT-shaped models (benchmarks/opt_shapes.py configs, a tiny hidden size: only the
counts matter) of 12 / 24 / 32 / 48 layers, FFN only at 30% (the default fractions per module,
0.5 / 1 / 1.5 x the sparsity, as `--modules mlp`). Hooks on the model's own decoder layers and head count every call (one call
= one batch; one calibration batch and one held-back batch here, so a call is a layer pass over
all the held-back or calibration windows) in `sensitivity.exact.measure` and
`sensitivity.linear.measure`; the most decoder-layer copies alive at any layer call is tracked
too (the host originals are never run: every rule runs device copies). Seconds are reported
but are not the point.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import weakref
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from opt_shapes import opt_config  # noqa: E402

from structprune.sensitivity import exact, linear  # noqa: E402
from structprune.arch import get_adapter  # noqa: E402
from structprune.config import PruneConfig  # noqa: E402
from structprune.allocation.budget import prunable_keys, prunable_sparsity  # noqa: E402
from structprune.sensitivity import fractions  # noqa: E402
from structprune.runtime.hooks import calibration_mode  # noqa: E402
from structprune.runtime.stream import LayerStream  # noqa: E402


def count_run(n_layers: int, rule, hidden_size: int, seqlen: int, n_calib: int, n_hold: int) -> dict:
    from transformers import AutoModelForCausalLM

    cfg = opt_config("125m", hidden_size=hidden_size, num_hidden_layers=n_layers, num_attention_heads=4,
                     ffn_dim=4 * hidden_size, max_position_embeddings=seqlen)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    ad = get_adapter(model.config)
    layers = ad.decoder_layers(model)
    config = PruneConfig.from_flat(sparsity=0.3, nsamples=n_calib, seqlen=seqlen, batch_size=max(n_calib, n_hold),
                         device="cpu", allocation="sensitivity", prune_attention=False)
    keys = prunable_keys(config, ad)
    removed = fractions(prunable_sparsity(config, ad), config.max_layer_sparsity,
                        config.allocation.sensitivity_max_step)
    counts = {"layer": 0, "head": 0, "max_live_layers": 0}
    live: weakref.WeakSet = weakref.WeakSet()

    def layer_hook(module, _args):
        counts["layer"] += 1
        live.add(module)
        counts["max_live_layers"] = max(counts["max_live_layers"], len(live))

    def head_hook(_module, _args):
        counts["head"] += 1

    handles = [l.register_forward_pre_hook(layer_hook) for l in layers]
    handles.append(model.get_output_embeddings().register_forward_pre_hook(head_hook))
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(0, cfg.vocab_size, (n_calib, seqlen), generator=g)
    hold_ids = torch.randint(0, cfg.vocab_size, (n_hold, seqlen), generator=g)
    try:
        with calibration_mode(model):
            stream = LayerStream.capture(model, layers, calib, config.batch_size)
            hold = LayerStream.capture(model, layers, hold_ids, config.batch_size)
            counts.update(layer=0, head=0)
            t0 = time.perf_counter()
            rule.measure(config, ad, model, lambda i: layers[i], stream, hold, hold_ids, keys, removed, progress=False)
            seconds = time.perf_counter() - t0
    finally:
        for h in handles:
            h.remove()
    return {"layer_forwards": counts["layer"], "head_calls": counts["head"],
            "max_live_layer_copies": counts["max_live_layers"], "candidates_per_layer": len(removed),
            "vocab_size": cfg.vocab_size, "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depths", default="12,24,32,48")
    ap.add_argument("--hidden-size", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=32)
    ap.add_argument("--calib", type=int, default=4, help="calibration windows (one batch)")
    ap.add_argument("--holdout", type=int, default=2, help="held-back windows (one batch)")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    rows = []
    for n in [int(d) for d in args.depths.split(",")]:
        for name, rule in (("exact", exact), ("linear", linear)):
            r = count_run(n, rule, args.hidden_size, args.seqlen, args.calib, args.holdout)
            rows.append({"layers": n, "rule": name, **r})
            print(f"L={n:3d} {name:6s} layer forwards {r['layer_forwards']:6d}  head calls {r['head_calls']:5d}  "
                  f"max live layer copies {r['max_live_layer_copies']}  {r['seconds']:.1f} s", flush=True)
    c = rows[0]["candidates_per_layer"]
    result = {
        "setting": {"shape": f"OPT-shaped, random weights, hidden {args.hidden_size}, ffn {4 * args.hidden_size}, "
                             "4 heads, vocab 50272", "modules": "mlp", "sparsity": 0.3,
                    "candidates_per_layer": c, "calibration_windows": args.calib, "holdout_windows": args.holdout,
                    "seqlen": args.seqlen,
                    "count": "decoder-layer calls (one per batch; one batch per stream) and head calls, by hooks"},
        "formulas": {"exact": "L (calibration) + L (held-back dense) + c * L(L+1)/2 (candidates and their tails)",
                     "linear": "L (held-back dense) + L (recompute for the backward) + L (calibration) + "
                               "L (held-back dense beside it) = 4 L; each candidate is one consumer-sized product "
                               "on the held-back tokens, no layer run",
                     "head_exact": "held-back windows x (c L + 1)",
                     "head_linear": "held-back windows (one forward and backward each)"},
        "rows": rows,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
