"""Masks from scores: which heads and neurons a module keeps for a parameter target.

Grouped-query attention rule: a layer keeps g KV heads (whole groups) and the same number
k of query heads inside every kept group (transformers' attention repeats each KV head
k times). A KV head is removed only with its whole group. Among all (g, k) the one whose
parameter count is closest to the target wins (ties: higher kept score); the kept groups
are the g with the largest sum of their top-k query-head scores, and inside each the top-k
query heads. At least one head and one neuron are always kept.
"""

from __future__ import annotations

import torch


def select_heads(
    head_scores: torch.Tensor,
    num_kv_heads: int,
    target_params: float,
    q_cost: int,
    kv_cost: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept query heads, group-major; kept KV heads, ascending) for a parameter target."""
    n_q = head_scores.numel()
    if n_q % num_kv_heads:
        raise ValueError(f"{n_q} query heads do not split into {num_kv_heads} KV groups")
    rep = n_q // num_kv_heads
    per_group = head_scores.float().reshape(num_kv_heads, rep)
    ordered, order = per_group.sort(dim=1, descending=True)
    best: tuple[float, float, int, int] | None = None
    for k in range(1, rep + 1):
        group_score = ordered[:, :k].sum(dim=1)
        top = group_score.sort(descending=True).values
        for g in range(1, num_kv_heads + 1):
            cost = g * (kv_cost + k * q_cost)
            key = (abs(cost - target_params), -float(top[:g].sum()), g, k)
            if best is None or key[:2] < best[:2]:
                best = key
    assert best is not None
    _, _, g, k = best
    group_score = ordered[:, :k].sum(dim=1)
    keep_kv = group_score.topk(g).indices.sort().values
    keep_q = torch.cat([(order[grp, :k].sort().values + grp * rep) for grp in keep_kv.tolist()])
    return keep_q, keep_kv


def select_neurons(scores: torch.Tensor, target_params: float, neuron_cost: int) -> torch.Tensor:
    """The top-scoring neurons whose count best meets the target; ascending indices."""
    n = scores.numel()
    k = int(min(n, max(1, round(target_params / neuron_cost))))
    return scores.float().topk(k).indices.sort().values
