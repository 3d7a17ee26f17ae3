"""Calibration statistics of one projection's input: per-column sums and Gram matrices.

Pure accumulation: tensors in, running sums out, on the device they were created on.
Inputs are augmented with a constant 1 so a bias is one more column: x~ = [x, 1].
    x_p   input on the pruned stream, x_d the same token's input on the dense stream;
    G  = sum x~_p x~_p^T    Gram of pruned-stream inputs, [n+1, n+1]
    C  = sum x~_d x~_p^T    cross-Gram dense/pruned (equals G while the streams agree)
    D  = sum x~_d x~_d^T    Gram of dense-stream inputs
Per column of x_p: the sum and the sum of squares (float64), from which the input norm, mean
and variance that importance scorers read. The re-fit that consumes G, C, D is reconstruct/lstsq.py.
"""

from __future__ import annotations

import torch


class GramAccumulator:
    """Running sums of x~_p x~_p^T, x~_d x~_p^T and x~_d x~_d^T.

    `add_batch(x_p, x_d)` takes [..., n] tensors (any float dtype, same token order);
    x_d defaults to x_p (a single stream). While every batch is single-stream the three sums
    are equal and one (n+1)^2 matrix holds them: `cross` and `gram_d` are then the same tensor
    as `gram` (read them, never add to them). The first batch with an x_d splits them.
    With full=False only the per-column sums and sums of squares of x_p are kept (enough for
    scores; no re-fit), at a fraction of the cost.

    Precision: the per-column sums are float64; the Gram sums are `dtype` (default: float64 up to
    `float64_max_bytes` per matrix, float32 above). `release()` frees the Gram sums once a re-fit
    has taken what it needs (the per-column sums stay, so scores remain available).

    Memory: (n+1)^2 elements of `dtype` (three times that once two streams were seen), plus a
    float32 product block of at most `block_elems` elements per batch.
    """

    block_elems = 1 << 24  # float32 elements (64 MiB) of one product block in add_batch
    float64_max_bytes = 256 << 20  # larger Gram matrices are summed in float32 (n+1 > 5792)

    def __init__(self, n: int, device: torch.device | str = "cpu", full: bool = True,
                 dtype: torch.dtype | None = None) -> None:
        self.n = n
        self.count = 0
        self.full = full
        self.col_sum = torch.zeros(n, dtype=torch.float64, device=device)
        self.sq_sum = torch.zeros(n, dtype=torch.float64, device=device)
        m = n + 1
        if dtype is None:
            dtype = torch.float64 if m * m * 8 <= self.float64_max_bytes else torch.float32
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype={dtype} is not supported for Gram sums; use torch.float32 or torch.float64")
        self.dtype = dtype
        shape = (m, m) if full else (0, 0)
        self.gram = torch.zeros(shape, dtype=dtype, device=device)
        self._cross: torch.Tensor | None = None  # None: single stream, equal to gram
        self._gram_d: torch.Tensor | None = None
        self.released = False

    @property
    def single_stream(self) -> bool:
        """True while no batch came with a separate dense-stream input (C = D = G)."""
        return self._cross is None

    @property
    def cross(self) -> torch.Tensor:
        """C = sum x~_d x~_p^T, [n+1, n+1] (the `gram` tensor itself while single-stream)."""
        return self.gram if self._cross is None else self._cross

    @property
    def gram_d(self) -> torch.Tensor:
        """D = sum x~_d x~_d^T, [n+1, n+1] (the `gram` tensor itself while single-stream)."""
        return self.gram if self._gram_d is None else self._gram_d

    def release(self) -> None:
        """Free the Gram sums (the per-column sums and count stay). Later re-fits, batches or
        reads of `gram` / `cross` / `gram_d` are errors."""
        empty = torch.zeros((0, 0), dtype=self.dtype, device=self.gram.device)
        self.gram, self._cross, self._gram_d = empty, None, None
        self.released = True

    def check_live(self) -> None:
        """RuntimeError when the Gram sums were released (a re-fit needs them)."""
        if self.released and self.full:
            raise RuntimeError("the Gram sums of this accumulator were released (after a re-fit); "
                               "gather new statistics")

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)

    def _rows(self) -> int:
        return max(1, self.block_elems // (self.n + 1))

    def _add_sym(self, acc: torch.Tensor, x: torch.Tensor) -> None:
        """acc += x^T x, formed in float32 blocks of rows on and right of the diagonal, mirrored."""
        m, step = x.shape[1], self._rows()
        for i in range(0, m, step):
            j = min(i + step, m)
            blk = x[:, i:j].T @ x[:, i:]  # [j - i, m - i] float32
            acc[i:j, i:] += blk
            acc[j:, i:j] += blk[:, j - i:].T

    def _add_cross(self, acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        """acc += a^T b in float32 row blocks."""
        step = self._rows()
        for i in range(0, a.shape[1], step):
            acc[i:i + step] += a[:, i:i + step].T @ b

    def add_batch(self, x_p: torch.Tensor, x_d: torch.Tensor | None = None) -> None:
        """Products are formed in float32 per block (BLAS speed) and summed in `dtype`."""
        self.check_live()
        x = x_p.reshape(-1, self.n).to(self.col_sum.device, torch.float32)
        self.count += x.shape[0]
        self.col_sum += x.sum(0).double()
        self.sq_sum += (x * x).sum(0).double()
        if not self.full:
            return
        xp = self._augment(x)
        if x_d is None:
            self._add_sym(self.gram, xp)
            if self._cross is not None:  # two streams already: this batch's dense input is x_p
                self._add_sym(self._gram_d, xp)
                self._add_sym(self._cross, xp)
            return
        xd = self._augment(x_d.reshape(-1, self.n).to(self.col_sum.device, torch.float32))
        if xd.shape != xp.shape:
            raise ValueError(f"dense and pruned inputs differ in shape: {tuple(xd.shape)} vs {tuple(xp.shape)}")
        if self._cross is None:  # the streams part: the sums so far were equal
            self._cross, self._gram_d = self.gram.clone(), self.gram.clone()
        self._add_sym(self.gram, xp)
        self._add_sym(self._gram_d, xd)
        self._add_cross(self._cross, xd, xp)

    @property
    def input_norm(self) -> torch.Tensor:
        """Per-column L2 norm of the pruned-stream input over all tokens, [n] float32."""
        return self.sq_sum.clamp_min(0).sqrt().float()

    @property
    def input_mean(self) -> torch.Tensor:
        """Per-column mean of the pruned-stream input, [n] float64."""
        return self.col_sum / max(self.count, 1)

    @property
    def input_var(self) -> torch.Tensor:
        """Per-column variance of the pruned-stream input, [n] float64."""
        mean = self.input_mean
        return (self.sq_sum / max(self.count, 1) - mean * mean).clamp_min(0)
