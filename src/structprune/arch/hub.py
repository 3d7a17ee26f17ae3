"""Hub-style remote code for non-uniform pruned folders (per-layer shapes).

A folder whose layers all share one shape is a plain checkpoint of its family ("vanilla") and
needs nothing. Otherwise `add_remote_code` copies `modeling_structprune.py` (self-contained:
torch + transformers only) into the folder and adds to config.json

    "auto_map": {"AutoModelForCausalLM": "modeling_structprune.Structprune<Family>ForCausalLM"}

so `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` rebuilds the per-layer
shapes without structprune, the convention per-layer heterogeneous models (DeciLM, Nemotron-NAS)
use on the hub. The config class stays the family's own: the `structprune` section rides along as
an extra attribute, so structprune's own loaders read the folder exactly as before.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MODELING_NAME = "modeling_structprune.py"
_MODELING_SOURCE = Path(__file__).with_name(MODELING_NAME)

# model_type -> the class in modeling_structprune.py that reshapes that family's layers
HUB_CLASSES = {
    "llama": "StructpruneLlamaForCausalLM",
    "mistral": "StructpruneMistralForCausalLM",
    "qwen2": "StructpruneQwen2ForCausalLM",
    "qwen3": "StructpruneQwen3ForCausalLM",
    "gemma3_text": "StructpruneGemma3ForCausalLM",
    "opt": "StructpruneOPTForCausalLM",
    "gpt2": "StructpruneGPT2LMHeadModel",
}


def needs_remote_code(config: dict[str, Any]) -> bool:
    """True for a structprune config (as a dict) whose per-layer shapes a plain config cannot express."""
    meta = config.get("structprune")
    return isinstance(meta, dict) and not meta.get("vanilla", False)


def hub_class(model_type: str) -> str:
    if model_type not in HUB_CLASSES:
        raise ValueError(f"no hub modeling class for model_type={model_type!r}; "
                         f"supported: {', '.join(sorted(HUB_CLASSES))}")
    return HUB_CLASSES[model_type]


def add_remote_code(folder: str | Path) -> bool:
    """Make a written folder loadable with `trust_remote_code=True` when its shapes are per layer:
    copy the modeling file and add `auto_map` to its config.json. Returns whether it did.
    Call it on the temporary folder before it is moved into place (the write stays atomic)."""
    folder = Path(folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    if not needs_remote_code(config):
        return False
    cls = hub_class(config.get("model_type"))
    (folder / MODELING_NAME).write_bytes(_MODELING_SOURCE.read_bytes())
    auto_map = dict(config.get("auto_map") or {})
    auto_map["AutoModelForCausalLM"] = f"{MODELING_NAME[:-3]}.{cls}"
    config["auto_map"] = auto_map
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return True
