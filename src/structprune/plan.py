"""The pruning plan as data: what each layer kept, with the scores and ratios that chose it.

JSON-serialisable; saved beside the pruned weights; replayable onto a dense model
(`apply_plan`) to reproduce the shapes (weights re-fitted by reconstruction are in the
safetensors file, not here).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .arch import Adapter, LayerShape

PLAN_VERSION = 1


@dataclass
class LayerPlan:
    """One decoder layer's decision. Head/neuron indices refer to the dense layer."""

    index: int
    kept_heads: list[int]
    kept_kv_heads: list[int]
    kept_neurons: list[int]
    dense_shape: dict[str, int]
    head_scores: list[float] = field(default_factory=list)
    neuron_scores: list[float] = field(default_factory=list)
    attn_keep_target: float = 1.0
    mlp_keep_target: float = 1.0
    importance: dict[str, float] = field(default_factory=dict)
    rule: str = "uniform"
    recon: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> LayerShape:
        return LayerShape(len(self.kept_heads), len(self.kept_kv_heads), len(self.kept_neurons))


@dataclass
class PrunePlan:
    """The whole run: config, per-layer decisions and the measured totals."""

    model_type: str
    config: dict[str, Any]
    layers: list[LayerPlan] = field(default_factory=list)
    params_dense: int = 0
    params_pruned: int = 0
    decoder_params_dense: int = 0
    decoder_params_pruned: int = 0
    allocation: dict[str, Any] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)
    finetune: dict[str, Any] = field(default_factory=dict)  # LoRA recovery record (finetune.py), if any
    version: int = PLAN_VERSION

    @property
    def actual_sparsity(self) -> float:
        """Fraction of decoder-layer linear weights removed (PROTOCOL.md)."""
        if not self.decoder_params_dense:
            return 0.0
        return 1.0 - self.decoder_params_pruned / self.decoder_params_dense

    def shapes(self) -> list[LayerShape]:
        return [layer.shape for layer in self.layers]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["actual_sparsity"] = self.actual_sparsity
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PrunePlan":
        data = dict(data)
        data.pop("actual_sparsity", None)
        version = data.get("version", PLAN_VERSION)
        if version > PLAN_VERSION:
            raise ValueError(f"plan version {version} is newer than this structprune ({PLAN_VERSION}); upgrade")
        layers = [LayerPlan(**layer) for layer in data.pop("layers", [])]
        return cls(layers=layers, **data)

    def save(self, path: str | Path, scores: bool = True) -> None:
        """Write the plan as JSON; a path ending in `.gz` is gzip-compressed. `scores=False` drops
        the per-unit scores (the kept indices, targets and totals stay, so the plan still replays):
        the compact form the benchmark harness keeps in the repository."""
        data = self.to_dict()
        if not scores:
            for layer in data["layers"]:
                layer["head_scores"], layer["neuron_scores"] = [], []
        text = json.dumps(data, indent=None if str(path).endswith(".gz") else 1, separators=(",", ":")
                          if str(path).endswith(".gz") else None)
        if str(path).endswith(".gz"):
            Path(path).write_bytes(gzip.compress(text.encode(), mtime=0))
        else:
            Path(path).write_text(text)

    @classmethod
    def load(cls, path: str | Path) -> "PrunePlan":
        raw = Path(path).read_bytes()
        if str(path).endswith(".gz"):
            raw = gzip.decompress(raw)
        return cls.from_dict(json.loads(raw))


def apply_plan(model: torch.nn.Module, adapter: Adapter, plan: PrunePlan) -> None:
    """Slice a dense model in place to the plan's kept units (no reconstruction)."""
    layers = adapter.decoder_layers(model)
    if len(layers) != len(plan.layers):
        raise ValueError(f"plan has {len(plan.layers)} layers but the model has {len(layers)}")
    for layer, lp in zip(layers, plan.layers):
        dense = adapter.layer_shape(layer)
        if lp.shape.num_heads != dense.num_heads or lp.shape.num_kv_heads != dense.num_kv_heads:
            adapter.slice_heads(layer, torch.tensor(lp.kept_heads), torch.tensor(lp.kept_kv_heads))
        if lp.shape.intermediate_size != dense.intermediate_size:
            adapter.slice_neurons(layer, torch.tensor(lp.kept_neurons))
