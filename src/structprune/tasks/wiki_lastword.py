"""Loader of the structprune_wiki_lastword lm-eval task: the local JSON-lines file beside this one.

lm-eval imports this file by path (`!function` in the task YAML), so it imports nothing from
structprune; `datasets` reads the documents as a local `data_files` JSON dataset.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

DATA_FILE = Path(__file__).with_name("wiki_lastword.jsonl")


def load_docs(**_: Any) -> Any:
    """DatasetDict with a 'test' split of {'context', 'target'} documents."""
    import datasets

    return datasets.load_dataset("json", data_files={"test": str(DATA_FILE)})
