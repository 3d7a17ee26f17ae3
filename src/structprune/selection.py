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

from .linalg import damped_inverse, dead_columns, mask_dead


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


def select_neurons(scores: torch.Tensor, target_params: float, neuron_cost: int, multiple: int = 1) -> torch.Tensor:
    """The top-scoring neurons whose count best meets the target; ascending indices."""
    k = neuron_count(target_params, neuron_cost, scores.numel(), multiple)
    return scores.float().topk(k).indices.sort().values


def neuron_count(target_params: float, neuron_cost: int, n: int, multiple: int = 1) -> int:
    """Neurons kept for a parameter target: the nearest count, at least one, at most n; with
    `multiple` > 1 the nearest multiple of it (at least one multiple; all n when that is nearer)."""
    if multiple <= 1:
        return int(min(n, max(1, round(target_params / neuron_cost))))
    want = target_params / neuron_cost
    k = max(multiple, multiple * round(want / multiple))
    return int(n if k >= n or abs(n - want) <= abs(k - want) else k)


def _obs_setup(weight: torch.Tensor, gram: torch.Tensor, bias: torch.Tensor | None, damp: float
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W~ [out, m], (G~ + lambda I)^-1 [m, m], dead [n]) in float64, where the constant input
    column (last of the augmented Gram) joins as a never-removed column when there is a bias.
    Dead columns (zero diagonal) get a unit diagonal and no coupling."""
    n = weight.shape[1]
    m = n + (bias is not None)
    h = gram[:m, :m].to(torch.float64).clone()
    dead = dead_columns(h)[:n]
    if dead.any():
        mask_dead(h, torch.cat([dead, torch.zeros(m - n, dtype=torch.bool, device=h.device)]))
    w = weight.detach().to(h.device, torch.float64)
    if bias is not None:
        w = torch.cat([w, bias.detach().to(h.device, torch.float64)[:, None]], dim=1)
    return w, damped_inverse(h, damp, what="OBS selection")[0], dead


def obs_select_columns(weight: torch.Tensor, gram: torch.Tensor, keep: int, damp: float,
                       bias: torch.Tensor | None = None, steps: int = 128) -> torch.Tensor:
    """Reconstruction-aware choice of the `keep` input columns of a consumer W [out, n] to keep.

    Greedy structured OBS (Optimal Brain Surgeon; ZipLM / SlimGPT style) on the single-stream
    least-squares objective ||W X - W' X_K||^2 with the re-fit W' of the kept columns: removing
    column j from the current solution costs ||W[:, j]||^2 / Hinv[j, j] (Hinv = inverse of the
    damped Gram), after which W and Hinv are updated as if the removed column were re-fitted
    away. Columns go in at most `steps` batches of the cheapest (each batch removed jointly), so
    correlated columns are not all kept or all removed together as independent scores would do.
    gram: the augmented Gram [n+1, n+1] of GramAccumulator (float64). Dead columns go first.
    Cost: (n - keep) * (out n + n^2) multiply-adds in float64. Returns ascending kept indices.
    """
    n = weight.shape[1]
    keep = int(min(n, max(1, keep)))
    w, hinv, dead = _obs_setup(weight, gram, bias, damp)
    alive = torch.ones(n, dtype=torch.bool, device=w.device)
    n_remove = n - keep
    n_dead = min(int(dead.sum()), n_remove)
    if n_dead:  # no signal reaches them: removing them changes nothing
        alive[dead.nonzero().flatten()[:n_dead]] = False
    batch = max(1, -(-(n_remove - n_dead) // steps))
    removed = n_dead
    while removed < n_remove:
        b = min(batch, n_remove - removed)
        d = torch.diagonal(hinv)[:n].clamp_min(1e-30)
        cost = (w[:, :n] ** 2).sum(0) / d
        cost[~alive] = float("inf")
        if not torch.isfinite(cost[alive]).all():
            raise FloatingPointError("non-finite OBS costs; the Gram statistics are degenerate")
        idx = cost.topk(b, largest=False).indices
        # joint removal of idx: W -= W[:, idx] Hinv[idx, idx]^-1 Hinv[idx, :]; Hinv likewise
        sub = hinv[idx][:, idx]
        coupling = torch.linalg.solve(sub, hinv[idx])  # [b, m]
        w -= w[:, idx] @ coupling
        hinv -= hinv[:, idx] @ coupling
        w[:, idx] = 0
        hinv[idx, :] = 0
        hinv[:, idx] = 0
        hinv[idx, idx] = 1.0  # removed: no longer coupled; any positive value keeps the costs finite
        alive[idx] = False
        removed += b
    return alive.nonzero().flatten().cpu()


def obs_unit_costs(weight: torch.Tensor, gram: torch.Tensor, unit_size: int, damp: float,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """Per unit of `unit_size` consecutive columns (a head), the least-squares error of removing it
    alone with the others re-fitted: tr(W_B Hinv[B, B]^-1 W_B^T) (block OBS), [n / unit_size]."""
    n = weight.shape[1]
    w, hinv, _ = _obs_setup(weight, gram, bias, damp)
    costs = []
    for start in range(0, n, unit_size):
        blk = slice(start, start + unit_size)
        wb = w[:, blk]
        costs.append(float((torch.linalg.solve(hinv[blk, blk], wb.T) * wb.T).sum()))
    return torch.tensor(costs, dtype=torch.float32)
