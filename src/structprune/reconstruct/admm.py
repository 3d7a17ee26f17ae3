"""Structured ADMM reconstruction of one MLP block (SparseLLM's alternating loop, structured).

Pure maths: tensors in, tensors out; computations run on the device of `x`, chunks and solves
in float64, the T x k auxiliary variables stored in float32 (float64 when `x` is float64).

Notation for one MLP block with kept neurons K (k = |K|), tokens as rows:
    x [T, d_in] (pruned stream, after the pre-MLP norm), y [T, d_out] (dense MLP output)
    plain:  m = x W1^T + b1,            h = act(m)
    gated:  m = x Wg^T (+ bg), u = x Wu^T (+ bu),  h = act(m) * u
    out = h W2^T + b2
Auxiliary variables (all [T, k]): z (gate / fc1 pre-activation), v (up output, gated only)
and p (the consumer's input). With normalised penalties a' = alpha / s_z, a_v' = alpha / s_v,
b' = beta / s_y, g' = gamma / s_p (s_* = mean squared norm per token of m, u, y and h at the
start, so the penalties are dimensionless) the surrogate is, per token,
    L = b' |y - W2 p - b2|^2 + g' |p - act(z) * v|^2 + a' |z - m|^2 (+ a_v' |v - u|^2)
(v = 1 and no last term when not gated). One iteration is exact block-coordinate descent on
L in the order p, z, v, producers, consumer; the weight solves are damped least squares
*towards the previous iterate* (a proximal step), which keeps L non-increasing. After each
iteration the network's consumer is re-fitted on the true activations h of the new
producers and the block's reconstruction error E = mean_t |y - h W2^T - b2|^2 decides: a step
that raises E is rejected (weights fall back to the last good iterate, the auxiliaries are
re-derived from it and the producers' damping grows tenfold). Iterate 0 is the one-shot
least-squares re-fit of the consumer, so the result is never worse than it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..linalg import damped_cholesky_solve
from .activations import Activation, resolve_activation
from .admm_steps import (
    gradient_weights,
    quadratic_error,
    solve_weights,
    update_p,
    update_up,
    update_z_relu,
    update_z_smooth,
)

log = logging.getLogger(__name__)

_EXACT_FIT = 1e-10  # relative error below which there is nothing left to reconstruct
# Newton steps and step halvings of the smooth z-update inside the loop. Each step can only lower
# the z-subproblem's cost, so fewer steps keep the descent property; measured on SmolLM2-135M
# (layer 10, 30%): 2 x 3 reaches the block error of 4 x 5 within 1% at a fraction of the time.
Z_STEPS, Z_HALVINGS = 2, 3


@dataclass
class AdmmResult:
    """Re-fitted MLP block on the kept neurons (same dtype and device as the inputs).

    history: one dict per iteration (0 = one-shot least squares) with "iter", "objective"
    (block reconstruction error E, mean squared error per token summed over outputs),
    "recon_error" (E relative to mean |y|^2), "surrogate" (the ADMM objective L) and
    "accepted".
    """

    producers: list[Tensor]
    producer_biases: list[Tensor | None]
    consumer: Tensor
    consumer_bias: Tensor | None
    history: list[dict] = field(default_factory=list)
    rejected: int = 0
    best_iter: int = 0


@dataclass
class _Problem:
    x: Tensor
    y: Tensor
    fn: Activation
    relu: bool
    act: str
    gated: bool
    chunk: int
    cols: list[int]  # input columns used by each producer (d_in, or d_in + 1 with a bias)
    has_b2: bool
    k: int

    def slices(self):
        for s in range(0, self.x.shape[0], self.chunk):
            yield slice(s, min(s + self.chunk, self.x.shape[0]))

    def inputs(self, sl: slice) -> tuple[Tensor, Tensor]:
        xc = self.x[sl].to(torch.float64)
        xa = torch.cat([xc, torch.ones(xc.shape[0], 1, dtype=xc.dtype, device=xc.device)], dim=1)
        return xa, self.y[sl].to(torch.float64)

    def produce(self, xa: Tensor, wps: Sequence[Tensor]) -> list[Tensor]:
        return [xa[:, :c] @ w.T for w, c in zip(wps, self.cols)]

    def hidden(self, ms: Sequence[Tensor]) -> Tensor:
        return self.fn(ms[0]) * ms[1] if self.gated else self.fn(ms[0])

    def aug(self, h: Tensor) -> Tensor:
        if not self.has_b2:
            return h
        return torch.cat([h, torch.ones(h.shape[0], 1, dtype=h.dtype, device=h.device)], dim=1)


@dataclass
class _State:
    z: Tensor
    p: Tensor
    v: Tensor | None
    stale: bool = True  # z, v, p to be re-derived from the current producers
    w2: Tensor | None = None  # the ADMM consumer (fitted on p), augmented


@dataclass
class _Penalties:
    alpha: float
    alpha_v: float
    beta: float
    gamma: float


def _zeros(n: int, m: int, like: Tensor) -> Tensor:
    return torch.zeros(n, m, dtype=torch.float64, device=like.device)


def _network_pass(pb: _Problem, wps: Sequence[Tensor], st: _State, pen: _Penalties | None,
                  init: bool) -> dict:
    """Gram of the true hidden activations (and, at init, of x and the scales); with
    penalties, the z / v / p terms of the surrogate at the new producers."""
    n_h = pb.k + int(pb.has_b2)
    out = {"gh": _zeros(n_h, n_h, pb.x), "ch": _zeros(pb.y.shape[1], n_h, pb.x), "terms": 0.0}
    if init:
        d = pb.x.shape[1] + 1
        out.update(gx=_zeros(d, d, pb.x), y_sq=0.0, s=[0.0] * (len(wps) + 1))
    for sl in pb.slices():
        xa, yc = pb.inputs(sl)
        ms = pb.produce(xa, wps)
        ha = pb.aug(pb.hidden(ms))
        out["gh"] += ha.T @ ha
        out["ch"] += yc.T @ ha
        if init:
            out["gx"] += xa.T @ xa
            out["y_sq"] += float((yc * yc).sum())
            for i, m in enumerate(ms):
                out["s"][i] += float((m * m).sum())
        if pen is not None and not st.stale:
            z = st.z[sl].to(torch.float64)
            v = None if st.v is None else st.v[sl].to(torch.float64)
            a = pb.fn(z) if v is None else pb.fn(z) * v
            terms = pen.alpha * ((z - ms[0]) ** 2).sum() + pen.gamma * ((st.p[sl] - a) ** 2).sum()
            if v is not None:
                terms = terms + pen.alpha_v * ((v - ms[1]) ** 2).sum()
            out["terms"] += float(terms)
    return out


def _aux_pass(pb: _Problem, wps: Sequence[Tensor], st: _State, pen: _Penalties) -> dict:
    """Updates p, z (and v) chunk by chunk in place; returns the cross-Grams for the producer
    solves and the Gram of p for the consumer solve."""
    d = pb.x.shape[1] + 1
    n_p = pb.k + int(pb.has_b2)
    out = {"cz": [_zeros(pb.k, d, pb.x) for _ in wps], "gp": _zeros(n_p, n_p, pb.x),
           "cp": _zeros(pb.y.shape[1], n_p, pb.x)}
    w2 = st.w2[:, : pb.k]
    b2 = st.w2[:, pb.k] if pb.has_b2 else None
    for sl in pb.slices():
        xa, yc = pb.inputs(sl)
        ms = pb.produce(xa, wps)
        if st.stale:
            z, v = ms[0], (ms[1] if pb.gated else None)
        else:
            z = st.z[sl].to(torch.float64)
            v = st.v[sl].to(torch.float64) if pb.gated else None
        target = pb.fn(z) if v is None else pb.fn(z) * v
        p = update_p(w2, b2, yc, target, pen.beta, pen.gamma)
        if pb.relu:
            z = update_z_relu(p, ms[0], pen.alpha, pen.gamma, v)
        else:  # elementwise Newton in the state dtype (float32 unless x is float64): the hot loop
            w = st.z.dtype
            z = update_z_smooth(p.to(w), ms[0].to(w), z.to(w), pb.act, pen.alpha, pen.gamma,
                                None if v is None else v.to(w), steps=Z_STEPS, halvings=Z_HALVINGS).to(torch.float64)
        if v is not None:
            v = update_up(p, pb.fn(z), ms[1], pen.alpha_v, pen.gamma)
            st.v[sl] = v.to(st.v.dtype)
            out["cz"][1] += v.T @ xa
        st.z[sl] = z.to(st.z.dtype)
        st.p[sl] = p.to(st.p.dtype)
        out["cz"][0] += z.T @ xa
        pa = pb.aug(p)
        out["gp"] += pa.T @ pa
        out["cp"] += yc.T @ pa
    st.stale = False
    return out


def _finite(*ts: Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in ts)


def _validate(x: Tensor, y: Tensor, producers: Sequence[Tensor], producer_biases: Sequence[Tensor | None],
              consumer: Tensor, consumer_bias: Tensor | None, keep: Tensor, gated: bool, iters: int,
              alpha: float, beta: float, gamma: float, damp: float, chunk_tokens: int, sgd_steps: int) -> None:
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must be [T, d] with the same T; got {tuple(x.shape)} and {tuple(y.shape)}")
    want = 2 if gated else 1
    if len(producers) != want or len(producer_biases) != want:
        raise ValueError(f"gated={gated} needs {want} producer(s) and biases; got {len(producers)}, "
                         f"{len(producer_biases)}")
    d_ffn = consumer.shape[1]
    for i, (w, b) in enumerate(zip(producers, producer_biases)):
        if w.shape != (d_ffn, x.shape[1]):
            raise ValueError(f"producers[{i}] has shape {tuple(w.shape)}; expected {(d_ffn, x.shape[1])}")
        if b is not None and b.shape != (d_ffn,):
            raise ValueError(f"producer_biases[{i}] has shape {tuple(b.shape)}; expected {(d_ffn,)}")
    if consumer.shape[0] != y.shape[1]:
        raise ValueError(f"consumer has shape {tuple(consumer.shape)}; expected [{y.shape[1]}, d_ffn]")
    if consumer_bias is not None and consumer_bias.shape != (y.shape[1],):
        raise ValueError(f"consumer_bias has shape {tuple(consumer_bias.shape)}; expected {(y.shape[1],)}")
    if keep.ndim != 1 or keep.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"keep must be a 1-D integer tensor of neuron indices; got {keep.dtype} {tuple(keep.shape)}")
    if keep.numel() and (int(keep.min()) < 0 or int(keep.max()) >= d_ffn):
        raise ValueError(f"keep indices must lie in [0, {d_ffn}); got [{int(keep.min())}, {int(keep.max())}]")
    if keep.unique().numel() != keep.numel():
        raise ValueError("keep contains repeated neuron indices")
    for name, value, ok in (("iters", iters, iters >= 0), ("alpha", alpha, alpha > 0), ("beta", beta, beta > 0),
                            ("gamma", gamma, gamma > 0), ("damp", damp, damp >= 0),
                            ("chunk_tokens", chunk_tokens, chunk_tokens >= 1), ("sgd_steps", sgd_steps, sgd_steps >= 0)):
        if not ok:
            raise ValueError(f"{name}={value!r} is invalid: penalties must be > 0, counts >= 0 (chunk_tokens >= 1)")
    if not (_finite(x) and _finite(y)):
        raise ValueError("x or y contains NaN or Inf; the calibration activations are corrupt")


def _unpack(wps: Sequence[Tensor], w2: Tensor, producers: Sequence[Tensor],
            producer_biases: Sequence[Tensor | None], consumer: Tensor, consumer_bias: Tensor | None,
            k: int) -> tuple[list[Tensor], list[Tensor | None], Tensor, Tensor | None]:
    ws, bs = [], []
    for w_aug, w0, b0 in zip(wps, producers, producer_biases):
        ws.append(w_aug[:, : w0.shape[1]].to(w0.device, w0.dtype).contiguous())
        bs.append(None if b0 is None else w_aug[:, -1].to(b0.device, b0.dtype).contiguous())
    c = w2[:, :k].to(consumer.device, consumer.dtype).contiguous()
    cb = None if consumer_bias is None else w2[:, k].to(consumer_bias.device, consumer_bias.dtype).contiguous()
    return ws, bs, c, cb


def admm_mlp(x: Tensor, y: Tensor, producers: Sequence[Tensor], producer_biases: Sequence[Tensor | None],
             consumer: Tensor, consumer_bias: Tensor | None, keep: Tensor, act: str, gated: bool,
             iters: int = 4, alpha: float = 1.0, beta: float = 1.0, gamma: float = 1.0,
             damp: float = 0.01, chunk_tokens: int = 8192, sgd_steps: int = 0) -> AdmmResult:
    """Re-fit an MLP block on its kept neurons by structured ADMM (see the module docstring).

    x [T, d_in] block input on the pruned stream, y [T, d_out] dense block output;
    producers: (gate, up) weights [d_ffn, d_in] when gated, else (fc1,); consumer [d_out, d_ffn];
    keep: indices of the kept neurons. alpha / beta / gamma: dimensionless penalties of the
    producer fit, the output fit and the activation consistency; damp: relative ridge damping
    of the weight solves; sgd_steps > 0 replaces the producers' closed form by that many
    gradient steps. Returns the kept rows / columns in the inputs' dtypes and devices.
    """
    _validate(x, y, producers, producer_biases, consumer, consumer_bias, keep, gated, iters, alpha, beta,
              gamma, damp, chunk_tokens, sgd_steps)
    keep = keep.to(torch.long)
    pb, wps0, w2_0, st = _setup(x, y, producers, producer_biases, consumer, consumer_bias, keep, act, gated,
                                chunk_tokens)
    k, n_tok = pb.k, x.shape[0]
    # iterate 0: one-shot least-squares re-fit of the consumer on the kept neurons
    net = _network_pass(pb, wps0, st, None, init=True)
    y_sq = net["y_sq"]
    s_y = y_sq / max(n_tok, 1)
    good_wps = wps0
    good_w2, good_e = _one_shot(net, w2_0, damp, n_tok)
    pen = _penalties(net, k, len(wps0), n_tok, s_y, alpha, beta, gamma)
    st.w2 = good_w2
    history = [{"iter": 0, "objective": good_e, "recon_error": good_e / max(s_y, 1e-30),
                "surrogate": pen.beta * good_e, "accepted": True}]
    log.debug("ADMM iter 0 (one-shot lstsq): E=%.6g (relative %.4g)", good_e, history[0]["recon_error"])
    rejected, best_iter, pdamp = 0, 0, damp

    for it in range(1, iters + 1):
        if k == 0 or good_e <= _EXACT_FIT * s_y:
            log.debug("ADMM stops at iter %d: nothing left to reconstruct (E=%.3g)", it, good_e)
            break
        e, sur, why, new_wps, w2_admm, w2_net = _iteration(pb, st, pen, net, good_wps, good_w2, good_e, y_sq,
                                                           pdamp, damp, sgd_steps)
        accepted = why is None
        history.append({"iter": it, "objective": e, "recon_error": e / max(s_y, 1e-30), "surrogate": sur,
                        "accepted": accepted})
        if accepted:
            good_wps, good_w2, good_e, best_iter = new_wps, w2_net, e, it
            st.w2 = w2_admm
            log.debug("ADMM iter %d: E=%.6g (relative %.4g), surrogate %.6g", it, e, history[-1]["recon_error"], sur)
        else:
            rejected += 1
            pdamp = max(pdamp, 1e-6) * 10.0
            st.stale, st.w2 = True, good_w2
            log.warning("ADMM iter %d rejected: %s; back to iterate %d, producer damping now %.3g",
                        it, why, best_iter, pdamp)

    ws, bs, c, cb = _unpack(good_wps, good_w2, producers, producer_biases, consumer, consumer_bias, k)
    if not _finite(c, *ws, *(b for b in bs if b is not None), *([cb] if cb is not None else [])):
        log.warning("ADMM result overflows the weight dtype; returning the sliced original weights")
        ws, bs, c, cb = _unpack(wps0, w2_0, producers, producer_biases, consumer, consumer_bias, k)
        best_iter = -1
    e0 = history[0]["objective"]
    log.info("ADMM MLP: %d kept neurons, E %.6g -> %.6g (%.1f%% of one-shot lstsq) at iter %d, %d step(s) rejected",
             k, e0, good_e, 100.0 * good_e / e0 if e0 > 0 else 100.0, best_iter, rejected)
    return AdmmResult(producers=ws, producer_biases=bs, consumer=c, consumer_bias=cb, history=history,
                      rejected=rejected, best_iter=best_iter)


def _setup(x: Tensor, y: Tensor, producers: Sequence[Tensor], producer_biases: Sequence[Tensor | None],
           consumer: Tensor, consumer_bias: Tensor | None, keep: Tensor, act: str, gated: bool,
           chunk_tokens: int) -> tuple[_Problem, list[Tensor], Tensor, _State]:
    """(the problem, the sliced producers [k, d_in (+1)] and consumer [d_out, k (+1)] in float64 on
    x's device, the empty auxiliary state [T, k]); logs the buffers' sizes."""
    name, fn, _ = resolve_activation(act)
    dev = x.device
    k, n_tok, d_in = keep.numel(), x.shape[0], x.shape[1]

    def augment(w: Tensor, b: Tensor | None) -> Tensor:
        w = w.detach()[keep.to(w.device)].to(dev, torch.float64)
        if b is None:
            return w
        return torch.cat([w, b.detach()[keep.to(b.device)].to(dev, torch.float64)[:, None]], dim=1)

    wps0 = [augment(w, b) for w, b in zip(producers, producer_biases)]
    w2_0 = consumer.detach()[:, keep.to(consumer.device)].to(dev, torch.float64)
    if consumer_bias is not None:
        w2_0 = torch.cat([w2_0, consumer_bias.detach().to(dev, torch.float64)[:, None]], dim=1)
    pb = _Problem(x=x, y=y, fn=fn, relu=name == "relu", act=name, gated=gated, chunk=chunk_tokens,
                  cols=[d_in + int(b is not None) for b in producer_biases], has_b2=consumer_bias is not None, k=k)

    state_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    n_state = 3 if gated else 2
    mib = 2.0**20
    log.info("ADMM buffers on %s: state %.1f MiB (%d x [%d, %d] %s), chunk temporaries ~%.1f MiB (%d tokens), "
             "Gram matrices %.1f MiB", dev, n_state * n_tok * k * state_dtype.itemsize / mib, n_state, n_tok, k,
             state_dtype, min(chunk_tokens, n_tok) * (d_in + 1 + y.shape[1] + 8 * k) * 8 / mib, chunk_tokens,
             ((d_in + 1) ** 2 + 2 * (k + 1) ** 2 + (2 * k + y.shape[1]) * (d_in + k + 2)) * 8 / mib)

    st = _State(z=torch.empty(n_tok, k, dtype=state_dtype, device=dev),
                p=torch.empty(n_tok, k, dtype=state_dtype, device=dev),
                v=torch.empty(n_tok, k, dtype=state_dtype, device=dev) if gated else None)
    return pb, wps0, w2_0, st


def _one_shot(net: dict, w2_0: Tensor, damp: float, n_tok: int) -> tuple[Tensor, float]:
    """Iterate 0: (consumer, error E) of the better of two least-squares re-fits on the true
    hidden activations (damped towards the sliced weights, or towards zero); the sliced
    weights w2_0 only when every re-fit failed or is not finite."""
    y_sq = net["y_sq"]
    candidates = [w2_0]
    for solver in (lambda: solve_weights(net["gh"], net["ch"], w2_0, damp),
                   lambda: damped_cholesky_solve(net["gh"], net["ch"], damp)):
        try:
            candidates.append(solver())
        except FloatingPointError as exc:
            log.warning("one-shot consumer re-fit failed (%s)", exc)
    errs = [quadratic_error(net["gh"], net["ch"], y_sq, w, n_tok) if _finite(w) else math.inf for w in candidates]
    # prefer a re-fit over the sliced weights; the sliced ones only when every re-fit failed
    best_c = min(range(1, len(candidates)), key=lambda i: errs[i], default=0)
    if not math.isfinite(errs[best_c]):
        log.warning("one-shot consumer re-fit is not finite; starting from the sliced weights")
        best_c = 0
    return candidates[best_c], errs[best_c]


def _penalties(net: dict, k: int, n_producers: int, n_tok: int, s_y: float, alpha: float, beta: float,
               gamma: float) -> _Penalties:
    """The penalties divided by the mean squared norms per token of m (u), y and h at the start."""
    floor = 1e-12 * max(s_y, 1e-30)
    s_h = float(torch.diagonal(net["gh"])[:k].sum()) / max(n_tok, 1)
    s_m = [s / max(n_tok, 1) for s in net["s"][:n_producers]]
    return _Penalties(alpha=alpha / max(s_m[0], floor), alpha_v=alpha / max(s_m[-1], floor),
                      beta=beta / max(s_y, floor), gamma=gamma / max(s_h, floor))


def _iteration(pb: _Problem, st: _State, pen: _Penalties, net: dict, good_wps: list[Tensor], good_w2: Tensor,
               good_e: float, y_sq: float, pdamp: float, damp: float, sgd_steps: int
               ) -> tuple[float, float, str | None, list[Tensor], Tensor | None, Tensor | None]:
    """One ADMM iteration from the last good iterate: (E, surrogate L, why it is rejected or None,
    new producers, ADMM consumer, network consumer). Updates the auxiliaries in `st`."""
    n_tok = pb.x.shape[0]
    e, sur, why = math.inf, math.inf, None
    new_wps: list[Tensor] = []
    w2_admm = w2_net = None
    try:
        aux = _aux_pass(pb, good_wps, st, pen)
        for i, (w, c) in enumerate(zip(good_wps, pb.cols)):
            g, cr = net["gx"][:c, :c], aux["cz"][i][:, :c]
            new_wps.append(gradient_weights(g, cr, w, pdamp, sgd_steps) if sgd_steps
                           else solve_weights(g, cr, w, pdamp))
        w2_admm = solve_weights(aux["gp"], aux["cp"], st.w2, damp)
        out = _network_pass(pb, new_wps, st, pen, init=False)
        w2_net = solve_weights(out["gh"], out["ch"], good_w2, damp)
        if not _finite(w2_admm, w2_net, *new_wps):
            why = "non-finite weights"
        else:
            e = quadratic_error(out["gh"], out["ch"], y_sq, w2_net, n_tok)
            sur = (out["terms"] + pen.beta * n_tok * quadratic_error(aux["gp"], aux["cp"], y_sq, w2_admm, n_tok)
                   ) / max(n_tok, 1)
            if not (math.isfinite(e) and math.isfinite(sur)):
                why = "non-finite objective"
            elif e > good_e:
                why = f"objective rose from {good_e:.6g} to {e:.6g}"
    except FloatingPointError as exc:
        why = f"solve failed ({exc})"
    return e, sur, why, new_wps, w2_admm, w2_net
