"""Does the GGUF export run the same model in stock llama.cpp? Perplexity and a greedy continuation
of a (pruned) model in transformers and in llama.cpp (llama-cpp-python), both in float32.

    python benchmarks/gguf_parity.py out/smollm2-135m-0.3 --windows 64

Perplexity follows PROTOCOL.md (wiki eval split, first N windows of 512 tokens, float32); both
runtimes score the same token ids (llama.cpp: F32 weights and F32 KV cache, one window per
fresh cache). The continuation: the same prompt, tokenized by each runtime's own tokenizer
(checked equal), 32 greedy tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from structprune.api import evaluate_perplexity
from structprune.data import eval_windows, load_text, tokenize
from structprune.io.gguf_export import export_gguf
from structprune.io.resolve import ALIASES, BUILTIN, builtin_gguf, load_model

RESULTS = Path(__file__).parent / "results"
PROMPT = "The capital of France is"


def llamacpp_perplexity(llm, windows: torch.Tensor) -> float:
    nll, count = 0.0, 0
    for w in windows.tolist():
        llm.reset()
        llm.eval(w)
        logits = np.asarray(llm.scores[: len(w) - 1], dtype=np.float64)
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        nll += float((logz - logits[np.arange(len(w) - 1), w[1:]]).sum())
        count += len(w) - 1
    return math.exp(nll / count)


def llamacpp_greedy(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a structprune output folder (or any MODEL)")
    p.add_argument("--tokenizer-from", default="smollm2-135m")
    p.add_argument("--windows", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS / "gguf_parity.json"))
    args = p.parse_args(argv)
    import llama_cpp

    key = ALIASES.get(args.tokenizer_from.lower(), args.tokenizer_from.lower())
    tok_from = builtin_gguf(key) if key in BUILTIN else Path(args.tokenizer_from)
    model, tok = load_model(args.model, "float32")
    windows = eval_windows(tokenize(tok, load_text("wiki", split="eval")), args.seqlen, args.windows)
    t0 = time.perf_counter()
    ppl_hf = evaluate_perplexity(model, tok, seqlen=args.seqlen, windows=args.windows, device="cpu")
    t_hf = time.perf_counter() - t0
    prompt_ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        gen = model.generate(torch.tensor([prompt_ids]), max_new_tokens=args.new_tokens, do_sample=False,
                             min_new_tokens=args.new_tokens, pad_token_id=tok.eos_token_id)
    cont_hf = gen[0, len(prompt_ids):].tolist()
    with tempfile.TemporaryDirectory(prefix="gguf_parity-") as tmp:
        report = export_gguf(model, tok, Path(tmp) / "model-f32.gguf", dtype="f32", tokenizer_from=tok_from)
        llm = llama_cpp.Llama(report.path, n_ctx=args.seqlen, n_batch=args.seqlen, logits_all=True,
                              type_k=0, type_v=0, n_threads=args.threads, verbose=False)
        prompt_cpp = llm.tokenize(PROMPT.encode(), add_bos=False, special=False)
        t0 = time.perf_counter()
        ppl_cpp = llamacpp_perplexity(llm, windows)
        t_cpp = time.perf_counter() - t0
        cont_cpp = llamacpp_greedy(llm, prompt_ids, args.new_tokens)
        llm.close()
    rel = abs(ppl_cpp - ppl_hf) / ppl_hf
    result = {"model": str(args.model), "llama_cpp_python": llama_cpp.__version__, "arch": report.arch,
              "layers": report.layers, "tokenizer": report.tokenizer,
              "eval": f"wiki eval split, {windows.shape[0]} x {args.seqlen} tokens, float32 (llama.cpp: F32 weights, "
                      "F32 KV cache)",
              "perplexity_transformers": round(ppl_hf, 4), "perplexity_llamacpp": round(ppl_cpp, 4),
              "relative_difference": round(rel, 6), "seconds_transformers": round(t_hf, 1),
              "seconds_llamacpp": round(t_cpp, 1), "prompt": PROMPT,
              "prompt_tokens_equal": prompt_cpp == prompt_ids,
              "greedy_transformers": cont_hf, "greedy_llamacpp": cont_cpp, "greedy_equal": cont_hf == cont_cpp,
              "greedy_text": tok.decode(cont_hf)}
    print(json.dumps({k: v for k, v in result.items() if k != "layers"}, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
