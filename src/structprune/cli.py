"""Command line: parse -> config -> API. No pruning logic lives here: options are in
cli_options.py, the commands in cli_commands.py."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from . import cli_commands as commands
from .cli_options import (
    DEFAULT_MODEL,
    add_common,
    add_eval_data,
    add_export_options,
    add_finetune_options,
    add_prune_options,
    add_quality_options,
)

log = logging.getLogger("structprune")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="structprune",
        description="Structured pruning of decoder LLMs (attention heads and FFN neurons), one decoder layer at a "
                    "time (STRUPRUNE). Sparsity is the ACTUAL fraction of decoder linear weights removed.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune a model and save it")
    p.add_argument("model", help="local HF folder, .gguf file, hub id, or a built-in name: smollm2-135m, gemma3-270m")
    add_prune_options(p)
    add_common(p)
    p.add_argument("--eval", action="store_true", help="also measure dense and pruned perplexity")
    add_eval_data(p, prefix=True)

    d = sub.add_parser("demo", help="the main job: prune the built-in SmolLM2-135M to 30%% and evaluate")
    d.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    add_prune_options(d, nsamples=16)
    add_common(d)
    add_eval_data(d, prefix=True)

    e = sub.add_parser("eval", help="perplexity of a model (PROTOCOL.md), or lm-eval tasks with --tasks")
    e.add_argument("model")
    add_eval_data(e, prefix=False)
    add_common(e)
    from .harness import add_task_options

    add_task_options(e)

    i = sub.add_parser("info", help="what a pruned folder kept, per layer")
    i.add_argument("dir")
    i.add_argument("--json", action="store_true", help="print the whole plan as JSON")

    _add_tool_commands(sub)
    return parser


def _add_tool_commands(sub: Any) -> None:
    """finetune, bench, report and export."""
    f = sub.add_parser("finetune", help="optional recovery: LoRA fine-tuning of a pruned folder on calibration-split "
                                        "text, merged back into plain weights")
    f.add_argument("model", help="a structprune output folder")
    add_finetune_options(f)
    f.add_argument("--out", required=True, help="output folder for the fine-tuned model")
    f.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    f.add_argument("--eval", action="store_true", help="also measure perplexity before and after")
    add_common(f)
    add_eval_data(f, prefix=True)

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
    add_export_options(x)
    x.add_argument("--log-level", default="INFO", help="DEBUG, INFO (default), WARNING")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(getattr(args, "log_level", "INFO"))
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
        return _dispatch(args)
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


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, str(level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _dispatch(args: argparse.Namespace) -> int:
    """Run the parsed command; its exit status."""
    if args.command == "demo" and args.out is None:
        args.out = f"out/{args.model.replace('/', '_')}-{args.sparsity:g}"
    if args.command in ("prune", "demo"):
        return commands.cmd_prune(args, evaluate=args.command == "demo" or args.eval)
    if args.command == "bench":
        return (commands.cmd_speed if args.bench == "speed" else commands.cmd_bench_quality)(args)
    run = {"eval": commands.cmd_eval, "info": commands.cmd_info, "finetune": commands.cmd_finetune,
           "report": commands.cmd_report, "export": commands.cmd_export}[args.command]
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
