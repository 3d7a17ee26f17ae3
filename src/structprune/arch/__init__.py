"""Model-family adapters, registered by `config.model_type`."""

from . import gemma3, gpt2, llama, opt  # noqa: F401  (registration)
from .base import Adapter, GGUFTensor, LayerShape, get_adapter, supported_model_types

__all__ = ["Adapter", "GGUFTensor", "LayerShape", "get_adapter", "supported_model_types"]
