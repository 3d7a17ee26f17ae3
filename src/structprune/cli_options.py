"""Command-line options: the argparse groups of every command, and the PruneConfig of a
parsed `prune` / `demo` command line (`config_from_args`)."""

from __future__ import annotations

import argparse
from typing import Any

from .config import (
    ALLOCATIONS,
    LAYER_IMPORTANCE,
    RECONSTRUCTIONS,
    SCORERS,
    SELECTIONS,
    SENSITIVITIES,
    TARGETS,
    PruneConfig,
)
from .methods import PRESETS, method_config

DEFAULT_MODEL = "smollm2-135m"


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16 or auto")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO (default), WARNING")


def add_prune_options(p: argparse.ArgumentParser, sparsity: float = 0.3, nsamples: int = 64) -> None:
    """Options of `prune` and `demo`: calibration, method and its settings, output."""
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
    _add_method_options(p)
    _add_admm_options(p)
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


def _add_method_options(p: argparse.ArgumentParser) -> None:
    """The named method and the settings that override it (None: the method's value)."""
    p.add_argument("--method", default="structprune", choices=sorted(PRESETS), help="named preset")
    p.add_argument("--scorer", choices=SCORERS, default=None, help="unit importance (overrides the method)")
    p.add_argument("--modules", choices=("both", "mlp", "attention"), default=None,
                   help="which units may go: both (heads and FFN neurons, default), mlp (FFN neurons only) or "
                        "attention (heads only)")
    p.add_argument("--selection", choices=SELECTIONS, default=None,
                   help="which units a module keeps: score (top scores, default) or obs (reconstruction-aware "
                        "greedy Optimal Brain Surgeon on the Gram matrix; needs a re-fit)")
    p.add_argument("--allocation", choices=ALLOCATIONS, default=None,
                   help="per-layer budget rule: sensitivity (default; measured, re-fit-aware loss of each module) or "
                        "uniform (one shape in every layer), closed-form, softmax, softmax-modular, flap")
    p.add_argument("--sensitivity", choices=SENSITIVITIES, default=None,
                   help="allocation sensitivity: linear (default; second-order estimate from one streamed backward "
                        "pass) or exact (each candidate through every later layer, quadratic in depth)")
    p.add_argument("--sensitivity-max-step", type=float, default=None,
                   help="allocation sensitivity: measure each module up to this multiple of the sparsity (default 1.5)")
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


def _add_admm_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--admm-iters", type=int, default=None, help="ADMM iterations (reconstruction admm)")
    p.add_argument("--admm-alpha", type=float, default=None, help="ADMM producer-fit penalty")
    p.add_argument("--admm-beta", type=float, default=None, help="ADMM output-fit penalty")
    p.add_argument("--admm-gamma", type=float, default=None, help="ADMM activation-consistency penalty")
    p.add_argument("--admm-sgd-steps", type=int, default=None,
                   help="ADMM producer update by this many gradient steps instead of the Cholesky solve (0)")
    p.add_argument("--admm-attn-steps", type=int, default=None,
                   help="ADMM on attention: value-projection gradient steps per iteration, alternating with the "
                        "output projection's least squares (default 10; 0: output projection re-fit only)")


def config_from_args(args: argparse.Namespace) -> PruneConfig:
    """The PruneConfig of a parsed `prune` / `demo` command line: the named method, then the options given."""
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
        sensitivity_max_step=getattr(args, "sensitivity_max_step", None),
        round_to=getattr(args, "round_to", None), **kinds)


def add_eval_data(p: argparse.ArgumentParser, prefix: bool) -> None:
    p.add_argument("--data", default="wiki", help="evaluation text: wiki (held-out split), a file, wikitext2, ptb, c4")
    p.add_argument("--eval-seqlen" if prefix else "--seqlen", dest="eval_seqlen" if prefix else "seqlen",
                   type=int, default=512, help="tokens per evaluation window (default 512)")
    p.add_argument("--windows", type=int, default=64, help="evaluation windows from the start (default 64)")


def add_export_options(x: argparse.ArgumentParser) -> None:
    x.add_argument("model", help="a structprune output folder, HF folder, .gguf file or a built-in name "
                                 "(smollm2-135m, gemma3-270m)")
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


def add_finetune_options(p: argparse.ArgumentParser) -> None:
    from .finetune import FinetuneConfig

    d = FinetuneConfig()
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    p.add_argument("--lora-batch-size", type=int, default=d.batch_size, help=f"windows per step (default {d.batch_size})")
    p.add_argument("--lora-seqlen", type=int, default=d.seqlen, help=f"tokens per window (default {d.seqlen})")
    p.add_argument("--rank", type=int, default=d.rank, help=f"LoRA rank (default {d.rank})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    p.add_argument("--lora-text", default=d.text, help="training text (its CALIBRATION split; default wiki)")
    p.add_argument("--lora-seed", type=int, default=d.seed, help=f"seed of the training windows (default {d.seed})")


def finetune_config(args: argparse.Namespace) -> Any:
    from .finetune import FinetuneConfig

    return FinetuneConfig(steps=args.steps, batch_size=args.lora_batch_size, seqlen=args.lora_seqlen, rank=args.rank,
                          lr=args.lr, text=args.lora_text, seed=args.lora_seed, device=args.device)


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
                   help="evaluation texts (their eval splits): wiki, pydoc (Debian python3.11-doc) or files; "
                        "'validation': the calibration text's validation windows (choosing defaults)")
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
