"""Dense perplexity of one model on the protocol's evaluation texts (PROTOCOL.md), saved as JSON.

    python benchmarks/dense_perplexity.py gemma3-270m --texts wiki pydoc \
        --out benchmarks/results/dense_gemma3_270m.json

A text whose source is missing (pydoc needs Debian's python3.11-doc) is recorded as skipped, with why.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path

import structprune as sp
from structprune.io.builtin import sha256_file
from structprune.modelfiles import gguf_file


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a MODEL argument of structprune (built-in name, .gguf, folder)")
    ap.add_argument("--texts", nargs="+", default=["wiki", "pydoc"])
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    t0 = time.perf_counter()
    model, tok = sp.load_model(args.model, dtype=args.dtype)
    cfg = model.config
    gguf = gguf_file(args.model)
    record = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "model": args.model,
        "gguf_sha256": sha256_file(gguf) if gguf is not None else None,
        "model_type": cfg.model_type,
        "layers": cfg.num_hidden_layers,
        "heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads,
        "vocab": cfg.vocab_size,
        "params": sum(p.numel() for p in model.parameters()),
        "dtype": args.dtype, "seqlen": args.seqlen, "windows": args.windows,
        "load_s": round(time.perf_counter() - t0, 1),
        "perplexity": {}, "skipped": {}, "eval_s": {},
    }
    for text in args.texts:
        t1 = time.perf_counter()
        try:
            ppl = sp.evaluate_perplexity(model, tok, data=text, seqlen=args.seqlen,
                                         windows=args.windows, device=args.device, progress=False)
        except FileNotFoundError as e:
            record["skipped"][text] = str(e)
            continue
        record["perplexity"][text] = round(float(ppl), 4)
        record["eval_s"][text] = round(time.perf_counter() - t1, 1)
        print(f"{args.model} {text}: perplexity {ppl:.4f} ({args.windows} x {args.seqlen}, {args.dtype})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
