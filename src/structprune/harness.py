"""Downstream tasks through lm-evaluation-harness (`lm_eval.simple_evaluate` on an `HFLM`).

The model object is handed to lm-eval as it is, so any pruned folder (per-layer shapes included)
is evaluated exactly as structprune loaded it. Tasks are lm-eval's own names (hellaswag, arc_easy,
piqa, winogrande, lambada_openai, ...; their data come from the hub, so they need the network)
and the offline tasks shipped in `structprune/tasks/`:

    structprune_wiki_lastword (alias wiki_lastword)   last-word prediction on held-out Wikipedia
                                                       lead paragraphs (PROTOCOL.md eval split)

    python -m structprune.harness build-wiki-lastword   # rebuild the shipped task documents
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).with_name("tasks")
WIKI_LASTWORD_FILE = TASKS_DIR / "wiki_lastword.jsonl"
LOCAL_ALIASES = {"wiki_lastword": "structprune_wiki_lastword"}
HUB_TASKS = ("hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "lambada_openai", "boolq")
_WORD = re.compile(r"[A-Za-z]{3,}")


def build_wiki_lastword(n_docs: int = 400, min_words: int = 25, max_words: int = 80) -> list[dict[str, str]]:
    """LAMBADA-style documents from the Wikipedia EVAL split: paragraphs of `min_words`..`max_words`
    words that end in a plain word and a full stop; context = all but the last word, target = the
    last word without the full stop. The first `n_docs` such paragraphs, in split order."""
    from .data import wiki_text

    docs = []
    for para in wiki_text("eval").split("\n\n"):
        para = " ".join(para.split())
        words = para.split(" ")
        if not (min_words <= len(words) <= max_words) or not para.endswith(".") or not para.isascii():
            continue
        target = words[-1][:-1]
        if not _WORD.fullmatch(target):
            continue
        docs.append({"context": " ".join(words[:-1]), "target": target})
        if len(docs) == n_docs:
            break
    if len(docs) < n_docs:
        raise ValueError(f"only {len(docs)} paragraphs qualify; lower n_docs={n_docs}")
    return docs


def write_wiki_lastword(path: Path = WIKI_LASTWORD_FILE, **kwargs: Any) -> Path:
    docs = build_wiki_lastword(**kwargs)
    path.write_text("".join(json.dumps(d, ensure_ascii=True) + "\n" for d in docs))
    return path


def task_names(tasks: list[str]) -> list[str]:
    """lm-eval task names: local aliases resolved, comma lists split, order kept, duplicates dropped."""
    names: list[str] = []
    for item in tasks:
        for name in item.split(","):
            name = LOCAL_ALIASES.get(name.strip(), name.strip())
            if name and name not in names:
                names.append(name)
    if not names:
        raise ValueError("--tasks is empty: name at least one task, e.g. wiki_lastword or hellaswag")
    return names


def run_tasks(model: torch.nn.Module, tokenizer: Any, tasks: list[str], batch_size: int = 8,
              limit: int | None = None, num_fewshot: int | None = None, device: str = "cpu",
              seed: int = 0) -> dict[str, Any]:
    """Evaluate `model` (moved to `device`) on lm-eval `tasks`; returns {"results": {task: {metric:
    value}}, "n_samples": {task: documents}, "versions": ..., "lm_eval": version}."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise RuntimeError("lm-eval is not installed: pip install 'structprune[eval]' (or lm-eval)") from e

    names = task_names(tasks)
    # lm-eval's own catalogue (thousands of YAML files) is indexed only when a task needs it
    local_only = set(names) <= set(LOCAL_ALIASES.values())
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=not local_only)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {unknown}; offline: {sorted(LOCAL_ALIASES)}, online e.g. "
                         f"{', '.join(HUB_TASKS)}")
    model = model.to(device).eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    out = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit,
                                  num_fewshot=num_fewshot, log_samples=False, random_seed=seed,
                                  numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                                  bootstrap_iters=1000)
    if out is None:  # non-zero rank in a distributed run
        return {}
    results = {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "alias"}
               for task, metrics in out["results"].items()}
    for metrics in results.values():  # lm-eval writes "N/A" / nan for missing stderrs
        for k in [k for k, v in metrics.items() if isinstance(v, float) and math.isnan(v)]:
            del metrics[k]
    return {"results": results, "n_samples": {t: n.get("effective") for t, n in out.get("n-samples", {}).items()},
            "versions": dict(out.get("versions", {})), "lm_eval": getattr(lm_eval, "__version__", "?"),
            "limit": limit, "num_fewshot": num_fewshot, "batch_size": batch_size}


def add_task_options(p: Any) -> None:
    """`structprune eval MODEL --tasks ...` options (argparse)."""
    p.add_argument("--tasks", nargs="+", default=None,
                   help="run lm-evaluation-harness tasks instead of perplexity: wiki_lastword (offline, built in) "
                        f"or lm-eval names such as {', '.join(HUB_TASKS[:5])} (these need the network)")
    p.add_argument("--limit", type=int, default=None, help="--tasks: at most this many documents per task")
    p.add_argument("--num-fewshot", type=int, default=None, help="--tasks: few-shot examples (task default)")
    p.add_argument("--lm-batch-size", type=int, default=8, help="--tasks: lm-eval batch size (default 8)")
    p.add_argument("--json-out", default=None, help="--tasks: also write the results to this JSON file")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["build-wiki-lastword"]:
        print(__doc__)
        return 2
    print(write_wiki_lastword())
    return 0


if __name__ == "__main__":
    sys.exit(main())
