"""BatchNorm on the CPU in numba: per-channel statistics over batch and space.

Kernel contract (the same in `triton/batch_norm.py`):

    batch_norm_fwd(x, weight, bias, mean, var, eps, channels_last) -> (y, mean, var)
    batch_norm_bwd(dy, x, weight, bias, mean, var, eps, training, channels_last)
        -> (dx, dweight, dbias)

- `x`, `dy`, `weight`, `bias`: as in `cpu/group_norm.py` ((N, C, S) views; (C,) parameters of
  the compute dtype, ones and zeros when absent).
- forward: with `mean` and `var` None (training) the batch statistics are computed and returned,
  (C,) in the compute dtype, var biased; else the given (C,) running statistics normalize and are
  returned as they are.
- backward: `training` says whether mean and var were the batch's (they then depend on x);
  otherwise dx = dy·w·rstd.

How the work is laid out: channels-first input is read as N·C rows of S elements (one task per
row: the row's moments, merged over n in order per channel; the same rows for y and the
gradients). Channels-last input goes to `channels_last.py`
(one group per channel), the pieces merged over (n, block) in order. Deterministic.
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
    _chan,
    _chunk_moments,
    _dest,
    _dnorm,
    _flush,
    _grad_sums,
    _read,
    _sum_over_n,
    conform,
    consts,
    empty_layout,
    flat,
    threads,
)

# --- channels first: one task per (n, c) row ------------------------------------------------------


@njit(parallel=True, cache=True, error_model="numpy")
def _moments_rows(x, xkind, rows, s_, cp, pmean, pm2):
    for t in prange(rows):
        buf = np.empty(min(s_, _BLOCK), cp.dtype)
        pmean[t], pm2[t] = _chunk_moments(x, xkind, t * s_, s_, buf, cp)


@njit(cache=True, error_model="numpy")
def _merge_channels(pmean, pm2, n_, c_, count, mean, var):
    """Per channel: the moments of its N pieces of `count` elements, merged in order of n."""
    for c in range(c_):
        mu, m2, cnt = 0.0, 0.0, 0
        for n in range(n_):
            mu, m2, cnt = _chan(mu, m2, cnt, pmean[n * c_ + c], pm2[n * c_ + c], count)
        mean[c] = mu
        var[c] = m2 / cnt


@njit(parallel=True, cache=True, error_model="numpy")
def _apply_rows(x, xkind, y, ykind, mean, var, w, b, n_, c_, s_, cp):
    eps, one = cp[0], cp[1]
    for t in prange(n_ * c_):
        c = t % c_
        a = one / np.sqrt(var[c] + eps) * w[c]
        sh = b[c] - mean[c] * a
        buf, out = np.empty(min(s_, _BLOCK), cp.dtype), np.empty(min(s_, _BLOCK), cp.dtype)
        for o in range(t * s_, (t + 1) * s_, _BLOCK):
            k = min(_BLOCK, (t + 1) * s_ - o)
            _affine(_read(x, xkind, o, k, buf), a, sh, False, _dest(y, o, k, out), cp)
            _flush(y, ykind, o, k, out)


@njit(parallel=True, cache=True, error_model="numpy")
def _grad_sums_rows(dy, dykind, x, xkind, mean, var, n_, c_, s_, cp, sdy, sdyx):
    eps, one = cp[0], cp[1]
    for t in prange(n_ * c_):
        c = t % c_
        mu, r = mean[c], one / np.sqrt(var[c] + eps)
        xb, db = np.empty(min(s_, _BLOCK), cp.dtype), np.empty(min(s_, _BLOCK), cp.dtype)
        s1, s2 = cp[2], cp[2]
        for o in range(t * s_, (t + 1) * s_, _BLOCK):
            k = min(_BLOCK, (t + 1) * s_ - o)
            a1, a2 = _grad_sums(_read(dy, dykind, o, k, db), _read(x, xkind, o, k, xb), mu, r,
                                cp)
            s1 += a1
            s2 += a2
        sdy[t] = s1
        sdyx[t] = s2


@njit(parallel=True, cache=True, error_model="numpy")
def _dx_rows(dy, dykind, x, xkind, dx, dxkind, mean, var, mg, mgx, w, n_, c_, s_, cp):
    """dx = rstd·(w·dy − mg − x̂·mgx) per channel."""
    eps, one = cp[0], cp[1]
    for t in prange(n_ * c_):
        c = t % c_
        mu, r = mean[c], one / np.sqrt(var[c] + eps)
        blk = min(s_, _BLOCK)
        xb, db, ob = np.empty(blk, cp.dtype), np.empty(blk, cp.dtype), np.empty(blk, cp.dtype)
        for o in range(t * s_, (t + 1) * s_, _BLOCK):
            k = min(_BLOCK, (t + 1) * s_ - o)
            _dnorm(_read(dy, dykind, o, k, db), _read(x, xkind, o, k, xb), mu, r, w[c], mg[c],
                   mgx[c], _dest(dx, o, k, ob))
            _flush(dx, dxkind, o, k, ob)


# --- launchers ------------------------------------------------------------------------------------


def batch_norm_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   mean: torch.Tensor | None, var: torch.Tensor | None, eps: float,
                   channels_last: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if channels_last:
        return nhwc.batch_norm_fwd(x, weight, bias, mean, var, eps)
    x = conform(x, False)
    n_, c_, s_ = x.shape
    ct = weight.dtype
    cp = consts(ct, eps)
    y = empty_layout(x, False)
    training = mean is None
    if training:
        mean, var = torch.empty(c_, dtype=ct), torch.empty(c_, dtype=ct)
    if x.numel() == 0:
        if training:
            mean.fill_(float("nan"))
            var.fill_(float("nan"))
        return y, mean, var
    xa, xk = flat(x)
    ya, yk = flat(y)
    wa, ba, ma, va = flat(weight)[0], flat(bias)[0], flat(mean)[0], flat(var)[0]
    with OneThreadIf(threads(x.numel()) == 1):
        if training:
            pmean, pm2 = np.empty(n_ * c_, np.float64), np.empty(n_ * c_, np.float64)
            _moments_rows(xa, xk, n_ * c_, s_, cp, pmean, pm2)
            _merge_channels(pmean, pm2, n_, c_, s_, ma, va)
        _apply_rows(xa, xk, ya, yk, ma, va, wa, ba, n_, c_, s_, cp)
    return y, mean, var


def batch_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   mean: torch.Tensor, var: torch.Tensor, eps: float, training: bool,
                   channels_last: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if channels_last:
        return nhwc.batch_norm_bwd(dy, x, weight, bias, mean, var, eps, training)
    x = conform(x, False)
    dy = conform(dy, False)
    n_, c_, s_ = x.shape
    ct = weight.dtype
    cp = consts(ct, eps)
    dx = empty_layout(x, False)
    dw, db = torch.zeros(c_, dtype=ct), torch.zeros(c_, dtype=ct)
    if x.numel() == 0:
        return dx, dw, db
    dya, dyk = flat(dy)
    xa, xk = flat(x)
    dxa, dxk = flat(dx)
    wa, ma, va = flat(weight)[0], flat(mean)[0], flat(var)[0]
    dwa, dba = flat(dw)[0], flat(db)[0]
    with OneThreadIf(threads(x.numel()) == 1):
        psdy, psdyx = np.empty(n_ * c_, cp.dtype), np.empty(n_ * c_, cp.dtype)
        _grad_sums_rows(dya, dyk, xa, xk, ma, va, n_, c_, s_, cp, psdy, psdyx)
        _sum_over_n(psdy, n_, c_, dba)
        _sum_over_n(psdyx, n_, c_, dwa)
        # the means over the channel of w·dy and w·dy·x̂; zero when the statistics are constants
        count = float(n_ * s_)
        zeros = np.zeros(c_, cp.dtype)
        mg = np.asarray(wa * dba / count, dtype=cp.dtype) if training else zeros
        mgx = np.asarray(wa * dwa / count, dtype=cp.dtype) if training else zeros
        _dx_rows(dya, dyk, xa, xk, dxa, dxk, ma, va, mg, mgx, wa, n_, c_, s_, cp)
    return dx, dw, db
