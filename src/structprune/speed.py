"""Inference speed of a pruned model against its dense original, in transformers (PROTOCOL.md).

    structprune bench speed out/smollm2-135m-0.3 --batch 1 8

For every device (cpu, and cuda when present) and batch size, in one process, dense and pruned runs
are interleaved (A B A B ...) so both see the same machine noise; the figures are medians:

    prefill   one forward of batch x seqlen tokens without cache         -> tokens/s
    decode    greedy generation with the KV cache: the time of `new_tokens` steps minus the time of
              one step (that one step is the prompt's prefill), per generated token -> tokens/s

Each speed is reported as a ratio to dense, next to the ratio of matrix-multiply work per token
(weights of every Linear, the LM head included, embeddings excluded): what a perfect kernel would give.
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any, Callable

import torch
from torch import nn

from .surgery import is_transposed

log = logging.getLogger(__name__)


def matmul_weights(model: nn.Module) -> int:
    """Weights that multiply every token's activations: each Linear (and GPT-2 Conv1D), the LM head too."""
    total = 0
    for module in model.modules():
        if isinstance(module, nn.Linear) or is_transposed(module):
            total += module.weight.numel()
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _generate(model: nn.Module, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=steps,
                          min_new_tokens=steps, do_sample=False, pad_token_id=0)


def measure(models: dict[str, nn.Module], device: torch.device, batch: int, seqlen: int, prompt_len: int,
            new_tokens: int, repeats: int, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Interleaved timings of each model at one batch size: {name: {prefill_tokens_per_s,
    decode_tokens_per_s, ...}} with medians over `repeats` and every sample kept."""
    if new_tokens < 2:
        raise ValueError(f"new_tokens={new_tokens} is too small: decode is timed as new_tokens - 1 steps")
    vocab = min(int(m.config.vocab_size) for m in models.values())
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seqlen), generator=g).to(device)
    prompt = ids[:, :prompt_len]
    samples: dict[str, dict[str, list[float]]] = {n: {"prefill": [], "one": [], "all": []} for n in models}
    with torch.inference_mode():
        for m in models.values():  # warm-up (allocator, kernels, caches)
            m(input_ids=ids, use_cache=False)
            out = _generate(m, prompt, new_tokens)
            if out.shape[1] != prompt_len + new_tokens:
                raise RuntimeError(f"generation stopped early: {out.shape[1] - prompt_len} of {new_tokens} tokens")
        for _ in range(repeats):
            for name, m in models.items():
                samples[name]["prefill"].append(_timed(lambda: m(input_ids=ids, use_cache=False), device))
                samples[name]["one"].append(_timed(lambda: _generate(m, prompt, 1), device))
                samples[name]["all"].append(_timed(lambda: _generate(m, prompt, new_tokens), device))
    rows: dict[str, dict[str, Any]] = {}
    for name, s in samples.items():
        prefill = statistics.median(s["prefill"])
        decode = max(statistics.median(s["all"]) - statistics.median(s["one"]), 1e-9)
        rows[name] = {"prefill_tokens_per_s": batch * seqlen / prefill,
                      "decode_tokens_per_s": batch * (new_tokens - 1) / decode,
                      "prefill_s": s["prefill"], "generate_1_s": s["one"], f"generate_{new_tokens}_s": s["all"]}
    return rows


def default_devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def run_speed(pruned: str, dense: str, batches: list[int], devices: list[str], seqlen: int = 512,
              prompt_len: int = 32, new_tokens: int = 32, repeats: int = 5, dtype: str = "float32",
              echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Dense vs pruned prefill and decode speed for every device and batch size (see module doc)."""
    from .io.resolve import load_model
    from .methods.output import decoder_linear_params
    from .arch import get_adapter

    models = {"dense": load_model(dense, dtype)[0], "pruned": load_model(pruned, dtype)[0]}
    weights = {n: matmul_weights(m) for n, m in models.items()}
    adapter = get_adapter(models["dense"].config)
    decoder = {n: decoder_linear_params(m, get_adapter(m.config)) for n, m in models.items()}
    result: dict[str, Any] = {
        "setup": {"pruned": pruned, "dense": dense, "dtype": dtype, "seqlen": seqlen, "prompt_len": prompt_len,
                  "new_tokens": new_tokens, "repeats": repeats, "threads": torch.get_num_threads(),
                  "torch": torch.__version__, "model_type": adapter.config.model_type,
                  "method": __doc__.strip().splitlines()[0]},
        "params": {n: sum(p.numel() for p in m.parameters()) for n, m in models.items()},
        "matmul_weights": weights,
        "matmul_flops_ratio": weights["pruned"] / weights["dense"],
        "decoder_linear_kept": decoder["pruned"] / decoder["dense"],
        "runs": [],
    }
    echo(f"matmul work per token, pruned / dense: {result['matmul_flops_ratio']:.3f} "
         f"(decoder linear weights kept {result['decoder_linear_kept']:.3f})")
    echo("| device | batch | dense prefill tok/s | pruned | ratio | dense decode tok/s | pruned | ratio |")
    echo("|---|---|---|---|---|---|---|---|")
    for device_name in devices:
        device = torch.device(device_name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but torch sees no CUDA device")
        for m in models.values():
            m.to(device).eval()
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        for batch in batches:
            rows = measure(models, device, batch, seqlen, prompt_len, new_tokens, repeats)
            d, p = rows["dense"], rows["pruned"]
            run = {"device": device_name, "device_name": name, "batch": batch, **{k: rows[k] for k in rows},
                   "prefill_ratio": p["prefill_tokens_per_s"] / d["prefill_tokens_per_s"],
                   "decode_ratio": p["decode_tokens_per_s"] / d["decode_tokens_per_s"]}
            result["runs"].append(run)
            echo(f"| {device_name} | {batch} | {d['prefill_tokens_per_s']:.0f} | {p['prefill_tokens_per_s']:.0f} | "
                 f"{run['prefill_ratio']:.2f}x | {d['decode_tokens_per_s']:.1f} | {p['decode_tokens_per_s']:.1f} | "
                 f"{run['decode_ratio']:.2f}x |")
        for m in models.values():
            m.to("cpu")
    return result


def add_speed_options(p: Any) -> None:
    p.add_argument("pruned", help="a pruned folder (any per-layer shapes)")
    p.add_argument("--dense", default="smollm2-135m", help="the dense reference MODEL (default smollm2-135m)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes (default 1 8)")
    p.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda when present")
    p.add_argument("--seqlen", type=int, default=512, help="prefill tokens per sequence (default 512)")
    p.add_argument("--prompt-len", type=int, default=32, help="decode: prompt tokens (default 32)")
    p.add_argument("--new-tokens", type=int, default=32, help="decode: generated tokens (default 32)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved repetitions; medians (default 5)")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16")
    p.add_argument("--out", default=None, help="result JSON (default benchmarks/results/speed_<folder>.json)")
