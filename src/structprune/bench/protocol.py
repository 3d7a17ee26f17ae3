"""What a quality run measures (PROTOCOL.md): the settings, their defaults, a cell's key.

`BenchSettings` is stored in the run's JSON and checked when a run is resumed; files written
before the settings were recorded are read back from their protocol strings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import PruneConfig
from ..data import NAMED_TEXTS

DEFAULT_METHODS = ("random", "wanda-sp", "flap", "structprune")
DEFAULT_SPARSITIES = (0.2, 0.3, 0.5)
DEFAULT_TEXTS = ("wiki", "pydoc")
DEFAULT_CALIB = "wiki"
FULL = {"nsamples": 16, "seqlen": 512, "windows": 64}  # the harness default (16 windows: CPU time)
QUICK = {"nsamples": 2, "seqlen": 128, "windows": 2}


@dataclass
class BenchSettings:
    """What one run measures; stored in the JSON and checked when a run is resumed."""

    model: str = "smollm2-135m"
    methods: tuple[str, ...] = DEFAULT_METHODS
    sparsities: tuple[float, ...] = DEFAULT_SPARSITIES
    nsamples: int = FULL["nsamples"]
    seqlen: int = FULL["seqlen"]
    windows: int = FULL["windows"]
    calib: str = DEFAULT_CALIB
    texts: tuple[str, ...] = DEFAULT_TEXTS
    overrides: dict[str, Any] = field(default_factory=dict)  # PruneConfig fields for every cell
    tag: str = ""
    masks_from: str | None = None
    device: str = "auto"
    max_cells: int | None = None  # stop after this many NEW cells (time-sliced runs)
    lora_steps: int = 0  # >0: LoRA recovery (finetune.py, default settings) after pruning each cell

    def fingerprint(self) -> dict[str, Any]:
        """The settings a resumed run must share with the file it continues."""
        return {"model": self.model, "nsamples": self.nsamples, "seqlen": self.seqlen, "windows": self.windows,
                "calib": self.calib}

    def plan_name(self, key: str) -> str:
        """File name of a cell's plan in plans/ (compact: gzipped JSON without per-unit scores,
        `PrunePlan.save(scores=False)`). Runs with other calibration settings share that folder,
        so their plans carry the calibration in the name (the harness default keeps the plain
        `<cell>.json.gz`): a 64-window run never overwrites the 16-window plan of the same cell."""
        if (self.calib, self.nsamples, self.seqlen) == (DEFAULT_CALIB, FULL["nsamples"], FULL["seqlen"]):
            return f"{key}.json.gz"
        return f"{key}.calib-{Path(self.calib).stem}-{self.nsamples}x{self.seqlen}.json.gz"


def cell_key(method: str, tag: str, sparsity: float) -> str:
    """A cell's name in the run's JSON and its plan file: "<method><tag>@<sparsity>"."""
    return f"{method}{tag}@{sparsity}"


def parse_field(name: str, text: str) -> Any:
    """A FIELD=VALUE override typed like the PruneConfig default ("false" is False for booleans)."""
    defaults = PruneConfig().to_flat()
    if name not in defaults:
        raise ValueError(f"--set {name}: not a PruneConfig field")
    default = defaults[name]
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"--set {name}={text}: expected true or false")
        return text.lower() in ("true", "1")
    if isinstance(default, str):
        return text
    return type(default)(text)


def settings_from_protocol(protocol: dict[str, Any] | None) -> dict[str, Any] | None:
    """The fingerprint of a file written before "settings" was recorded (its protocol strings)."""
    if not protocol:
        return None
    calib = re.search(r"(\w+) calib split, (\d+) x (\d+)", protocol.get("calib", ""))
    ev = re.search(r"first (\d+) x (\d+)", protocol.get("eval", ""))
    if not calib or not ev:
        return None
    return {"model": protocol.get("model"), "nsamples": int(calib.group(2)), "seqlen": int(calib.group(3)),
            "windows": int(ev.group(1)), "calib": calib.group(1)}


def check_disjoint(settings: BenchSettings) -> None:
    """Refuse a plain file given both for calibration and evaluation (it has no held-out split)."""
    for text in settings.texts:
        if text == settings.calib and text not in NAMED_TEXTS:
            raise ValueError(f"text {text!r} is both the calibration and an evaluation text, and a plain file has "
                             "no held-out split; give a different file for evaluation")
