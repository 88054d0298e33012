"""GroupNorm and InstanceNorm on the CPU in numba; channels-last input goes to `channels_last.py`.

Kernel contract (the same in `triton/group_norm.py`; InstanceNorm is GroupNorm with G = C):

    group_norm_fwd(x, weight, bias, groups, eps, silu, channels_last) -> (y, mean, var)
    group_norm_bwd(dy, x, weight, bias, mean, var, groups, eps, silu, channels_last)
        -> (dx, dweight, dbias)

- `x`: an (N, C, S) view, S the product of the spatial sizes: contiguous when `channels_last` is
  false, strides (S·C, 1, C) when true (channels innermost). `dy` is brought to x's layout.
- `weight`, `bias`: contiguous (C,) tensors of the compute dtype (float32; float64 for float64
  input); the Python layer passes ones and zeros when the module has none.
- `y`, `dx`: new tensors of x's dtype and layout. `mean`, `var`: (N, G) in the compute dtype, var
  biased; rstd = 1/sqrt(var + eps) is recomputed identically wherever it is needed.
- silu: y = silu(x̂·w + b); the backward recomputes z = x̂·w + b rather than storing it.
- dweight, dbias: (C,) in the compute dtype.

How the channels-first work is laid out, and why: one task per (n, g). The group is one
contiguous run of C/G·S elements; it is read in blocks of `_BLOCK` elements, each block's
moments taken by a corrected two-pass while it is in L1, the blocks merged in order with Chan's
formula. The group is then normalized row by row while still in cache. The backward does the
same: per-channel sums Σg, Σg·x̂ (kept for dweight/dbias), then dx, in one task. Every sum is in
a fixed order: the results are bitwise deterministic.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from . import channels_last as nhwc
from ._channels import (
    _BLOCK,
    OneThreadIf,
    _affine,
    _chunk_moments,
    _dest,
    _dnorm,
    _flush,
    _grad_sums,
    _read,
    _silu_grad,
    _sum_over_n,
    conform,
    consts,
    empty_layout,
    flat,
    threads,
)

_SILU_KEEP = 1 << 16  # groups up to this size keep dy·silu'(z) between the backward's sweeps


@njit(inline="always", cache=True, error_model="numpy")
def _span(i, parts, total):
    """Tasks [lo, hi) of the i-th of `parts` equal runs (one run per thread: the scratch buffers
    are allocated once per run; results do not depend on the split)."""
    per = (total + parts - 1) // parts
    return i * per, min(total, (i + 1) * per)


@njit(parallel=True, cache=True, error_model="numpy")
def _fwd_cf(x, xkind, w, b, y, ykind, mean, var, n_, c_, s_, groups, cp, silu, runs):
    cg = c_ // groups
    size = cg * s_
    eps, one = cp[0], cp[1]
    for i in prange(runs):
        buf = np.empty(min(size, _BLOCK), cp.dtype)
        out = np.empty(min(s_, _BLOCK), cp.dtype)
        lo, hi = _span(i, runs, n_ * groups)
        for t in range(lo, hi):
            g = t % groups
            base = t * size
            mu64, m2 = _chunk_moments(x, xkind, base, size, buf, cp)
            mean[t] = mu64
            var[t] = m2 / size
            mu, v = mean[t], var[t]  # rounded as the backward will read them
            r = one / np.sqrt(v + eps)
            for ci in range(cg):
                c = g * cg + ci
                a = r * w[c]
                sh = b[c] - mu * a
                row = base + ci * s_
                for o in range(row, row + s_, _BLOCK):
                    n = min(_BLOCK, row + s_ - o)
                    _affine(_read(x, xkind, o, n, buf), a, sh, silu, _dest(y, o, n, out), cp)
                    _flush(y, ykind, o, n, out)


@njit(cache=True, error_model="numpy")
def _bwd_group(dy, dykind, x, xkind, w, b, mean, var, dx, dxkind, sdy, sdyx, t, c_, s_, groups,
               cp, silu, keep, xb, db, gb, ob):
    """Backward of group t = (n, g): sweep 0 sums Σg, Σg·x̂ per channel, sweep 1 writes dx."""
    cg = c_ // groups
    size = cg * s_
    n, g = t // groups, t % groups
    base = t * size
    mu = mean[t]
    r = cp[1] / np.sqrt(var[t] + cp[0])
    gs, gsx, mg, mgx = cp[2], cp[2], cp[2], cp[2]
    for sweep in range(2):
        if sweep == 1:
            mg = gs / cp.dtype.type(size)
            mgx = gsx / cp.dtype.type(size)
        for ci in range(cg):
            c = g * cg + ci
            row = base + ci * s_
            s1, s2 = cp[2], cp[2]
            for o in range(row, row + s_, _BLOCK):
                k = min(_BLOCK, row + s_ - o)
                xs = _read(x, xkind, o, k, xb)
                ds = _read(dy, dykind, o, k, db)
                if silu:
                    go = o - base if keep else 0
                    if sweep == 0 or not keep:
                        ds = _silu_grad(ds, xs, mu, r, w[c], b[c], gb[go:go + k], cp)
                    else:
                        ds = gb[go:go + k]
                if sweep == 0:
                    a1, a2 = _grad_sums(ds, xs, mu, r, cp)
                    s1 += a1
                    s2 += a2
                else:
                    _dnorm(ds, xs, mu, r, w[c], mg, mgx, _dest(dx, o, k, ob))
                    _flush(dx, dxkind, o, k, ob)
            if sweep == 0:
                sdy[n * c_ + c] = s1
                sdyx[n * c_ + c] = s2
                gs += w[c] * s1
                gsx += w[c] * s2


@njit(parallel=True, cache=True, error_model="numpy")
def _bwd_cf(dy, dykind, x, xkind, w, b, mean, var, dx, dxkind, sdy, sdyx, n_, c_, s_, groups,
            cp, silu, runs):
    cg = c_ // groups
    size = cg * s_
    blk = min(s_, _BLOCK)
    keep = silu and size <= _SILU_KEEP  # g kept from the first sweep instead of recomputed
    for i in prange(runs):
        xb, db, ob = np.empty(blk, cp.dtype), np.empty(blk, cp.dtype), np.empty(blk, cp.dtype)
        gb = np.empty(size if keep else blk, cp.dtype)
        lo, hi = _span(i, runs, n_ * groups)
        for t in range(lo, hi):
            _bwd_group(dy, dykind, x, xkind, w, b, mean, var, dx, dxkind, sdy, sdyx, t, c_, s_,
                       groups, cp, silu, keep, xb, db, gb, ob)


# --- launchers ------------------------------------------------------------------------------------


def group_norm_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int,
                   eps: float, silu: bool, channels_last: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if channels_last:
        return nhwc.group_norm_fwd(x, weight, bias, groups, eps, silu)
    x = conform(x, False)
    n_, c_, s_ = x.shape
    cp = consts(weight.dtype, eps)
    y = empty_layout(x, False)
    # statistics are internal (saved for backward): numpy-owned memory is cheaper to hand over
    ma, va = np.empty(n_ * groups, cp.dtype), np.empty(n_ * groups, cp.dtype)
    mean, var = torch.from_numpy(ma).view(n_, groups), torch.from_numpy(va).view(n_, groups)
    if x.numel() == 0:
        return y, mean.fill_(float("nan")), var.fill_(float("nan"))
    xa, xk = flat(x)
    ya, yk = flat(y)
    wa, ba = flat(weight)[0], flat(bias)[0]
    nt = threads(x.numel())
    with OneThreadIf(nt == 1):
        _fwd_cf(xa, xk, wa, ba, ya, yk, ma, va, n_, c_, s_, groups, cp, silu,
                max(1, min(n_ * groups, nt)))
    return y, mean, var


def group_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   mean: torch.Tensor, var: torch.Tensor, groups: int, eps: float, silu: bool,
                   channels_last: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if channels_last:
        return nhwc.group_norm_bwd(dy, x, weight, bias, mean, var, groups, eps, silu)
    x = conform(x, False)
    dy = conform(dy, False)
    n_, c_, s_ = x.shape
    cp = consts(weight.dtype, eps)
    dx = empty_layout(x, False)
    dw = torch.zeros(c_, dtype=weight.dtype)
    db = torch.zeros(c_, dtype=weight.dtype)
    if x.numel() == 0:
        return dx, dw, db
    sa, sxa = np.zeros(n_ * c_, cp.dtype), np.zeros(n_ * c_, cp.dtype)  # Σg, Σg·x̂ per (n, c)
    dya, dyk = flat(dy)
    xa, xk = flat(x)
    dxa, dxk = flat(dx)
    wa, ba, ma, va = flat(weight)[0], flat(bias)[0], flat(mean)[0], flat(var)[0]
    nt = threads(x.numel())
    with OneThreadIf(nt == 1):
        _bwd_cf(dya, dyk, xa, xk, wa, ba, ma, va, dxa, dxk, sa, sxa, n_, c_, s_, groups, cp,
                silu, max(1, min(n_ * groups, nt)))
    _sum_over_n(sa, n_, c_, flat(db)[0])
    _sum_over_n(sxa, n_, c_, flat(dw)[0])
    return dx, dw, db
