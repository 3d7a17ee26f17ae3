"""Load a checkpoint, time one dense forward pass of the calibration set (the reference), then
prune it with the global Taylor baseline and print one `result={json}` line (benchmarks/memory.py).

    python benchmarks/_global_runner.py FOLDER --calib calib.txt --nsamples 4 --seqlen 256 --device cuda
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time

import torch

from structprune.api import calibration_data
from structprune.config import PruneConfig
from structprune.methods.global_taylor import prune_global
from structprune.io.resolve import load_model
from structprune.runtime.device import resolve_device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dense_forward_seconds(model: torch.nn.Module, windows: torch.Tensor, device: torch.device,
                          batch_size: int = 8) -> float:
    """One dense forward pass of the calibration set through the decoder on `device` (PROTOCOL.md
    reference); the model is moved there for the pass and back to the host after."""
    model.to(device)
    try:
        with torch.no_grad():
            base = model.base_model
            base(input_ids=windows[:1].to(device), use_cache=False)  # warm-up (kernels, allocator)
            _sync(device)
            t0 = time.perf_counter()
            for start in range(0, windows.shape[0], batch_size):
                base(input_ids=windows[start : start + batch_size].to(device), use_cache=False)
            _sync(device)
            return time.perf_counter() - t0
    finally:
        model.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()


def streamed_forward_seconds(folder: str, windows: torch.Tensor, device: torch.device, dtype: str,
                             batch_size: int = 8) -> float:
    """The same reference for a model larger than host memory: one dense forward pass of the
    calibration set, one decoder layer at a time from the safetensors files (embeddings plus
    every layer's forward on `device` with its outputs brought back to the host, as the pruning
    pipeline streams them; loading and copying the layers is not timed)."""
    from structprune.arch import get_adapter
    from structprune.runtime.hooks import calibration_mode
    from structprune.runtime.source import SafetensorsSource, skeleton
    from structprune.runtime.stream import LayerStream

    source = SafetensorsSource(folder, getattr(torch, dtype))
    model = skeleton(source)
    layers = get_adapter(model.config).decoder_layers(model)
    with torch.no_grad(), calibration_mode(model):
        t0 = time.perf_counter()
        stream = LayerStream.capture(model, layers, windows, batch_size, device, source.dtype)
        seconds = time.perf_counter() - t0
        for i in range(len(layers)):
            layer = stream.onload(source.layer(i))
            _sync(device)
            t0 = time.perf_counter()
            stream = stream.run(layer, i)  # the outputs come back to the host, as in the pipeline
            _sync(device)
            seconds += time.perf_counter() - t0
            del layer
    return seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--calib", required=True)
    p.add_argument("--sparsity", type=float, default=0.3)
    p.add_argument("--nsamples", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward+backward (default 1)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--reference-only", action="store_true", help="time the dense forward pass only")
    p.add_argument("--streamed", action="store_true",
                   help="with --reference-only: stream the reference forward one layer at a time (the whole "
                        "model is never loaded: for models larger than host memory)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    cfg = PruneConfig.from_flat(sparsity=args.sparsity, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                      batch_size=args.batch_size, calib=args.calib, device=args.device, dtype=args.dtype)
    device = resolve_device(args.device)
    if args.streamed:
        if not args.reference_only:
            raise SystemExit("--streamed needs --reference-only: the global baseline holds the whole model")
        from transformers import AutoTokenizer

        windows = calibration_data(AutoTokenizer.from_pretrained(args.model), cfg)
        result: dict = {"reference_forward_seconds": streamed_forward_seconds(args.model, windows, device, args.dtype),
                        "reference": "streamed", "device": str(device), "dtype": args.dtype}
        result["host_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print("result=" + json.dumps(result), flush=True)
        return 0
    model, tok = load_model(args.model, args.dtype)
    windows = calibration_data(tok, cfg)
    result = {"reference_forward_seconds": dense_forward_seconds(model, windows, device),
              "device": str(device), "dtype": args.dtype}
    if not args.reference_only:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        pruned, plan = prune_global(model, windows, cfg, progress=False)
        _sync(device)
        result.update(prune_seconds=time.perf_counter() - t0, actual_sparsity=plan.actual_sparsity,
                      gradient_seconds=plan.timing["gradient_seconds"])
        if device.type == "cuda":
            result["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device)
    result["host_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("result=" + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
