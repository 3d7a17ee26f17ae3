"""Where dense weights come from, one decoder layer at a time, and the output skeleton.

- `ModelSource`: an in-memory model; its layers are read, never modified.
- `SafetensorsSource`: a Hugging Face folder on disk; each layer's tensors are read from the
  memory-mapped safetensors files only when that layer is processed, so the whole model is
  never in host memory.
`skeleton(source)` builds the output model: the non-layer parts (embeddings, final norm, head)
real, the decoder layers as meta-device placeholders that the pipeline replaces by pruned
layers one by one.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .arch import get_adapter

log = logging.getLogger(__name__)


def layers_prefix(model: nn.Module) -> str:
    layers = get_adapter(model.config).decoder_layers(model)
    for name, module in model.named_modules():
        if module is layers:
            return name
    raise RuntimeError("decoder layers not found among the model's modules")


def _meta_model(config: Any, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _buffer_donor(config: Any, dtype: torch.dtype) -> nn.Module:
    """A real host model with as few layers as keep every non-layer buffer (e.g. one rotary
    table per attention type), to copy buffers computed at construction from."""
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(config)
    types = list(dict.fromkeys(getattr(cfg, "layer_types", None) or []))
    cfg.num_hidden_layers = max(1, len(types))
    if types:
        cfg.layer_types = types
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype)


class LayerSource:
    """Dense weights by layer. Subclasses set `config` and `dtype`."""

    config: Any
    dtype: torch.dtype

    def non_layer_state(self, prefix: str) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def layer(self, index: int) -> nn.Module:
        """Dense layer `index` on the host (a module the caller may move or copy, not modify)."""
        raise NotImplementedError

    def total_params(self) -> int:
        raise NotImplementedError


class ModelSource(LayerSource):
    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config
        self.dtype = next(model.parameters()).dtype
        self.adapter = get_adapter(model.config)
        self.generation_config = getattr(model, "generation_config", None)

    def non_layer_state(self, prefix: str) -> dict[str, torch.Tensor]:
        # cloned: the output must not share storage with the input (it may be trained later)
        return {k: v.detach().clone() for k, v in self.model.state_dict().items() if not k.startswith(prefix + ".")}

    def layer(self, index: int) -> nn.Module:
        return self.adapter.decoder_layers(self.model)[index]

    def total_params(self) -> int:
        from .methods.output import total_params

        return total_params(self.model)


class SafetensorsSource(LayerSource):
    """A local folder with config.json and model.safetensors (or a sharded index)."""

    def __init__(self, folder: str | Path, dtype: torch.dtype = torch.float32) -> None:
        from safetensors import safe_open
        from transformers import AutoConfig

        self.folder = Path(folder)
        self.config = AutoConfig.from_pretrained(self.folder)
        self.dtype = dtype
        self.adapter = get_adapter(self.config)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.folder / "model.safetensors").is_file():
            with safe_open(self.folder / "model.safetensors", framework="pt") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise FileNotFoundError(f"{self.folder} has no model.safetensors or model.safetensors.index.json")
        self.weight_map: dict[str, str] = weight_map
        self.generation_config = None
        if (self.folder / "generation_config.json").is_file():
            from transformers import GenerationConfig

            self.generation_config = GenerationConfig.from_pretrained(self.folder)
        self._meta = _meta_model(self.config, dtype)
        self.prefix = layers_prefix(self._meta)

    def _read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """Tensors `keys` as host copies in `self.dtype`. The files are opened for this call only:
        a memory map kept open would leave every page read so far in this process's resident set
        (O(model) host memory after a full pass), and a tensor of the file's dtype would still
        point into the map, so those are copied too."""
        from safetensors import safe_open

        out: dict[str, torch.Tensor] = {}
        for name in dict.fromkeys(self.weight_map[k] for k in keys):
            with safe_open(self.folder / name, framework="pt") as f:
                for k in keys:
                    if self.weight_map[k] == name:
                        t = f.get_tensor(k)
                        out[k] = t.clone() if t.dtype == self.dtype else t.to(self.dtype)
        return out

    def non_layer_state(self, prefix: str) -> dict[str, torch.Tensor]:
        return self._read([k for k in self.weight_map if not k.startswith(prefix + ".")])

    def layer(self, index: int) -> nn.Module:
        meta = get_adapter(self.config).decoder_layers(self._meta)[index]
        head = f"{self.prefix}.{index}."
        state = {k[len(head):]: t for k, t in self._read([k for k in self.weight_map if k.startswith(head)]).items()}
        layer = copy.deepcopy(meta)
        missing, unexpected = layer.load_state_dict(state, strict=False, assign=True)
        if missing or unexpected:
            raise ValueError(f"layer {index} in {self.folder}: missing {missing[:4]}, unexpected {unexpected[:4]}")
        return layer.eval()

    def total_params(self) -> int:
        from safetensors import safe_open

        total = 0
        for name in sorted(set(self.weight_map.values())):
            with safe_open(self.folder / name, framework="pt") as f:
                total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
        return total


def skeleton(source: LayerSource) -> nn.Module:
    """The output model: real non-layer parts from `source`, decoder layers left on meta."""
    config = copy.deepcopy(source.config)
    if getattr(config, "quantization_config", None) is not None:
        delattr(config, "quantization_config")
    model = _meta_model(config, source.dtype)
    prefix = layers_prefix(model)
    donor = _buffer_donor(config, source.dtype)
    for name, buf in donor.named_buffers():
        if name.startswith(prefix + "."):
            continue
        owner, _, attr = name.rpartition(".")
        model.get_submodule(owner)._buffers[attr] = buf
    del donor
    generation = getattr(source, "generation_config", None)
    if generation is not None:
        model.generation_config = copy.deepcopy(generation)
    state = source.non_layer_state(prefix)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not m.startswith(prefix + ".")]
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        missing = [m for m in missing if "lm_head" not in m]
    if missing or unexpected:
        raise ValueError(f"model weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    still_meta = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(prefix + ".")]
    if still_meta:
        raise ValueError(f"weights not found for {still_meta[:5]}")
    return model.eval()
