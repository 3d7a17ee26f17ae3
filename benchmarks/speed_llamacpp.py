"""Inference speed in stock llama.cpp (llama-cpp-python, CPU): a pruned model against its dense
original, both exported by `structprune export --format gguf` (PROTOCOL.md: ratios, same run).

    python benchmarks/speed_llamacpp.py out/smollm2-135m-0.3            # dense = built-in SmolLM2

For each weight type (F16, Q8_0 by default) both models are exported with the same code, loaded
side by side, and timed in interleaved repetitions: prefill (one batch of --prompt tokens from an
empty cache) and decode (--gen single-token steps after that prompt). Medians; tokens/s and the
pruned / dense ratio. Token ids are fixed random ids (speed does not depend on them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from structprune.io.gguf_export import export_model

RESULTS = Path(__file__).parent / "results"


def _tokens_per_s(llm, prompt: list[int], gen: list[int]) -> tuple[float, float]:
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    for t in gen:
        llm.eval([t])
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), len(gen) / (t2 - t1)


def _row(files: dict, times: dict) -> dict:
    """One dtype's table row: file size, median tokens/s per model, pruned/dense ratios."""
    row = {}
    for n in times:  # the models' names, in order
        row[n] = {"file_mb": round(files[n].size_bytes / 1e6, 2), "arch": files[n].arch,
                  "prefill_tok_s": round(statistics.median(times[n]["prefill"]), 1),
                  "decode_tok_s": round(statistics.median(times[n]["decode"]), 1),
                  "prefill_runs": [round(x, 1) for x in times[n]["prefill"]],
                  "decode_runs": [round(x, 1) for x in times[n]["decode"]]}
        if files[n].quantizer:
            row[n]["kept_out_of_q8_0"] = len(files[n].fallback)
    row["ratio_pruned_over_dense"] = {
        k: round(row["pruned"][f"{k}_tok_s"] / row["dense"][f"{k}_tok_s"], 3) for k in ("prefill", "decode")}
    row["size_ratio"] = round(files["pruned"].size_bytes / files["dense"].size_bytes, 3)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pruned", help="a structprune output folder")
    p.add_argument("--dense", default="smollm2-135m")
    p.add_argument("--tokenizer-from", default="smollm2-135m",
                   help="GGUF (or built-in name) whose tokenizer both exports carry")
    p.add_argument("--dtypes", nargs="+", default=["f16", "q8_0"], choices=["f32", "f16", "q8_0"])
    p.add_argument("--prompt", type=int, default=256, help="prefill tokens")
    p.add_argument("--gen", type=int, default=64, help="decode steps")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS / "speed_llamacpp.json"))
    args = p.parse_args(argv)
    import llama_cpp

    from structprune.io.resolve import ALIASES, BUILTIN, builtin_gguf

    key = ALIASES.get(args.tokenizer_from.lower(), args.tokenizer_from.lower())
    tok_from = builtin_gguf(key) if key in BUILTIN else Path(args.tokenizer_from)
    rng = np.random.default_rng(0)
    result = {"pruned": str(args.pruned), "dense": args.dense, "llama_cpp_python": llama_cpp.__version__,
              "threads": args.threads, "prompt_tokens": args.prompt, "decode_tokens": args.gen,
              "repeats": args.repeats, "cpu": platform.processor() or platform.machine(),
              "os_cpu_count": os.cpu_count(), "kv_cache": "F16 (llama.cpp default)", "by_dtype": {}}
    with tempfile.TemporaryDirectory(prefix="speed_llamacpp-") as tmp:
        for dtype in args.dtypes:
            files = {}
            for name, spec in (("dense", args.dense), ("pruned", args.pruned)):
                rep = export_model(spec, Path(tmp) / f"{name}-{dtype}.gguf", dtype=dtype, tokenizer_from=tok_from)
                files[name] = rep
            models = {n: llama_cpp.Llama(r.path, n_ctx=args.prompt + args.gen + 8, n_batch=args.prompt,
                                         n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
                      for n, r in files.items()}
            n_vocab = models["dense"].n_vocab()
            prompt = rng.integers(0, n_vocab, args.prompt).tolist()
            gen = rng.integers(0, n_vocab, args.gen).tolist()
            times = {n: {"prefill": [], "decode": []} for n in models}
            for m in models.values():  # warm-up
                _tokens_per_s(m, prompt[:32], gen[:4])
            for _ in range(args.repeats):  # interleaved: both models see the same machine noise
                for n, m in models.items():
                    pf, dc = _tokens_per_s(m, prompt, gen)
                    times[n]["prefill"].append(pf)
                    times[n]["decode"].append(dc)
            for m in models.values():
                m.close()
            row = _row(files, times)
            result["by_dtype"][dtype] = row
            print(f"{dtype:>5}: prefill {row['dense']['prefill_tok_s']:8.1f} -> {row['pruned']['prefill_tok_s']:8.1f} "
                  f"tok/s (x{row['ratio_pruned_over_dense']['prefill']}), decode {row['dense']['decode_tok_s']:7.1f} -> "
                  f"{row['pruned']['decode_tok_s']:7.1f} tok/s (x{row['ratio_pruned_over_dense']['decode']}), "
                  f"file x{row['size_ratio']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
