"""Run configuration: frozen dataclasses with validation and a JSON round trip."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

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


def temperature_value(text: str | float) -> tuple[float, bool]:
    """Parse a fixed temperature: (value, relative). "0.1x" is 0.1 times the score scale."""
    text = str(text).strip()
    if text.endswith("x"):
        return float(text[:-1]), True
    return float(text), False


def _check(cond: bool, name: str, value: Any, why: str) -> None:
    if not cond:
        raise ValueError(f"{name}={value!r} is invalid: {why}")


@dataclass(frozen=True)
class PruneConfig:
    """Everything that decides what a pruning run does.

    sparsity: ACTUAL fraction of decoder linear weight parameters to remove (PROTOCOL.md).
    scope: "layer" (STRUPRUNE: one layer at a time) or "global" (the O(N) baseline: whole model
        on the device, first-order Taylor ranking of all units together; methods/global_taylor.py).
    nsamples / seqlen: calibration windows and their length in tokens. The least-squares re-fit is
        data-hungry: on SmolLM2-135M (softmax allocation, FFN only) 16 x 512 windows gave 24.49 / 32.52 /
        59.40 perplexity at 20 / 30 / 50%, the default 64 x 512 gives 22.02 / 28.25 / 53.51 (relative
        layer importance; robust: 21.41 / 28.34 / 53.17).
    batch_size: calibration windows moved to the compute device at once.
    chunk_tokens: the device memory knob: at most this many calibration tokens on the compute
        device at once (batches are cut to max(1, chunk_tokens // seqlen) windows; ADMM processes
        its FFN buffers in chunks of this many tokens).
    scorer: unit importance ("wanda": |W| column norm x input-activation norm). It ranks layers
        for the allocation rules and, with selection "score", units within a module.
    selection: how a module picks the units it keeps once its budget is set: "score" (the
        top-scoring units) or "obs" (reconstruction-aware: greedy structured Optimal Brain
        Surgeon on the consumer's Gram matrix, removing the units whose loss the least-squares
        re-fit of the others can best absorb; heads by their block OBS cost). Needs a re-fit.
    allocation: how the budget is spread over layers and modules. "flap": FLAP's global
        ranking of standardised fluctuation scores (methods/flap.py; no re-fit, reconstruction "none").
        "sensitivity": each module's held-back loss increase is measured when it alone is pruned
        (and re-fitted) at a few ratios, and the budget goes where the summed increase is least
        (sensitivity.py; SmolLM2-135M, FFN only, 64 x 512: 19.52 / 26.47 at 20 / 30%, 3-4x the
        softmax rule's pruning time).
    sensitivity: how allocation "sensitivity" scores a pruned, re-fitted module: "exact" pushes it
        through every later dense layer and the head (len(fractions) x L(L+1)/2 layer forwards per
        kind); "linear" estimates the held-back loss increase from its output change and the
        gradient of one streamed backward pass (second-order, empirical Fisher; L-linear cost;
        sensitivity_linear.py, docs/sensitivity.md).
    reconstruction: how kept weights are re-fitted ("lstsq": damped least squares).
    target: "local" (default) fits each consumer projection to the dense layer applied to the
        pruned stream (classic layer-wise reconstruction); "dense" fits it to the dense model's
        outputs on the dense stream. Measured on SmolLM2-135M at 30% (16 x 512 calibration):
        local 46.5, dense 103.8 perplexity, so local is the default. "residual" fits the MLP
        consumer so that the layer's output returns to the dense model's residual stream
        (correcting upstream error; attention stays local): at 20% with 64 x 512 calibration and
        target_mix 0.5 it gave wiki 21.17 against 21.41 but pydoc 37.68 against 36.61, at 1.4x
        the pruning time: it fits the calibration domain.
    target_mix: with target "residual", the weight of the residual target against the local
        one (1: residual only; 0: the local re-fit).
    rho: attention pruning ratio relative to the MLP's, for the uniform and softmax-modular
        rules (0: MLP only; 1: equal). "auto" picks it on held-back calibration windows among
        0, 0.5 and 1 (uniform; softmax-modular, before its temperature search). On SmolLM2-135M at 30% (3 KV
        groups per layer, so attention moves in steps of a whole group) MLP-only measured
        34.6 perplexity against 44.1 for equal ratios.
    layer_importance: how the softmax rules compare layers: "raw" (sum of Wanda-style unit
        scores per parameter), "relative" (the same divided by the RMS of the layer's input
        hidden states, i.e. the layer's output relative to the residual stream it is added to;
        raw Wanda importances grow about ten-fold with depth on SmolLM2-135M) or "robust"
        (divided by the median over tokens of each token's RMS there instead: a few tokens with
        massive activations, norm ~1,150 against a median ~6 from layer 12 of SmolLM2-135M on,
        make the plain RMS jump 7x and "relative" undervalue every later layer). With the
        temperature search (SmolLM2-135M, FFN only, 16 x 512 calibration) relative beat uniform
        at 20 / 30 / 50% (24.5 / 32.5 / 59.4 vs 25.6 / 34.6 / 77.2), raw did not (25.2 / 34.6 /
        78.3). Default "robust": at 64 x 512, 21.41 / 28.34 / 53.17 (pydoc 36.61 / 52.06 / 106.2)
        against relative's 22.02 / 28.25 / 53.51 (37.87 / 51.98 / 111.4).
    damp: relative ridge damping, times mean(diag(Gram)).
    bias_compensation: where the family's config can express it (llama: attention_bias and
        mlp_bias; qwen3, gemma3: attention_bias), add zero biases so the re-fit can compensate
        the mean output of removed units. The checkpoint stays loadable by plain transformers.
        With allocation "flap" (no re-fit) the bias gains W[:, removed] @ mean(x[removed]).
    flap_standardise: FLAP's score standardisation, per "layer" and module (the reference
        code) or per module "kind" over all layers.
    flap_square_attention: square the attention column scores once more before standardising,
        as FLAP's reference code does (default); the paper's metric (False) does not. On
        SmolLM2-135M (16 x 512 calibration) at 20 / 30 / 50%: squared 25.8 / 42.8 / 979, paper's
        29.1 / 45.2 / 469 (published 25.0 / 39.2 / 512).
    """

    sparsity: float = 0.3
    scope: str = "layer"
    nsamples: int = 64
    seqlen: int = 512
    seed: int = 0
    batch_size: int = 8
    calib: str = "wiki"
    scorer: str = "wanda"
    selection: str = "score"
    allocation: str = "uniform"
    sensitivity: str = "exact"
    reconstruction: str = "lstsq"
    target: str = "local"
    target_mix: float = 1.0
    damp: float = 0.01
    bias_compensation: bool = False
    prune_attention: bool = True
    prune_mlp: bool = True
    max_layer_sparsity: float = 0.9
    temperature: str = "auto"
    rho: float | str = "auto"
    gamma: float = 0.0
    layer_importance: str = "robust"
    admm_iters: int = 4
    admm_alpha: float = 1.0
    admm_beta: float = 10.0
    admm_gamma: float = 1.0
    admm_sgd_steps: int = 0
    admm_attn_steps: int = 10
    chunk_tokens: int = 8192
    flap_standardise: str = "layer"
    flap_square_attention: bool = True
    device: str = "auto"
    dtype: str = "float32"
    round_to: int = 1

    def __post_init__(self) -> None:
        _check(0.0 <= self.sparsity <= MAX_SPARSITY, "sparsity", self.sparsity,
               f"use a fraction in [0, {MAX_SPARSITY}] of decoder weights to remove")
        _check(self.scope in SCOPES, "scope", self.scope, f"choose one of {SCOPES}")
        _check(self.nsamples >= 1, "nsamples", self.nsamples, "need at least one calibration window")
        _check(self.seqlen >= 8, "seqlen", self.seqlen, "windows must be at least 8 tokens")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        _check(self.scorer in SCORERS, "scorer", self.scorer, f"choose one of {SCORERS}")
        _check(self.selection in SELECTIONS, "selection", self.selection, f"choose one of {SELECTIONS}")
        _check(self.selection != "obs" or self.reconstruction != "none", "reconstruction", self.reconstruction,
               "selection 'obs' chooses units for the least-squares re-fit; use reconstruction 'lstsq' or 'admm'")
        _check(self.allocation in ALLOCATIONS, "allocation", self.allocation, f"choose one of {ALLOCATIONS}")
        _check(self.sensitivity in SENSITIVITIES, "sensitivity", self.sensitivity, f"choose one of {SENSITIVITIES}")
        _check(self.reconstruction in RECONSTRUCTIONS, "reconstruction", self.reconstruction,
               f"choose one of {RECONSTRUCTIONS}")
        self._check_flap()
        _check(self.flap_standardise in FLAP_STANDARDISE, "flap_standardise", self.flap_standardise,
               f"choose one of {FLAP_STANDARDISE}")
        _check(self.target in TARGETS, "target", self.target, f"choose one of {TARGETS}")
        _check(0.0 <= self.target_mix <= 1.0, "target_mix", self.target_mix, "use a fraction in [0, 1]")
        _check(self.target != "residual" or self.reconstruction == "lstsq", "reconstruction", self.reconstruction,
               "target 'residual' is a least-squares target; use reconstruction 'lstsq'")
        _check(self.damp > 0, "damp", self.damp, "damping must be positive")
        _check(self.prune_attention or self.prune_mlp, "prune_attention/prune_mlp",
               (self.prune_attention, self.prune_mlp), "at least one module kind must be prunable")
        _check(0.0 < self.max_layer_sparsity <= 1.0, "max_layer_sparsity", self.max_layer_sparsity,
               "must be in (0, 1]")
        if self.temperature != "auto":
            try:
                t = temperature_value(self.temperature)[0]
            except ValueError:
                t = -1.0
            _check(t > 0, "temperature", self.temperature,
                   "use 'auto', a positive number, or a multiple of the score scale such as '0.1x'")
        if self.rho != "auto":
            try:
                rho = float(self.rho)
            except (TypeError, ValueError):
                rho = -1.0
            _check(rho >= 0, "rho", self.rho, "use 'auto' or a number >= 0 (attention/MLP pruning ratio)")
        _check(self.layer_importance in LAYER_IMPORTANCE, "layer_importance", self.layer_importance,
               f"choose one of {LAYER_IMPORTANCE}")
        _check(self.admm_iters >= 0, "admm_iters", self.admm_iters, "must be >= 0")
        _check(self.admm_sgd_steps >= 0, "admm_sgd_steps", self.admm_sgd_steps,
               "must be >= 0 (0: closed-form producer solves)")
        _check(self.admm_attn_steps >= 0, "admm_attn_steps", self.admm_attn_steps,
               "must be >= 0 (0: attention keeps the one-shot least-squares re-fit)")
        for name in ("admm_alpha", "admm_beta", "admm_gamma"):
            _check(getattr(self, name) > 0, name, getattr(self, name), "ADMM penalties must be positive")
        _check(self.chunk_tokens >= 16, "chunk_tokens", self.chunk_tokens, "must be >= 16")
        _check(self.dtype in DTYPES, "dtype", self.dtype, f"choose one of {DTYPES}")
        _check(isinstance(self.round_to, int) and self.round_to >= 1, "round_to", self.round_to,
               "use a whole number >= 1 (kept FFN neurons per layer a multiple of it)")
        _check(self.round_to == 1 or self.method == "structprune", "round_to",
               self.round_to, "rounding kept neurons is done by the layer pipeline; not with scope 'global' "
               "or allocation 'flap'")

    @property
    def method(self) -> str:
        """The registered method (`methods.get_method`) these values select; the one place that
        maps config values to a method: scope "global" -> "global", allocation "flap" -> "flap",
        anything else -> "structprune" (the layer pipeline)."""
        if self.scope == "global":
            return "global"
        return "flap" if self.allocation == "flap" else "structprune"

    def _check_flap(self) -> None:
        """Allocation "flap" is FLAP's own whole-model ranking: no re-fit, not combined with scope global."""
        _check(self.allocation != "flap" or self.reconstruction == "none", "reconstruction",
               self.reconstruction, "allocation 'flap' re-fits no weight; use reconstruction 'none'")
        _check(self.allocation != "flap" or self.scope == "layer", "scope", self.scope,
               "allocation 'flap' is its own whole-model ranking; use scope 'layer'")

    def replace(self, **changes: Any) -> "PruneConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PruneConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown PruneConfig fields {unknown}; known fields: {sorted(names)}")
        return cls(**data)
