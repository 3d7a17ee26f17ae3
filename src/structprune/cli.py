"""Command line: parse -> config -> API. No pruning logic lives here."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from .config import ALLOCATIONS, LAYER_IMPORTANCE, RECONSTRUCTIONS, SCORERS, SELECTIONS, SENSITIVITIES, TARGETS

log = logging.getLogger("structprune")
DEFAULT_MODEL = "smollm2-135m"


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16 or auto")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO (default), WARNING")


def _add_prune_options(p: argparse.ArgumentParser, sparsity: float = 0.3, nsamples: int = 64) -> None:
    from .methods import METHODS

    p.add_argument("--sparsity", type=float, default=sparsity,
                   help=f"ACTUAL fraction of decoder linear weights to remove, in [0, 0.95] (default {sparsity})")
    p.add_argument("--calib", default="wiki",
                   help="calibration text: wiki (built in), a .txt/.jsonl file, wikitext2, ptb or c4")
    p.add_argument("--nsamples", type=int, default=nsamples, help=f"calibration windows (default {nsamples})")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window (default 512)")
    p.add_argument("--seed", type=int, default=0, help="seed for calibration offsets (default 0)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration windows per device batch")
    p.add_argument("--chunk-tokens", type=int, default=None,
                   help="device memory knob: at most this many calibration tokens on the compute device at "
                        "once (batches are cut to max(1, N // seqlen) windows; ADMM works on its FFN buffers "
                        "in chunks of N tokens). Default 8192; lower it to trade speed for memory")
    p.add_argument("--method", default="structprune", choices=sorted(METHODS), help="named preset")
    p.add_argument("--scorer", choices=SCORERS, default=None, help="unit importance (overrides the method)")
    p.add_argument("--modules", choices=("both", "mlp", "attention"), default=None,
                   help="which units may go: both (heads and FFN neurons, default), mlp (FFN neurons only) or "
                        "attention (heads only)")
    p.add_argument("--selection", choices=SELECTIONS, default=None,
                   help="which units a module keeps: score (top scores, default) or obs (reconstruction-aware "
                        "greedy Optimal Brain Surgeon on the Gram matrix; needs a re-fit)")
    p.add_argument("--allocation", choices=ALLOCATIONS, default=None, help="per-layer budget rule")
    p.add_argument("--sensitivity", choices=SENSITIVITIES, default=None,
                   help="allocation sensitivity: exact (each candidate through every later layer, quadratic in "
                        "depth; default) or linear (second-order estimate from one backward pass)")
    p.add_argument("--reconstruction", choices=RECONSTRUCTIONS, default=None, help="weight re-fit")
    p.add_argument("--temperature", default=None,
                   help="softmax allocation temperature: auto (search on held-back calibration data), a number, "
                        "or a multiple of the score scale such as 0.1x")
    p.add_argument("--layer-importance", choices=LAYER_IMPORTANCE, default=None,
                   help="softmax rules: compare layers by raw scores, relative to the residual stream's RMS, or "
                        "robust: relative to its median token RMS (blind to massive activations)")
    p.add_argument("--rho", default=None,
                   help="attention pruning ratio relative to MLP (uniform, softmax-modular): auto (default) or a number "
                        ">= 0; 0 prunes only FFN neurons")
    p.add_argument("--gamma", type=float, default=None, help="softmax-modular: depth decay (>0 prunes deeper layers more)")
    p.add_argument("--max-layer-sparsity", type=float, default=None, help="cap on any module's sparsity (default 0.9)")
    p.add_argument("--admm-iters", type=int, default=None, help="ADMM iterations (reconstruction admm)")
    p.add_argument("--admm-alpha", type=float, default=None, help="ADMM producer-fit penalty")
    p.add_argument("--admm-beta", type=float, default=None, help="ADMM output-fit penalty")
    p.add_argument("--admm-gamma", type=float, default=None, help="ADMM activation-consistency penalty")
    p.add_argument("--admm-sgd-steps", type=int, default=None,
                   help="ADMM producer update by this many gradient steps instead of the Cholesky solve (0)")
    p.add_argument("--admm-attn-steps", type=int, default=None,
                   help="ADMM on attention: value-projection gradient steps per iteration, alternating with the "
                        "output projection's least squares (default 10; 0: output projection re-fit only)")
    p.add_argument("--target", choices=TARGETS, default=None,
                   help="re-fit target: local (dense layer on the pruned inputs, default), dense (dense-model "
                        "consumer outputs) or residual (MLP output that puts the layer back on the dense model's "
                        "residual stream)")
    p.add_argument("--target-mix", type=float, default=None,
                   help="target residual: its weight against the local target, in [0, 1] (default 1)")
    p.add_argument("--round-to", type=int, default=None,
                   help="keep a multiple of N FFN neurons in every layer (hardware-friendly shapes, e.g. 64 or "
                        "128); heads are unaffected, and the rounding is carried over layers so the actual "
                        "sparsity still meets --sparsity. Default 1 (no rounding)")
    p.add_argument("--out", default=None, help="output folder for the pruned model")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run of the same command (its finished layers are kept beside --out)")


def _config(args: argparse.Namespace) -> Any:
    from .methods import method_config

    modules = getattr(args, "modules", None)
    kinds = {} if modules in (None, "both") else {"prune_attention": modules == "attention",
                                                  "prune_mlp": modules == "mlp"}

    return method_config(
        args.method, sparsity=args.sparsity, calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen,
        seed=args.seed, batch_size=args.batch_size, scorer=args.scorer, selection=args.selection, allocation=args.allocation,
        reconstruction=args.reconstruction, target=args.target, target_mix=args.target_mix, device=args.device,
        dtype=args.dtype,
        temperature=args.temperature, rho=args.rho, gamma=args.gamma, max_layer_sparsity=args.max_layer_sparsity,
        admm_iters=args.admm_iters, admm_alpha=args.admm_alpha, admm_beta=args.admm_beta, admm_gamma=args.admm_gamma,
        admm_sgd_steps=args.admm_sgd_steps, admm_attn_steps=args.admm_attn_steps, layer_importance=args.layer_importance,
        chunk_tokens=args.chunk_tokens, sensitivity=getattr(args, "sensitivity", None),
        round_to=getattr(args, "round_to", None), **kinds)


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def cmd_prune(args: argparse.Namespace, evaluate: bool = False) -> int:
    import torch

    from . import api, distributed, io, preflight
    from .io.resolve import load_model, open_for_pruning
    from .streaming import resolve_device

    config = _config(args)
    evaluate = evaluate and distributed.rank() == 0  # under torchrun rank 0 evaluates; the others only prune
    if args.out is None:
        raise ValueError("--out is required: the folder to write the pruned model to")
    preflight.before_prune(args, config)  # everything checkable before loading (preflight.py)
    io.check_output_dir(args.out, args.overwrite)
    model, tok = open_for_pruning(args.model, config.dtype)
    if tok is None:
        raise ValueError(f"{args.model} has no usable tokenizer files (missing or unreadable); save the model's "
                         "tokenizer into that folder")
    preflight.after_load(args, config, model, tok)
    # one draw: calibration and held-back windows never overlap (data.split_windows)
    windows, holdout = api.calibration_data(tok, config, holdout=True)
    dense_ppl = pruned_ppl = None
    ev = dict(data=args.data, seqlen=args.eval_seqlen, windows=args.windows, device=args.device,
              progress=not args.no_progress) if evaluate else {}
    if evaluate:
        dense = model if isinstance(model, torch.nn.Module) else load_model(args.model, config.dtype)[0]
        dense_ppl = api.evaluate_perplexity(dense, tok, **ev)
        del dense
    # Layer-wise runs write each layer to the output as soon as it is pruned (and, unless the
    # pruned model is evaluated afterwards, free it); the folder appears atomically at the end.
    sink = (distributed.rank_sink(lambda: io.ShardWriter(args.out, args.overwrite, release=not evaluate,
                                                         resume=args.resume))  # torchrun: rank 0 writes
            if config.scope == "layer" else None)
    try:
        t0 = time.perf_counter()
        result = api.prune(model, config, tokenizer=tok, calib_windows=windows, progress=not args.no_progress,
                           holdout_windows=holdout, sink=sink)
        seconds = time.perf_counter() - t0
        if evaluate:
            pruned_ppl = api.evaluate_perplexity(result.model, tok, **ev)
            result.plan.timing.update({"perplexity_dense": dense_ppl, "perplexity_pruned": pruned_ppl})
        if sink is not None:
            from .source import layers_prefix

            sink.finish(result.model, result.plan, layers_prefix(result.model), tokenizer=tok)
        else:
            io.save_pruned(result.model, result.plan, args.out, tokenizer=tok, overwrite=args.overwrite)
    except BaseException:
        if sink is not None:
            sink.abort()
        raise
    if distributed.rank() != 0:
        return 0
    plan = result.plan
    rows = [
        ("model", args.model),
        ("method", f"{args.method} (scorer {config.scorer}, allocation {config.allocation}, "
                   f"reconstruction {config.reconstruction})"),
        ("calibration", f"{config.calib}: {config.nsamples} x {config.seqlen} tokens, seed {config.seed}"),
        ("parameters (all)", f"{plan.params_dense:,} -> {plan.params_pruned:,}"),
        ("decoder linear weights", f"{plan.decoder_params_dense:,} -> {plan.decoder_params_pruned:,}"),
        ("sparsity", f"actual {plan.actual_sparsity:.4f} (requested {config.sparsity})"),
        ("pruning time", f"{seconds:.1f} s on {resolve_device(args.device)}"),
    ]
    if evaluate:
        rows.append((f"perplexity ({args.data} eval, {args.windows} x {args.eval_seqlen}, fp32)",
                     f"{dense_ppl:.2f} -> {pruned_ppl:.2f}"))
    rows.append(("saved to", str(Path(args.out).resolve())))
    print(_table(rows))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from . import api, preflight
    from .io.resolve import load_model

    if args.tasks:  # lm-eval tasks: no perplexity text or windows to check
        return cmd_tasks(args)
    preflight.before_eval(args.model, args.seqlen, args.windows, args.device)
    model, tok = load_model(args.model, args.dtype)
    preflight.check_context(model.config, args.seqlen, "--seqlen")
    ppl = api.evaluate_perplexity(model, tok, data=args.data, seqlen=args.seqlen, windows=args.windows,
                                  device=args.device, progress=not args.no_progress)
    print(_table([("model", args.model), ("data", f"{args.data} (eval split)"),
                  ("windows", f"{args.windows} x {args.seqlen} tokens, {args.dtype}"),
                  ("perplexity", f"{ppl:.3f}")]))
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    """`eval --tasks`: lm-evaluation-harness tasks on the loaded model (harness.run_tasks), a metric table."""
    from . import preflight
    from .bench import write_atomic
    from .harness import run_tasks
    from .io.resolve import load_model
    from .modelfiles import check_model_spec
    from .streaming import resolve_device

    preflight.check_device(args.device)
    check_model_spec(args.model)  # a missing or broken folder is named here, not taken for a hub id
    model, tok = load_model(args.model, args.dtype)
    device = str(resolve_device(args.device))
    out = run_tasks(model, tok, args.tasks, batch_size=args.lm_batch_size, limit=args.limit,
                    num_fewshot=args.num_fewshot, device=device)
    out = {"model": args.model, "dtype": args.dtype, "device": device, **out}
    print("| task | metric | value |\n|---|---|---|")
    for task, metrics in out["results"].items():
        for name, value in metrics.items():
            print(f"| {task} | {name} | {value:.4f} |")
    if args.json_out:
        path = Path(args.json_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, out)
        print(f"saved {path}")
    return 0


def cmd_speed(args: argparse.Namespace) -> int:
    """`bench speed`: dense vs pruned tokens/s (speed.run_speed), saved as JSON."""
    from .bench import write_atomic
    from .speed import default_devices, run_speed

    result = run_speed(args.pruned, args.dense, list(args.batch), args.devices or default_devices(), args.seqlen,
                       args.prompt_len, args.new_tokens, args.repeats, args.dtype)
    out = Path(args.out) if args.out else Path("benchmarks/results") / f"speed_{Path(args.pruned).name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, result)
    print(f"saved {out}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .io import load_plan
    from .preflight import check_info_dir

    check_info_dir(args.dir)
    plan = load_plan(args.dir)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=1))
        return 0
    cfg = plan.config
    print(_table([
        ("model type", plan.model_type),
        ("method", f"scorer {cfg['scorer']}, allocation {cfg['allocation']}, reconstruction {cfg['reconstruction']}"),
        ("sparsity", f"actual {plan.actual_sparsity:.4f} (requested {cfg['sparsity']})"),
        ("parameters (all)", f"{plan.params_dense:,} -> {plan.params_pruned:,}"),
    ]))
    print(f"\n{'layer':>5} {'heads':>7} {'kv':>5} {'neurons':>11} {'attn err none->fit':>22} {'mlp err none->fit':>22}")
    for lp in plan.layers:
        d = lp.dense_shape

        def err(kind: str) -> str:
            r = lp.recon.get(kind)
            return f"{r['error_none']:.4g} -> {r['error']:.4g}" if r else "-"

        print(f"{lp.index:>5} {len(lp.kept_heads):>3}/{d['num_heads']:<3} {len(lp.kept_kv_heads):>2}/{d['num_kv_heads']:<2}"
              f" {len(lp.kept_neurons):>5}/{d['intermediate_size']:<5} {err('attn'):>22} {err('mlp'):>22}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="structprune",
        description="Structured pruning of decoder LLMs (attention heads and FFN neurons), one decoder layer at a "
                    "time (STRUPRUNE). Sparsity is the ACTUAL fraction of decoder linear weights removed.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune a model and save it")
    p.add_argument("model", help="local HF folder, .gguf file, hub id, or 'smollm2-135m'")
    _add_prune_options(p)
    _add_common(p)
    p.add_argument("--eval", action="store_true", help="also measure dense and pruned perplexity")
    _add_eval_data(p, prefix=True)

    d = sub.add_parser("demo", help="the main job: prune the built-in SmolLM2-135M to 30%% and evaluate")
    d.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    _add_prune_options(d, nsamples=16)
    _add_common(d)
    _add_eval_data(d, prefix=True)

    e = sub.add_parser("eval", help="perplexity of a model (PROTOCOL.md), or lm-eval tasks with --tasks")
    e.add_argument("model")
    _add_eval_data(e, prefix=False)
    _add_common(e)
    from .harness import add_task_options

    add_task_options(e)

    i = sub.add_parser("info", help="what a pruned folder kept, per layer")
    i.add_argument("dir")
    i.add_argument("--json", action="store_true", help="print the whole plan as JSON")

    f = sub.add_parser("finetune", help="optional recovery: LoRA fine-tuning of a pruned folder on calibration-split "
                                        "text, merged back into plain weights")
    f.add_argument("model", help="a structprune output folder")
    _add_finetune_options(f)
    f.add_argument("--out", required=True, help="output folder for the fine-tuned model")
    f.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    f.add_argument("--eval", action="store_true", help="also measure perplexity before and after")
    _add_common(f)
    _add_eval_data(f, prefix=True)

    b = sub.add_parser("bench", help="benchmarks (PROTOCOL.md)")
    bsub = b.add_subparsers(dest="bench", required=True)
    q = bsub.add_parser("quality", help="methods x actual sparsity: perplexity on two texts, time, peak memory "
                                        "(resumable JSON + Markdown table)")
    add_quality_options(q)
    from .speed import add_speed_options

    add_speed_options(bsub.add_parser("speed", help="dense vs pruned prefill and decode tokens/s in transformers "
                                                    "(interleaved, medians; ratio next to the matmul-work ratio)"))

    r = sub.add_parser("report", help="render a saved quality run (JSON file or folder): Markdown table + PNG plots")
    r.add_argument("path", help="a run JSON file, or a folder of them (e.g. benchmarks/results)")

    x = sub.add_parser("export", help="write a (pruned) model for another runtime: GGUF for stock llama.cpp, "
                                      "per-layer shapes included (docs/export.md)")
    _add_export_options(x)
    x.add_argument("--log-level", default="INFO", help="DEBUG, INFO (default), WARNING")
    return parser


def _add_export_options(x: argparse.ArgumentParser) -> None:
    x.add_argument("model", help="a structprune output folder, HF folder, .gguf file or 'smollm2-135m'")
    x.add_argument("--format", default="gguf", choices=["gguf"], help="output format (default gguf)")
    x.add_argument("--out", required=True, help="output file, e.g. model.gguf")
    x.add_argument("--dtype", default="f16", choices=["f32", "f16", "q8_0"],
                   help="weight type (default f16; q8_0 uses llama.cpp's quantizer when installed)")
    x.add_argument("--tokenizer-from", default=None, metavar="GGUF",
                   help="copy the tokenizer (vocabulary, merges, special ids, chat template) from this GGUF "
                        "file; default: the source GGUF when MODEL is one, else the folder's tokenizer")
    x.add_argument("--tokenizer-pre", default="default",
                   help="llama.cpp pre-tokenizer name when the tokenizer is built from the folder (default 'default')")
    x.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def cmd_export(args: argparse.Namespace) -> int:
    from .io.gguf_export import export_model

    report = export_model(args.model, args.out, dtype=args.dtype, tokenizer_from=args.tokenizer_from,
                          tokenizer_pre=args.tokenizer_pre, overwrite=args.overwrite)
    shapes = report.layers
    print(_table([("file", report.path), ("llama.cpp architecture", report.arch),
                  ("dtype", report.dtype + (f" ({report.quantizer})" if report.quantizer else "")),
                  ("layers", f"{len(shapes)}; heads {sum(s['num_heads'] for s in shapes)}, FFN neurons "
                             f"{sum(s['intermediate_size'] for s in shapes)}"),
                  ("attention-free layers", ", ".join(map(str, report.attention_free)) or "none"),
                  ("kept out of q8_0", f"{len(report.fallback)} tensor(s)" if report.quantizer else "-"),
                  ("tokenizer", report.tokenizer), ("size", f"{report.size_bytes / 1e6:.1f} MB")]))
    return 0


def _add_finetune_options(p: argparse.ArgumentParser) -> None:
    from .finetune import FinetuneConfig

    d = FinetuneConfig()
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    p.add_argument("--lora-batch-size", type=int, default=d.batch_size, help=f"windows per step (default {d.batch_size})")
    p.add_argument("--lora-seqlen", type=int, default=d.seqlen, help=f"tokens per window (default {d.seqlen})")
    p.add_argument("--rank", type=int, default=d.rank, help=f"LoRA rank (default {d.rank})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    p.add_argument("--lora-text", default=d.text, help="training text (its CALIBRATION split; default wiki)")
    p.add_argument("--lora-seed", type=int, default=d.seed, help=f"seed of the training windows (default {d.seed})")


def _finetune_config(args: argparse.Namespace) -> Any:
    from .finetune import FinetuneConfig

    return FinetuneConfig(steps=args.steps, batch_size=args.lora_batch_size, seqlen=args.lora_seqlen, rank=args.rank,
                          lr=args.lr, text=args.lora_text, seed=args.lora_seed, device=args.device)


def cmd_finetune(args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import api, io
    from .io.resolve import load_model

    if not io.is_pruned_folder(args.model):
        raise ValueError(f"{args.model} is not a structprune output folder; prune it first (structprune prune)")
    config = _finetune_config(args)
    io.check_output_dir(args.out, args.overwrite)
    model, tok = load_model(args.model)
    plan = io.load_plan(args.model)
    ev = dict(data=args.data, seqlen=args.eval_seqlen, windows=args.windows, device=args.device,
              progress=not args.no_progress)
    before = api.evaluate_perplexity(model, tok, **ev) if args.eval else None
    tuned, info = api.finetune(model, tok, config, progress=not args.no_progress)
    if info.get("gave_up"):
        raise RuntimeError("LoRA fine-tuning met non-finite losses and gave up; nothing was written "
                           "(try a lower --lr)")
    after = api.evaluate_perplexity(tuned, tok, **ev) if args.eval else None
    plan.finetune = {**info, "perplexity_before": before, "perplexity_after": after}
    io.save_pruned(tuned, plan, args.out, tokenizer=tok, overwrite=args.overwrite)
    rows = [("model", args.model),
            ("LoRA", f"rank {config.rank}, {info['steps_done']} steps x {config.batch_size} x {config.seqlen} tokens "
                     f"of {config.text} (calibration split), lr {config.lr}"),
            ("training loss", f"{info['loss_first']:.4f} -> {info['loss_last']:.4f} (first / last tenth)"),
            ("time", f"{info['seconds']:.0f} s")]
    if args.eval:
        rows.append((f"perplexity ({args.data} eval, {args.windows} x {args.eval_seqlen}, fp32)",
                     f"{before:.2f} -> {after:.2f}"))
    rows.append(("saved to", str(Path(args.out).resolve())))
    print(_table(rows))
    return 0


def add_quality_options(p: argparse.ArgumentParser, out: str = "benchmarks/results/quality.json") -> None:
    """Options of `structprune bench quality` (also benchmarks/quality.py)."""
    from .bench import DEFAULT_CALIB, DEFAULT_METHODS, DEFAULT_SPARSITIES, DEFAULT_TEXTS, FULL, QUICK

    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    p.add_argument("--sparsities", nargs="+", type=float, default=list(DEFAULT_SPARSITIES))
    for name, what in (("nsamples", "calibration windows"), ("seqlen", "tokens per window"),
                       ("windows", "evaluation windows per text")):
        p.add_argument(f"--{name}", type=int, default=None, help=f"{what} (default {FULL[name]}; quick {QUICK[name]})")
    p.add_argument("--calib", default=DEFAULT_CALIB, help="calibration text (its calibration split)")
    p.add_argument("--texts", nargs="+", default=list(DEFAULT_TEXTS),
                   help="evaluation texts (their eval splits): wiki, pydoc (Debian python3.11-doc) or files")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="extra PruneConfig fields for every cell, e.g. target=local")
    p.add_argument("--tag", default="", help="suffix for the method name in the table")
    p.add_argument("--masks-from", default=None, metavar="METHODTAG",
                   help="replay the kept units of cell METHODTAG@sparsity (compare re-fits on equal masks)")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-cells", type=int, default=None, help="stop after this many new cells")
    p.add_argument("--lora-steps", type=int, default=0,
                   help="LoRA recovery after pruning each cell, this many steps (finetune.py defaults; 0: none). "
                        "Give such runs a --tag: the cells are no longer no-fine-tuning figures")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: {QUICK['nsamples']} x {QUICK['seqlen']} calibration, {QUICK['windows']} "
                        "evaluation windows, default output quality_quick.json")
    p.add_argument("--out", default=None, help=f"result JSON (default {out})")
    p.set_defaults(default_out=out)


def cmd_bench_quality(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .bench import FULL, QUICK, BenchSettings, parse_field, render, run_quality

    quick = QUICK if args.quick else FULL
    overrides = {}
    for kv in args.set:
        if "=" not in kv:
            raise ValueError(f"--set {kv!r}: expected FIELD=VALUE")
        name, value = kv.split("=", 1)
        overrides[name] = parse_field(name, value)
    settings = BenchSettings(
        model=args.model, methods=tuple(args.methods), sparsities=tuple(args.sparsities),
        nsamples=args.nsamples or quick["nsamples"], seqlen=args.seqlen or quick["seqlen"],
        windows=args.windows or quick["windows"], calib=args.calib, texts=tuple(args.texts), overrides=overrides,
        tag=args.tag, masks_from=args.masks_from, device=args.device, max_cells=args.max_cells,
        lora_steps=args.lora_steps)
    default_out = Path(args.default_out)
    out = Path(args.out) if args.out else (default_out.with_name("quality_quick.json") if args.quick else default_out)
    results = run_quality(settings, out, echo=lambda line: print(line, flush=True))
    print(render(results))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .bench.report import report

    for path in report(args.path):
        print(path)
    return 0


def _add_eval_data(p: argparse.ArgumentParser, prefix: bool) -> None:
    p.add_argument("--data", default="wiki", help="evaluation text: wiki (held-out split), a file, wikitext2, ptb, c4")
    p.add_argument("--eval-seqlen" if prefix else "--seqlen", dest="eval_seqlen" if prefix else "seqlen",
                   type=int, default=512, help="tokens per evaluation window (default 512)")
    p.add_argument("--windows", type=int, default=64, help="evaluation windows from the start (default 64)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = getattr(args, "log_level", "INFO")
    logging.basicConfig(level=getattr(logging, str(level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.command in ("prune", "demo"):
        from .hostmem import release_freed_memory

        release_freed_memory()  # freed tensors go back to the OS: peak RSS tracks live tensors
    from . import interrupts

    restore_signals = interrupts.install()  # SIGINT / SIGTERM: a clean exit, finished layers kept
    try:
        if args.command in ("prune", "demo"):
            from . import distributed

            if distributed.init_from_env(args.device) and distributed.rank() != 0:  # launched by torchrun
                args.no_progress = True
                logging.getLogger("structprune").setLevel(logging.WARNING)  # rank 0 tells the story
        if args.command == "prune":
            return cmd_prune(args, evaluate=args.eval)
        if args.command == "demo":
            if args.out is None:
                args.out = f"out/{args.model.replace('/', '_')}-{args.sparsity:g}"
            return cmd_prune(args, evaluate=True)
        if args.command == "eval":
            return cmd_eval(args)
        if args.command == "info":
            return cmd_info(args)
        if args.command == "finetune":
            return cmd_finetune(args)
        if args.command == "bench" and args.bench == "speed":
            return cmd_speed(args)
        if args.command == "bench":
            return cmd_bench_quality(args)
        if args.command == "report":
            return cmd_report(args)
        if args.command == "export":
            return cmd_export(args)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError, NotImplementedError) as e:
        log.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"error: {interrupts.message(e, args.command, getattr(args, 'out', None))}", file=sys.stderr)
        return interrupts.exit_code(e)
    finally:
        restore_signals()
        if args.command in ("prune", "demo"):
            from . import distributed

            distributed.shutdown()
    return 1


if __name__ == "__main__":
    sys.exit(main())
