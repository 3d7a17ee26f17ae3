"""The commands behind the command line: each turns parsed options into API calls and prints
a table. No pruning logic lives here."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .cli_options import config_from_args, finetune_config
from .config import PruneConfig


def table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def cmd_prune(args: argparse.Namespace, evaluate: bool = False) -> int:
    """`prune` / `demo`: checks, then `api.prune_to_folder` (which opens the model, draws the
    calibration windows, prunes and saves), then a summary table."""
    from . import api, distributed, preflight

    config = config_from_args(args)
    evaluate = evaluate and distributed.rank() == 0  # under torchrun rank 0 evaluates; the others only prune
    if args.out is None:
        raise ValueError("--out is required: the folder to write the pruned model to")
    preflight.before_prune(args, config)  # everything checkable before loading (preflight.py)
    ev = dict(data=args.data, seqlen=args.eval_seqlen, windows=args.windows, device=args.device,
              progress=not args.no_progress) if evaluate else None
    run = api.prune_to_folder(args.model, config, args.out, overwrite=args.overwrite, resume=args.resume,
                              evaluate=ev, progress=not args.no_progress,
                              check_loaded=lambda model, tok: preflight.after_load(args, config, model, tok))
    if distributed.rank() != 0:
        return 0
    print(table(_prune_rows(args, config, run)))
    return 0


def _prune_rows(args: argparse.Namespace, config: PruneConfig, run: Any) -> list[tuple[str, str]]:
    """The summary table of a prune run (`api.FolderRun`)."""
    from .runtime.device import resolve_device

    plan = run.result.plan
    rows = [
        ("model", args.model),
        ("method", f"{args.method} (scorer {config.scorer}, allocation {config.allocation.rule}, "
                   f"reconstruction {config.refit.method})"),
        ("calibration", f"{config.calib}: {config.nsamples} x {config.seqlen} tokens, seed {config.seed}"),
        ("parameters (all)", f"{plan.params_dense:,} -> {plan.params_pruned:,}"),
        ("decoder linear weights", f"{plan.decoder_params_dense:,} -> {plan.decoder_params_pruned:,}"),
        ("sparsity", f"actual {plan.actual_sparsity:.4f} (requested {config.sparsity})"),
        ("pruning time", f"{run.seconds:.1f} s on {resolve_device(args.device)}"),
    ]
    if run.pruned_ppl is not None:
        rows.append((f"perplexity ({args.data} eval, {args.windows} x {args.eval_seqlen}, fp32)",
                     f"{run.dense_ppl:.2f} -> {run.pruned_ppl:.2f}"))
    rows.append(("saved to", str(Path(args.out).resolve())))
    return rows


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
    print(table([("model", args.model), ("data", f"{args.data} (eval split)"),
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
    from .runtime.device import resolve_device

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
    cfg = PruneConfig.from_dict(plan.config)
    print(table([
        ("model type", plan.model_type),
        ("method", f"scorer {cfg.scorer}, allocation {cfg.allocation.rule}, reconstruction {cfg.refit.method}"),
        ("sparsity", f"actual {plan.actual_sparsity:.4f} (requested {cfg.sparsity})"),
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


def cmd_export(args: argparse.Namespace) -> int:
    from .io.gguf_export import export_model

    report = export_model(args.model, args.out, dtype=args.dtype, tokenizer_from=args.tokenizer_from,
                          tokenizer_pre=args.tokenizer_pre, overwrite=args.overwrite)
    shapes = report.layers
    print(table([("file", report.path), ("llama.cpp architecture", report.arch),
                  ("dtype", report.dtype + (f" ({report.quantizer})" if report.quantizer else "")),
                  ("layers", f"{len(shapes)}; heads {sum(s['num_heads'] for s in shapes)}, FFN neurons "
                             f"{sum(s['intermediate_size'] for s in shapes)}"),
                  ("attention-free layers", ", ".join(map(str, report.attention_free)) or "none"),
                  ("kept out of q8_0", f"{len(report.fallback)} tensor(s)" if report.quantizer else "-"),
                  ("tokenizer", report.tokenizer), ("size", f"{report.size_bytes / 1e6:.1f} MB")]))
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from . import api, io
    from .io.resolve import load_model

    if not io.is_pruned_folder(args.model):
        raise ValueError(f"{args.model} is not a structprune output folder; prune it first (structprune prune)")
    config = finetune_config(args)
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
    print(table(rows))
    return 0


def cmd_bench_quality(args: argparse.Namespace) -> int:
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
