"""Plots of a plan (PNG bytes; matplotlib with the Agg backend, imported lazily)."""

from __future__ import annotations

import io

from ..config import PruneConfig
from ..plan import PrunePlan

ALLOCATION_PNG = "allocation.png"


def allocation_png(plan: PrunePlan, title: str | None = None) -> bytes:
    """Per-layer kept fraction of query heads, KV heads and FFN neurons."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = [lp.index for lp in plan.layers]
    heads = [len(lp.kept_heads) / lp.dense_shape["num_heads"] for lp in plan.layers]
    kv = [len(lp.kept_kv_heads) / lp.dense_shape["num_kv_heads"] for lp in plan.layers]
    ffn = [len(lp.kept_neurons) / lp.dense_shape["intermediate_size"] for lp in plan.layers]
    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=110)
    ax.plot(idx, ffn, "o-", label="FFN neurons kept")
    ax.plot(idx, heads, "s-", label="query heads kept")
    ax.plot(idx, kv, "^--", label="KV heads kept", alpha=0.6)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("kept fraction")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    rule = plan.layers[0].rule if plan.layers else PruneConfig.from_dict(plan.config).allocation.rule
    ax.set_title(title or f"{plan.model_type}: actual sparsity {plan.actual_sparsity:.3f}, {rule}", fontsize=9)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
