"""Run configuration: frozen dataclasses with validation and a JSON round trip.

`PruneConfig` holds the core settings (what to prune, calibration, device) and one section per
stage: `allocation` (how the budget is spread), `refit` (how kept weights are re-fitted, with its
`admm` settings) and `flap` (FLAP's ranking). Each section validates its own fields; the rules
that join sections live in `PruneConfig.__post_init__`.

`PruneConfig.from_flat(**options)` is the one map from the flat option names of the command
line, the presets and old plans ("rho", "temperature", "admm_iters", "reconstruction", ...) to
this nesting; `parse_rho` and `parse_temperature` read their "auto" and "0.1x" strings.
`to_dict()` is nested with "_version": 2; `from_dict()` also reads the flat version-1 dicts of
plans written before (docs/usage.md, "Options", lists every option and its measured effect).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

LAYER_ALLOCATIONS = ("uniform", "closed-form", "softmax", "softmax-modular", "sensitivity")  # layer pipeline
ALLOCATIONS = (*LAYER_ALLOCATIONS, "flap")
SENSITIVITIES = ("exact", "linear")
FLAP_STANDARDISE = ("layer", "kind")
RECONSTRUCTIONS = ("none", "lstsq", "admm")
LAYER_IMPORTANCE = ("raw", "relative", "robust")
SCORERS = ("wanda", "magnitude", "random", "flap")
SELECTIONS = ("score", "obs")
TARGETS = ("dense", "local", "residual")
SCOPES = ("layer", "global")
DTYPES = ("float32", "bfloat16", "float16", "auto")
MAX_SPARSITY = 0.95
VERSION = 2  # to_dict's "_version"; dicts without one are the flat version 1
RETIRED = ("refit_holdout",)  # flat version-1 fields no longer read (plans written before they were removed)


def check(cond: bool, name: str, value: Any, why: str) -> None:
    """ValueError naming the option and its value unless `cond`."""
    if not cond:
        raise ValueError(f"{name}={value!r} is invalid: {why}")


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_rho(value: str | float | None) -> float | None:
    """A rho option: "auto" (or None) -> None (searched on held-back data), else a number >= 0."""
    if value is None or value == "auto":
        return None
    try:
        rho = float(value)
    except (TypeError, ValueError):
        rho = -1.0
    check(rho >= 0, "rho", value, "use 'auto' or a number >= 0 (attention/MLP pruning ratio)")
    return rho


def parse_temperature(value: str | float | None) -> tuple[float | None, bool]:
    """A temperature option: (value, relative). "auto" (or None) -> (None, False): searched on
    held-back data; "0.1x" -> (0.1, True): 0.1 times the score scale; "2" or 2.0 -> (2.0, False)."""
    if value is None or value == "auto":
        return None, False
    text = str(value).strip()
    relative = text.endswith("x")
    try:
        t = float(text[:-1] if relative else text)
    except ValueError:
        t = -1.0
    check(t > 0, "temperature", value, "use 'auto', a positive number, or a multiple of the score scale such as '0.1x'")
    return t, relative


class Section:
    """replace / to_dict / from_dict shared by the config dataclasses. NESTED names the fields
    that hold another section, and its class."""

    NESTED: ClassVar[dict[str, type]] = {}

    def replace(self, **changes: Any) -> Any:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {unknown}; known fields: {sorted(names)}")
        return cls(**{k: cls.NESTED[k].from_dict(v) if k in cls.NESTED else v for k, v in data.items()})


@dataclass(frozen=True)
class AdmmConfig(Section):
    """ADMM re-fit (reconstruction "admm"): iterations, the three penalties (producer fit,
    output fit, activation consistency) and gradient steps (0: closed-form solves)."""

    iters: int = 4  # ADMM iterations per layer
    alpha: float = 1.0  # producer-fit penalty
    beta: float = 10.0  # output-fit penalty
    gamma: float = 1.0  # activation-consistency penalty
    sgd_steps: int = 0  # producer update by this many gradient steps instead of the Cholesky solve
    attn_steps: int = 10  # attention: value-projection gradient steps per iteration (0: o_proj re-fit only)

    def __post_init__(self) -> None:
        check(self.iters >= 0, "admm_iters", self.iters, "must be >= 0")
        check(self.sgd_steps >= 0, "admm_sgd_steps", self.sgd_steps, "must be >= 0 (0: closed-form producer solves)")
        check(self.attn_steps >= 0, "admm_attn_steps", self.attn_steps,
              "must be >= 0 (0: attention keeps the one-shot least-squares re-fit)")
        for name in ("alpha", "beta", "gamma"):
            check(getattr(self, name) > 0, f"admm_{name}", getattr(self, name), "ADMM penalties must be positive")


@dataclass(frozen=True)
class RefitConfig(Section):
    """How kept weights are re-fitted after units are removed.

    method: "none", "lstsq" (damped least squares) or "admm" (settings in `admm`).
    target: "local" fits each consumer to the dense layer applied to the pruned stream; "dense"
        to the dense model's outputs on the dense stream; "residual" fits the MLP consumer so the
        layer's output returns to the dense residual stream (attention stays local; lstsq only).
    target_mix: with target "residual", its weight against the local target (1: residual only).
    damp: relative ridge damping, times mean(diag(Gram)).
    bias_compensation: add zero biases where the family's config can express them (llama:
        attention_bias and mlp_bias; qwen3, gemma3: attention_bias) so the re-fit can absorb the
        mean output of removed units; with allocation "flap" (no re-fit) the bias gains
        W[:, removed] @ mean(x[removed]). The checkpoint stays loadable by plain transformers.
    """

    NESTED: ClassVar[dict[str, type]] = {"admm": AdmmConfig}

    method: str = "lstsq"
    target: str = "local"
    target_mix: float = 1.0
    damp: float = 0.01
    bias_compensation: bool = False
    admm: AdmmConfig = field(default_factory=AdmmConfig)

    def __post_init__(self) -> None:
        check(self.method in RECONSTRUCTIONS, "reconstruction", self.method, f"choose one of {RECONSTRUCTIONS}")
        check(self.target in TARGETS, "target", self.target, f"choose one of {TARGETS}")
        check(0.0 <= self.target_mix <= 1.0, "target_mix", self.target_mix, "use a fraction in [0, 1]")
        check(self.target != "residual" or self.method == "lstsq", "reconstruction", self.method,
              "target 'residual' is a least-squares target; use reconstruction 'lstsq'")
        check(self.damp > 0, "damp", self.damp, "damping must be positive")


@dataclass(frozen=True)
class AllocationConfig(Section):
    """How the sparsity budget is spread over layers and modules.

    rule: "sensitivity" (the default: each module's held-back loss increase when it alone is
        pruned and re-fitted at a few ratios; sensitivity/), "uniform" (the same ratio in every
        layer: the output keeps one shape), "closed-form", "softmax", "softmax-modular" or "flap"
        (FLAP's global ranking of standardised scores; methods/flap.py). Chosen on validation
        windows (docs/validation.md).
    sensitivity: how rule "sensitivity" scores a module: "linear" (the default) estimates the
        held-back loss increase from one streamed backward pass, linear in depth; "exact" pushes
        each candidate through every later layer and the head (quadratic in depth; the reference)
        (docs/sensitivity.md).
    sensitivity_max_step: rule "sensitivity" measures each module at removed fractions 0.5, 1, ...
        up to this multiple of the prunable sparsity (capped at max_layer_sparsity): a trust region,
        since the additive model is not trusted for far larger removals (chosen on validation,
        docs/validation.md).
    temperature: softmax rules' temperature; None: searched on held-back calibration windows.
    temperature_relative: the temperature is a multiple of the score scale (option "0.1x").
    rho: attention pruning ratio relative to the MLP's, for "uniform" and "softmax-modular"
        (0: MLP only; 1: equal); None: chosen on held-back windows among 0, 0.5 and 1 (1 where
        nothing is searched).
    gamma: softmax-modular depth decay (> 0 prunes deeper layers more).
    layer_importance: how the softmax rules compare layers: "raw" (unit scores per parameter),
        "relative" (divided by the RMS of the layer's input hidden states) or "robust" (divided
        by the median over tokens of each token's RMS, blind to a few massive activations).
    """

    rule: str = "sensitivity"
    sensitivity: str = "linear"
    sensitivity_max_step: float = 1.5
    temperature: float | None = None
    temperature_relative: bool = False
    rho: float | None = None
    gamma: float = 0.0
    layer_importance: str = "robust"

    def __post_init__(self) -> None:
        check(self.rule in ALLOCATIONS, "allocation", self.rule, f"choose one of {ALLOCATIONS}")
        check(self.sensitivity in SENSITIVITIES, "sensitivity", self.sensitivity, f"choose one of {SENSITIVITIES}")
        check(is_number(self.sensitivity_max_step) and self.sensitivity_max_step >= 0.5, "sensitivity_max_step",
              self.sensitivity_max_step, "use a multiple of the sparsity >= 0.5 (e.g. 1.5)")
        check(self.temperature is None or is_number(self.temperature) and self.temperature > 0, "temperature",
              self.temperature, "use None (search) or a positive number (strings such as 'auto' or '0.1x': "
              "parse_temperature or PruneConfig.from_flat)")
        check(self.temperature is not None or not self.temperature_relative, "temperature_relative",
              self.temperature_relative, "a searched temperature (None) is not a multiple of anything")
        check(self.rho is None or is_number(self.rho) and self.rho >= 0, "rho", self.rho,
              "use None (search) or a number >= 0 (attention/MLP pruning ratio; 'auto': parse_rho or from_flat)")
        check(self.layer_importance in LAYER_IMPORTANCE, "layer_importance", self.layer_importance,
              f"choose one of {LAYER_IMPORTANCE}")

    @property
    def temperature_option(self) -> str | float:
        """The temperature as the flat option writes it: "auto", "0.1x" or a number."""
        if self.temperature is None:
            return "auto"
        return f"{self.temperature!r}x" if self.temperature_relative else self.temperature


@dataclass(frozen=True)
class FlapConfig(Section):
    """FLAP (allocation "flap"): standardise scores per "layer" and module (the reference code)
    or per module "kind" over all layers; square_attention squares the attention column scores
    once more before standardising, as the reference code does (the paper's metric does not)."""

    standardise: str = "layer"
    square_attention: bool = True

    def __post_init__(self) -> None:
        check(self.standardise in FLAP_STANDARDISE, "flap_standardise", self.standardise,
              f"choose one of {FLAP_STANDARDISE}")


@dataclass(frozen=True)
class PruneConfig(Section):
    """Everything that decides what a pruning run does.

    sparsity: ACTUAL fraction of decoder linear weight parameters to remove (PROTOCOL.md).
    scope: "layer" (one layer at a time) or "global" (the O(N) baseline: whole model on the
        device, first-order Taylor ranking of all units together; methods/global_taylor.py).
    nsamples / seqlen: calibration windows and their length in tokens; seed: their offsets.
    batch_size: calibration windows moved to the compute device at once.
    chunk_tokens: the device memory knob: at most this many calibration tokens on the compute
        device at once (batches are cut to max(1, chunk_tokens // seqlen) windows; ADMM processes
        its FFN buffers in chunks of this many tokens).
    calib: calibration text (a name or a file); device: "auto", "cpu", "cuda[:N]"; dtype: the
        model's compute dtype.
    prune_attention / prune_mlp: which unit kinds may be removed (heads, FFN neurons).
    max_layer_sparsity: cap on the fraction of any module's weights removed.
    round_to: kept FFN neurons per layer a multiple of this (layer pipeline only).
    scorer: unit importance ("wanda": |W| column norm x input-activation norm). It ranks layers
        for the allocation rules and, with selection "score", units within a module.
    selection: how a module picks the units it keeps once its budget is set: "score" (the
        top-scoring units) or "obs" (greedy structured Optimal Brain Surgeon on the consumer's
        Gram matrix; needs a re-fit).
    allocation, refit, flap: the stage sections (their classes say what each field does).
    """

    NESTED: ClassVar[dict[str, type]] = {"allocation": AllocationConfig, "refit": RefitConfig, "flap": FlapConfig}

    sparsity: float = 0.3
    scope: str = "layer"
    nsamples: int = 64
    seqlen: int = 512
    seed: int = 0
    batch_size: int = 8
    chunk_tokens: int = 8192
    calib: str = "wiki"
    device: str = "auto"
    dtype: str = "float32"
    prune_attention: bool = True
    prune_mlp: bool = True
    max_layer_sparsity: float = 0.9
    round_to: int = 1
    scorer: str = "wanda"
    selection: str = "score"
    allocation: AllocationConfig = field(default_factory=AllocationConfig)
    refit: RefitConfig = field(default_factory=RefitConfig)
    flap: FlapConfig = field(default_factory=FlapConfig)

    def __post_init__(self) -> None:
        self._check_core()
        # The rules that join sections: each is a combination no method runs.
        check(self.selection != "obs" or self.refit.method != "none", "reconstruction", self.refit.method,
              "selection 'obs' chooses units for the least-squares re-fit; use reconstruction 'lstsq' or 'admm'")
        check(self.allocation.rule != "flap" or self.refit.method == "none", "reconstruction",
              self.refit.method, "allocation 'flap' re-fits no weight; use reconstruction 'none'")
        check(self.allocation.rule != "flap" or self.scope == "layer", "scope", self.scope,
              "allocation 'flap' is its own whole-model ranking; use scope 'layer'")
        check(self.round_to == 1 or self.method == "structprune", "round_to",
              self.round_to, "rounding kept neurons is done by the layer pipeline; not with scope 'global' "
              "or allocation 'flap'")

    def _check_core(self) -> None:
        check(0.0 <= self.sparsity <= MAX_SPARSITY, "sparsity", self.sparsity,
              f"use a fraction in [0, {MAX_SPARSITY}] of decoder weights to remove")
        check(self.scope in SCOPES, "scope", self.scope, f"choose one of {SCOPES}")
        check(self.nsamples >= 1, "nsamples", self.nsamples, "need at least one calibration window")
        check(self.seqlen >= 8, "seqlen", self.seqlen, "windows must be at least 8 tokens")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        check(self.scorer in SCORERS, "scorer", self.scorer, f"choose one of {SCORERS}")
        check(self.selection in SELECTIONS, "selection", self.selection, f"choose one of {SELECTIONS}")
        check(self.prune_attention or self.prune_mlp, "prune_attention/prune_mlp",
              (self.prune_attention, self.prune_mlp), "at least one module kind must be prunable")
        check(0.0 < self.max_layer_sparsity <= 1.0, "max_layer_sparsity", self.max_layer_sparsity,
              "must be in (0, 1]")
        check(self.chunk_tokens >= 16, "chunk_tokens", self.chunk_tokens, "must be >= 16")
        check(self.dtype in DTYPES, "dtype", self.dtype, f"choose one of {DTYPES}")
        check(isinstance(self.round_to, int) and self.round_to >= 1, "round_to", self.round_to,
              "use a whole number >= 1 (kept FFN neurons per layer a multiple of it)")

    @property
    def method(self) -> str:
        """The registered method (`methods.get_method`) these values select; the one place that
        maps config values to a method: scope "global" -> "global", allocation "flap" -> "flap",
        anything else -> "structprune" (the layer pipeline)."""
        if self.scope == "global":
            return "global"
        return "flap" if self.allocation.rule == "flap" else "structprune"

    def to_dict(self) -> dict[str, Any]:
        """Nested plain values with "_version": 2 (JSON-serialisable; inf temperatures as floats)."""
        return {"_version": VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PruneConfig":
        """A config from `to_dict`'s nested dict, or from a flat version-1 dict (no "_version";
        saved plans before version 2): fields in RETIRED are dropped."""
        data = dict(data)
        version = data.pop("_version", 1)
        if version == 1:
            return cls.from_flat(**{k: v for k, v in data.items() if k not in RETIRED})
        if version != VERSION:
            raise ValueError(f"_version={version!r} is invalid: this structprune reads config versions 1 and {VERSION}")
        return super().from_dict(data)

    @classmethod
    def from_flat(cls, **options: Any) -> "PruneConfig":
        """A config from flat option names (the CLI's, the presets', version-1 plans'): see FLAT.
        rho and temperature take "auto" and "0.1x" strings (`parse_rho`, `parse_temperature`)."""
        unknown = sorted(set(options) - set(FLAT) - {"temperature"})
        if unknown:
            raise ValueError(f"unknown options {unknown}; known options: {sorted([*FLAT, 'temperature'])}")
        sections: dict[tuple[str, ...], dict[str, Any]] = {(): {}, ("allocation",): {}, ("refit",): {},
                                                           ("refit", "admm"): {}, ("flap",): {}}
        for name, value in options.items():
            if name == "temperature":
                t, relative = parse_temperature(value)
                sections[("allocation",)].update(temperature=t, temperature_relative=relative)
                continue
            *path, key = FLAT[name]
            sections[tuple(path)][key] = parse_rho(value) if name == "rho" else value
        refit = RefitConfig(**sections[("refit",)], admm=AdmmConfig(**sections[("refit", "admm")]))
        return cls(**sections[()], allocation=AllocationConfig(**sections[("allocation",)]), refit=refit,
                   flap=FlapConfig(**sections[("flap",)]))

    def to_flat(self) -> dict[str, Any]:
        """The flat options that `from_flat` turns back into this config (rho and temperature as
        the option strings "auto" and "0.1x" where they are searched or relative)."""
        out: dict[str, Any] = {}
        for name, path in FLAT.items():
            value: Any = self
            for part in path:
                value = getattr(value, part)
            out[name] = "auto" if name == "rho" and value is None else value
        out["temperature"] = self.allocation.temperature_option
        return out

    def with_flat(self, **options: Any) -> "PruneConfig":
        """This config with some flat options changed (e.g. `config.with_flat(rho=1.0)`)."""
        return PruneConfig.from_flat(**{**self.to_flat(), **options})


def _flat_names() -> dict[str, tuple[str, ...]]:
    """Flat option name -> attribute path in PruneConfig (temperature is read by parse_temperature)."""
    core = [f.name for f in dataclasses.fields(PruneConfig) if f.name not in PruneConfig.NESTED]
    out: dict[str, tuple[str, ...]] = {name: (name,) for name in core}
    out.update({"allocation": ("allocation", "rule"), "reconstruction": ("refit", "method")})
    out.update({name: ("allocation", name) for name in ("sensitivity", "sensitivity_max_step", "rho", "gamma",
                                                                    "layer_importance")})
    out.update({name: ("refit", name) for name in ("target", "target_mix", "damp", "bias_compensation")})
    out.update({f"admm_{f.name}": ("refit", "admm", f.name) for f in dataclasses.fields(AdmmConfig)})
    out.update({f"flap_{f.name}": ("flap", f.name) for f in dataclasses.fields(FlapConfig)})
    return out


FLAT = _flat_names()  # flat option name -> attribute path; "temperature" is parsed into two fields
