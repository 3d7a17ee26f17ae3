"""Inference speed of a pruned model against its dense original (PROTOCOL.md: ratios, same run).

    python benchmarks/speed.py out/smollm2-135m-0.3            # pruned folder; dense = built-in model

Measures, on the same device in one process, interleaved to share the machine's noise:
prefill (one forward of batch x seqlen tokens) and greedy decoding (tokens/s).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from structprune.loading import load_model

RESULTS = Path(__file__).parent / "results"


def _time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pruned")
    p.add_argument("--dense", default="smollm2-135m")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(RESULTS / "speed.json"))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    dense, tok = load_model(args.dense)
    pruned, _ = load_model(args.pruned)
    ids = torch.randint(0, dense.config.vocab_size, (args.batch, args.seqlen))
    prompt = ids[:, :16]
    rows = {}
    models = (("dense", dense), ("pruned", pruned))
    times: dict[str, dict[str, list[float]]] = {n: {"prefill": [], "decode": []} for n, _ in models}
    with torch.no_grad():
        for _, m in models:  # warm-up
            m(input_ids=ids, use_cache=False)
        for _ in range(args.repeats):  # interleaved, so both see the same machine noise
            for name, m in models:
                times[name]["prefill"].append(_time(lambda: m(input_ids=ids, use_cache=False), 1))
                times[name]["decode"].append(_time(lambda: m.generate(
                    prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                    pad_token_id=tok.eos_token_id), 1))
    for name, m in models:
        rows[name] = {"params": sum(x.numel() for x in m.parameters()),
                      "prefill_s": statistics.median(times[name]["prefill"]),
                      "decode_tokens_per_s": args.batch * args.new_tokens / statistics.median(times[name]["decode"])}
    rows["prefill_speedup"] = rows["dense"]["prefill_s"] / rows["pruned"]["prefill_s"]
    rows["decode_speedup"] = rows["pruned"]["decode_tokens_per_s"] / rows["dense"]["decode_tokens_per_s"]
    rows["setup"] = {"device": "cpu", "threads": torch.get_num_threads(), "batch": args.batch,
                     "seqlen": args.seqlen, "new_tokens": args.new_tokens, "pruned": args.pruned}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    print("| model | params | prefill (s, %dx%d) | decode tokens/s |" % (args.batch, args.seqlen))
    print("|---|---|---|---|")
    for name in ("dense", "pruned"):
        r = rows[name]
        print(f"| {name} | {r['params']:,} | {r['prefill_s']:.3f} | {r['decode_tokens_per_s']:.1f} |")
    print(f"\nspeedup: prefill {rows['prefill_speedup']:.2f}x, decode {rows['decode_speedup']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
