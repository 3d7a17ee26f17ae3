"""Pruning methods: siblings registered by name, and the named presets users pick them by.

A method is a function `run(model_or_source, windows, holdout, config, progress, masks, sink)
-> (pruned model, plan)` registered with `@register_method(name, ...)`, which also records
what the method supports. `api.prune` looks it up once (`get_method(config.method)`): which
config values select which method is decided by `PruneConfig.method` alone.

Registered methods (each in its own module):
- "structprune" (structprune.py): the layer pipeline (pipeline.py), STRUPRUNE;
- "flap" (flap.py): FLAP's fluctuation metric and global standardised ranking;
- "global" (global_taylor.py): the O(N) whole-model first-order Taylor baseline.

PRESETS are the names the CLI's `--method` and `method_config` accept: a registered method
with its settings (the Wanda-sp, magnitude and random baselines are presets of the layer
pipeline).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..config import PruneConfig

Run = Callable[..., tuple[Any, Any]]

PRESETS: dict[str, dict[str, Any]] = {  # flat option names (PruneConfig.from_flat)
    # STRUPRUNE: calibration-aware scores, allocation, least-squares (or ADMM) reconstruction.
    "structprune": {"scorer": "wanda"},
    # Baselines (uniform allocation, no reconstruction, FFN neurons only as in the published
    # Wanda-sp / random structured figures of PROTOCOL comparisons).
    "wanda-sp": {"scorer": "wanda", "allocation": "uniform", "reconstruction": "none", "rho": 0.0},
    "magnitude": {"scorer": "magnitude", "allocation": "uniform", "reconstruction": "none", "rho": 0.0},
    "random": {"scorer": "random", "allocation": "uniform", "reconstruction": "none", "rho": 0.0},
    # FLAP (An et al., AAAI 2024): fluctuation metric, global standardised ranking of heads and
    # neurons, bias compensation, no re-fit (flap.py).
    "flap": {"scorer": "flap", "allocation": "flap", "reconstruction": "none", "bias_compensation": True},
    # The O(N) reference: whole model on the device, global first-order Taylor ranking.
    "global": {"scope": "global", "reconstruction": "none"},
}

_BUILTIN = ("structprune", "flap", "global_taylor")  # modules that register the built-in methods


@dataclass(frozen=True)
class Method:
    """A registered method and what it supports.

    masks: replays the kept units of a given plan; sink: writes each finished layer to an
    `io.ShardWriter` as it goes (streaming output); round_to: rounds kept FFN neurons;
    distributed: runs sharded under torchrun; whole_model: needs the whole model in memory
    (a LayerSource is copied in full first); holdout: searches on held-back windows when the
    config asks (`planning.needs_holdout`), so the API splits them off when none are given."""

    name: str
    run: Run
    masks: bool = False
    sink: bool = False
    round_to: bool = False
    distributed: bool = False
    whole_model: bool = False
    holdout: bool = False


_REGISTRY: dict[str, Method] = {}


def register_method(name: str, **supports: bool) -> Callable[[Run], Run]:
    """Decorator: register `run` as method `name`; `supports` are `Method`'s flags."""

    def add(run: Run) -> Run:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is registered twice")
        _REGISTRY[name] = Method(name, run, **supports)
        return run

    return add


def registered() -> dict[str, Method]:
    """Every registered method by name (the built-in ones are imported on first use)."""
    for module in _BUILTIN:
        importlib.import_module(f"{__name__}.{module}")
    return dict(_REGISTRY)


def get_method(name: str) -> Method:
    """The registered method `name`; a ValueError lists the known ones."""
    methods = registered()
    if name not in methods:
        raise ValueError(f"method={name!r} is not registered; choose one of {sorted(methods)}")
    return methods[name]


def method_config(name: str, **overrides: Any) -> PruneConfig:
    """The PruneConfig of a named preset; `overrides` (flat option names, `PruneConfig.from_flat`;
    not None) take precedence."""
    if name not in PRESETS:
        raise ValueError(f"method={name!r} is unknown; choose one of {sorted(PRESETS)}")
    fields = {**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}
    return PruneConfig.from_flat(**fields)
