"""The adapter interface: everything the pipeline needs to know about one model family.

One adapter class per family, registered by `config.model_type`. Nothing outside `arch/`
inspects module names or model types.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..surgery import get_weight, head_columns, slice_cols, slice_rows

log = logging.getLogger(__name__)

_REGISTRY: dict[str, type["Adapter"]] = {}


@dataclass(frozen=True)
class LayerShape:
    """Sizes of one decoder layer's prunable parts."""

    num_heads: int
    num_kv_heads: int
    intermediate_size: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LayerShape":
        return cls(int(data["num_heads"]), int(data["num_kv_heads"]), int(data["intermediate_size"]))


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor as llama.cpp names it. `tensor` is in transformers layout ([out, in] or [n]);
    `rope_heads` > 0 marks q/k rows (and biases) of that many heads in transformers' rotate-half
    order, which the writer reorders into the interleaved pairs of llama.cpp's NORM RoPE."""

    name: str
    tensor: torch.Tensor
    rope_heads: int = 0


def register(cls: type["Adapter"]) -> type["Adapter"]:
    for name in cls.model_types:
        _REGISTRY[name] = cls
    return cls


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def get_adapter(config: Any) -> "Adapter":
    """The adapter for `config.model_type`; a clear error lists the supported types."""
    model_type = getattr(config, "model_type", None)
    if model_type not in _REGISTRY:
        raise ValueError(
            f"unsupported architecture model_type={model_type!r}; structprune supports "
            f"{', '.join(supported_model_types())}. Open an issue to request another family."
        )
    return _REGISTRY[model_type](config)


class Adapter:
    """Per-family knowledge. Subclasses set the class attributes and the module accessors."""

    model_types: ClassVar[tuple[str, ...]] = ()
    gated: ClassVar[bool] = False  # MLP is act(gate x) * (up x)
    # attributes of a decoder layer that the model's forward reads (e.g. to choose a sliding mask)
    layer_attribute_names: ClassVar[tuple[str, ...]] = ()
    fused_qkv: ClassVar[bool] = False  # q_k_v returns one module three times, rows laid out q | k | v

    def __init__(self, config: Any) -> None:
        self.config = config

    def mlp_adds_to_residual(self) -> bool:
        """True when the layer's output is its residual stream plus the MLP consumer's output
        (pre-norm layers), so the consumer can be fitted to a residual-stream target."""
        return True

    def branch_norm(self, layer: nn.Module, kind: str) -> nn.Module | None:
        """The norm between the consumer of `kind` ("attn": o_proj, "mlp": down_proj) and the residual
        add (sandwich-norm families), or None where the consumer's output is added as it is."""
        return None

    def layer_attributes(self, layer: nn.Module) -> dict[str, Any]:
        """The `layer_attribute_names` this decoder layer has, with their values (a stand-in for
        the layer must carry them, see runtime/stream.py)."""
        return {name: getattr(layer, name) for name in self.layer_attribute_names if hasattr(layer, name)}

    # --- sizes from the config (the dense model) -------------------------------------------
    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def num_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def num_kv_heads(self) -> int:
        return int(getattr(self.config, "num_key_value_heads", None) or self.num_heads)

    @property
    def head_dim(self) -> int:
        return int(getattr(self.config, "head_dim", None) or self.hidden_size // self.num_heads)

    @property
    def intermediate_size(self) -> int:
        return int(self.config.intermediate_size)

    def dense_shape(self) -> LayerShape:
        return LayerShape(self.num_heads, self.num_kv_heads, self.intermediate_size)

    # --- parameter costs (decoder linear weights only, PROTOCOL.md) -------------------------
    @property
    def q_head_cost(self) -> int:
        """Weights carried by one query head: its q rows and its o columns."""
        return 2 * self.hidden_size * self.head_dim

    @property
    def kv_head_cost(self) -> int:
        """Weights carried by one key/value head: its k rows and v rows."""
        return 2 * self.hidden_size * self.head_dim

    @property
    def neuron_cost(self) -> int:
        """Weights carried by one FFN neuron: producer rows plus the consumer column."""
        return (3 if self.gated else 2) * self.hidden_size

    def attn_params(self, shape: LayerShape) -> int:
        return shape.num_heads * self.q_head_cost + shape.num_kv_heads * self.kv_head_cost

    def mlp_params(self, shape: LayerShape) -> int:
        return shape.intermediate_size * self.neuron_cost

    # --- module access (subclasses) ----------------------------------------------------------
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        raise NotImplementedError

    def q_k_v(self, layer: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
        raise NotImplementedError

    def o_proj(self, layer: nn.Module) -> nn.Module:
        raise NotImplementedError

    def mlp_producers(self, layer: nn.Module) -> list[nn.Module]:
        """(gate, up) for gated MLPs, (fc1,) otherwise."""
        raise NotImplementedError

    def down_proj(self, layer: nn.Module) -> nn.Module:
        raise NotImplementedError

    def logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """LM logits from the hidden states leaving the last decoder layer (final norm + head)."""
        raise NotImplementedError

    def timed_body(self, model: nn.Module) -> nn.Module:
        """The module the quality harness times for its dense-forward reference: the base model
        (embeddings and decoder layers, no LM head)."""
        return model.get_submodule("model")

    def mlp_activation(self) -> str:
        return str(getattr(self.config, "hidden_act", None) or getattr(self.config, "activation_function"))

    def set_attention_shape(self, layer: nn.Module, num_heads: int, num_kv_heads: int) -> None:
        """Update the per-layer attributes the attention forward reads."""
        raise NotImplementedError

    def compensation_fields(self) -> dict[str, bool]:
        """Config switches that give the consumer projections a bias, so least squares can
        compensate the mean of removed units; {} when the family has none (or has biases)."""
        return {}

    def add_zero_biases(self, layer: nn.Module, fields: dict[str, bool]) -> None:
        """Zero biases on every module the switches in `fields` govern (outputs unchanged)."""

    # --- derived ----------------------------------------------------------------------------
    def linear_weights(self, layer: nn.Module) -> list[torch.Tensor]:
        """Every decoder-layer linear weight that counts towards sparsity."""
        mods = [*self.q_k_v(layer), self.o_proj(layer), *self.mlp_producers(layer), self.down_proj(layer)]
        return [get_weight(m) for m in mods]

    def layer_shape(self, layer: nn.Module) -> LayerShape:
        q, k, _ = self.q_k_v(layer)
        hd = self.head_dim
        return LayerShape(get_weight(q).shape[0] // hd, get_weight(k).shape[0] // hd,
                          get_weight(self.down_proj(layer)).shape[1])

    def slice_heads(self, layer: nn.Module, keep_q: torch.Tensor, keep_kv: torch.Tensor) -> None:
        """Keep query heads `keep_q` (group-major, grouped by `keep_kv`) and KV heads `keep_kv`."""
        shape = self.layer_shape(layer)
        keep_q = torch.as_tensor(keep_q, dtype=torch.long)
        keep_kv = torch.as_tensor(keep_kv, dtype=torch.long)
        if keep_q.numel() % max(keep_kv.numel(), 1):
            raise ValueError(f"{keep_q.numel()} query heads cannot be split evenly over {keep_kv.numel()} KV heads")
        rep = shape.num_heads // shape.num_kv_heads
        k_per = keep_q.numel() // keep_kv.numel()
        groups = (keep_q // rep).reshape(keep_kv.numel(), k_per)
        if not bool((groups == keep_kv[:, None]).all()):
            raise ValueError("every kept query head must belong to a kept KV head, listed group by group")
        q, k, v = self.q_k_v(layer)
        hd = self.head_dim
        self._slice_qkv_rows(layer, head_columns(keep_q, hd), head_columns(keep_kv, hd))
        slice_cols(self.o_proj(layer), head_columns(keep_q, hd), "o_proj")
        self.set_attention_shape(layer, keep_q.numel(), keep_kv.numel())

    def _slice_qkv_rows(self, layer: nn.Module, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> None:
        q, k, v = self.q_k_v(layer)
        slice_rows(q, q_idx, "q_proj")
        slice_rows(k, kv_idx, "k_proj")
        slice_rows(v, kv_idx, "v_proj")

    def slice_neurons(self, layer: nn.Module, keep: torch.Tensor) -> None:
        for i, m in enumerate(self.mlp_producers(layer)):
            slice_rows(m, keep, f"mlp producer {i}")
        slice_cols(self.down_proj(layer), keep, "mlp consumer")

    def reshape_layer(self, layer: nn.Module, shape: LayerShape) -> None:
        """Shrink a dense layer to `shape` by keeping the first units (weights to be loaded after)."""
        dense = self.layer_shape(layer)
        if shape == dense:
            return
        rep = dense.num_heads // dense.num_kv_heads
        k_per = shape.num_heads // shape.num_kv_heads
        keep_kv = torch.arange(shape.num_kv_heads)
        keep_q = (keep_kv[:, None] * rep + torch.arange(k_per)[None, :]).flatten()
        if (shape.num_heads, shape.num_kv_heads) != (dense.num_heads, dense.num_kv_heads):
            self.slice_heads(layer, keep_q, keep_kv)
        if shape.intermediate_size != dense.intermediate_size:
            self.slice_neurons(layer, torch.arange(shape.intermediate_size))

    # --- llama.cpp (GGUF) export --------------------------------------------------------------
    def gguf_arch(self, shapes: list[LayerShape]) -> str:
        """The llama.cpp architecture that runs a model of these per-layer shapes exactly; raises
        NotImplementedError naming what llama.cpp cannot express."""
        raise NotImplementedError(f"GGUF export of model_type={self.config.model_type!r} is not supported: "
                                  "llama.cpp runs per-layer head and FFN counts only in its 'deci' architecture "
                                  "(the Llama block), and structprune has no native-architecture writer for this "
                                  "family")

    def gguf_hparams(self) -> dict[str, Any]:
        """Family hyper-parameters for the GGUF header: rope_theta, rms_eps, context_length,
        rope_scaling (None or (type, factor))."""
        raise NotImplementedError

    def gguf_tensors(self, model: nn.Module, arch: str, attention_free: set[int]) -> Any:
        """Iterate GGUFTensor for every weight llama.cpp reads; layers in `attention_free` get no
        attention tensors (written with zero heads)."""
        raise NotImplementedError

    # --- configs -----------------------------------------------------------------------------
    def vanilla_fields(self, shape: LayerShape) -> dict[str, int] | None:
        """Config fields that make a plain transformers model of this uniform shape, or None
        when the family's config cannot express it (e.g. head_dim derived from head count)."""
        raise NotImplementedError

    def shaped_config(self, shapes: list[LayerShape]) -> Any:
        """A copy of the config describing the pruned model; vanilla when possible."""
        cfg = copy.deepcopy(self.config)
        if hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
        fields = self.vanilla_fields(shapes[0]) if len(set(shapes)) == 1 else None
        if fields is not None:
            vanilla = copy.deepcopy(cfg)
            for key, value in fields.items():
                setattr(vanilla, key, value)
            problem = config_problem(vanilla)
            if problem is None:
                cfg = vanilla
            else:  # e.g. Llama/Gemma 3 ask hidden_size % num_attention_heads == 0 even with an explicit head_dim
                log.info("transformers rejects a plain %s config with %s (%s); the dense config with per-layer "
                         "shapes is saved instead (load it with structprune.load_pruned)",
                         self.config.model_type, shapes[0], problem)
                fields = None
        cfg.structprune = {
            "version": 1,
            "vanilla": fields is not None,
            "layers": [s.to_dict() for s in shapes],
        }
        return cfg

    def check_shapes(self, shapes: list[LayerShape]) -> Any:
        """The output config for per-layer `shapes`, validated as `save_pretrained` and loading will
        validate it; ValueError naming the layer or the rule when it cannot be saved. Cheap: run it
        before the first layer is pruned."""
        dense = self.dense_shape()
        if len(shapes) != self.num_layers:
            raise ValueError(f"{len(shapes)} layer shapes for a model of {self.num_layers} layers")
        for i, s in enumerate(shapes):
            ok = (1 <= s.num_kv_heads <= dense.num_kv_heads and s.num_kv_heads <= s.num_heads <= dense.num_heads
                  and s.num_heads % s.num_kv_heads == 0
                  and s.num_heads // s.num_kv_heads <= dense.num_heads // dense.num_kv_heads
                  and 1 <= s.intermediate_size <= dense.intermediate_size)
            if not ok:
                raise ValueError(f"layer {i}: shape {s} is not a pruned form of the dense {dense} (whole KV groups, "
                                 "the same query heads per group, at least one head and one neuron)")
        cfg = self.shaped_config(shapes)
        problem = config_problem(cfg)
        if problem is not None:
            raise ValueError(f"the pruned {self.config.model_type} config for shapes {sorted(set(shapes), key=str)} "
                             f"would not save: {problem}")
        return cfg


def config_problem(cfg: Any) -> str | None:
    """Why transformers would refuse `cfg` (the validation `save_pretrained` runs, then a rebuild
    from its dict as loading does), or None when it is valid."""
    try:
        validate = getattr(cfg, "validate", None)
        if callable(validate):
            validate()
        type(cfg).from_dict(cfg.to_dict())
    except Exception as e:  # any refusal, whatever its type, makes the config unusable
        return str(e).strip().splitlines()[-1].strip() or type(e).__name__
    return None


def add_zero_bias(module: nn.Module) -> None:
    """Register a zero bias on a Linear that has none (outputs unchanged)."""
    if getattr(module, "bias", None) is None:
        w = module.weight
        module.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
