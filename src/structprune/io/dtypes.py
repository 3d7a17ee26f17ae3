"""Names of the floating-point dtypes a model may be loaded in (the --dtype choices)."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype | None:
    """The torch dtype named `name`; None for "auto" (the checkpoint's own dtype)."""
    if name == "auto":
        return None
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r} is invalid: choose one of {sorted(DTYPES) + ['auto']}")
    return DTYPES[name]
