"""The floating-point dtypes a model may be loaded in (the --dtype choices, named in config.DTYPES)."""

from __future__ import annotations

import torch

from ..config import DTYPES as DTYPE_NAMES

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES if name != "auto"}


def resolve_dtype(name: str) -> torch.dtype | None:
    """The torch dtype named `name`; None for "auto" (the checkpoint's own dtype)."""
    if name == "auto":
        return None
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r} is invalid: choose one of {sorted(DTYPES) + ['auto']}")
    return DTYPES[name]
