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

How the work is laid out: channels-first input is one task per channel, whose N·S elements (N
rows of S, C·S apart) are read in order of (n, s) in blocks of `_BLOCK` elements that may span
rows, gathered into scratch (a block within one float row is read in place). Block moments by a
corrected two-pass, merged in order with Chan's formula; then y, row segment by row segment. A
channel of up to `_KEEP` elements keeps its gathered (converted) x, and in the backward dy, in
scratch between the two sweeps, so the input is read from memory once; the backward's sweeps are
Σdy, Σdy·x̂ (dbias, dweight), then dx, in the same task. The helpers are GroupNorm's
(`group_norm.py`). Channels-last input goes to `channels_last.py` (one group per channel), the
pieces merged over (n, block) in order. Every sum is in an order fixed by the shape:
deterministic, whatever the threads.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from . import channels_last as nhwc
from ._channels import (
    _BLOCK,
    _block_moments,
    _chan,
    _dest,
    _grad_sums,
    _read,
    conform,
    consts,
    empty_layout,
)
from ._dtypes import from_address, load_row
from ._launch import serial_twin
from .group_norm import (
    _KEEP,
    _scratch,
    _span,
    _store_affine,
    _store_dnorm,
    arg,
    runs,
)

# --- channels first: one task per channel ---------------------------------------------------------


@njit(inline="always", cache=True, error_model="numpy")
def _gather(x, xkind, c, p, k, c_, s_, dst):
    """Elements p..p + k of channel c in (n, s) order, in the compute type: a view of x when they
    lie in one row of it, else gathered into dst."""
    n = p // s_
    if p + k <= (n + 1) * s_:
        return _read(x, xkind, (n * c_ + c) * s_ + p - n * s_, k, dst)
    j = p
    while j < p + k:
        n = j // s_
        e = min(p + k, (n + 1) * s_)
        load_row(x, (n * c_ + c) * s_ + j - n * s_, e - j, xkind, dst[j - p:e - p])
        j = e
    return dst[:k]


@njit(inline="always", cache=True, error_model="numpy")
def _gathered(x, c, p, k, c_, s_, dst):
    """What `_gather` returned for the same block, from its kept copy in dst."""
    n = p // s_
    if p + k <= (n + 1) * s_:
        return _dest(x, (n * c_ + c) * s_ + p - n * s_, k, dst)
    return dst[:k]


@njit(cache=True, error_model="numpy")
def _fwd_channel(x, xkind, w, b, y, ykind, mean, var, c, n_, c_, s_, cp, training, buf):
    count = n_ * s_
    keep = training and count <= _KEEP
    if training:
        mu, m2, cnt = 0.0, 0.0, 0
        for p in range(0, count, _BLOCK):
            k = min(_BLOCK, count - p)
            q = p if keep else 0
            bm, bm2 = _block_moments(_gather(x, xkind, c, p, k, c_, s_, buf[q:q + k]), cp)
            mu, m2, cnt = _chan(mu, m2, cnt, bm, bm2, k)
        mean[c] = mu
        var[c] = m2 / count
    a = cp[1] / np.sqrt(var[c] + cp[0]) * w[c]
    sh = b[c] - mean[c] * a
    for p in range(0, count, _BLOCK):
        k = min(_BLOCK, count - p)
        if keep:
            xs = _gathered(x, c, p, k, c_, s_, buf[p:p + k])
        else:
            xs = _gather(x, xkind, c, p, k, c_, s_, buf[:k])
        j = p
        while j < p + k:  # the block's row segments
            n = j // s_
            e = min(p + k, (n + 1) * s_)
            _store_affine(xs[j - p:e - p], a, sh, False, y, (n * c_ + c) * s_ + j - n * s_,
                          ykind, cp[1])
            j = e


@njit(parallel=True, cache=True, error_model="numpy")
def _fwd_cf(xp, xt, xkind, wp, bp, yp, yt, ykind, meanp, varp, scr, n_, c_, s_, cp, training,
            nruns):
    total = n_ * c_ * s_
    x, y = from_address(xp, total, xt), from_address(yp, total, yt)
    w, b = from_address(wp, c_, cp), from_address(bp, c_, cp)
    mean, var = from_address(meanp, c_, cp), from_address(varp, c_, cp)
    per = scr.size // nruns
    for i in prange(nruns):
        buf = _scratch(scr, i * per, per)
        lo, hi = _span(i, nruns, c_)
        for c in range(lo, hi):
            _fwd_channel(x, xkind, w, b, y, ykind, mean, var, c, n_, c_, s_, cp, training, buf)


_fwd_cf_serial = serial_twin(_fwd_cf)


@njit(cache=True, error_model="numpy")
def _bwd_channel(dy, dykind, x, xkind, w, mean, var, dx, dxkind, dw, db, c, n_, c_, s_, cp,
                 training, xb, gb):
    """Sweep 0: dbias[c] = Σdy, dweight[c] = Σdy·x̂; sweep 1: dx = rstd·(w·dy − mg − x̂·mgx),
    mg and mgx the channel means of w·dy and w·dy·x̂ (zero when the statistics are constants)."""
    count = n_ * s_
    keep = count <= _KEEP
    mu, r = mean[c], cp[1] / np.sqrt(var[c] + cp[0])
    s1, s2 = cp[2], cp[2]
    for p in range(0, count, _BLOCK):
        k = min(_BLOCK, count - p)
        q = p if keep else 0
        xs = _gather(x, xkind, c, p, k, c_, s_, xb[q:q + k])
        ds = _gather(dy, dykind, c, p, k, c_, s_, gb[q:q + k])
        a1, a2 = _grad_sums(ds, xs, mu, r, cp)
        s1 += a1
        s2 += a2
    db[c], dw[c] = s1, s2
    mg, mgx = cp[2], cp[2]
    if training:
        mg, mgx = w[c] * s1 / cp.dtype.type(count), w[c] * s2 / cp.dtype.type(count)
    for p in range(0, count, _BLOCK):
        k = min(_BLOCK, count - p)
        if keep:
            xs = _gathered(x, c, p, k, c_, s_, xb[p:p + k])
            ds = _gathered(dy, c, p, k, c_, s_, gb[p:p + k])
        else:
            xs = _gather(x, xkind, c, p, k, c_, s_, xb[:k])
            ds = _gather(dy, dykind, c, p, k, c_, s_, gb[:k])
        j = p
        while j < p + k:  # the block's row segments
            n = j // s_
            e = min(p + k, (n + 1) * s_)
            _store_dnorm(ds[j - p:e - p], xs[j - p:e - p], mu, r, w[c], mg, mgx, dx,
                         (n * c_ + c) * s_ + j - n * s_, dxkind)
            j = e


@njit(parallel=True, cache=True, error_model="numpy")
def _bwd_cf(dyp, dyt, dykind, xp, xt, xkind, wp, meanp, varp, dxp, dxt, dxkind, dwp, dbp, scr,
            n_, c_, s_, cp, training, nruns):
    total = n_ * c_ * s_
    dy, x = from_address(dyp, total, dyt), from_address(xp, total, xt)
    dx = from_address(dxp, total, dxt)
    w, dw, db = from_address(wp, c_, cp), from_address(dwp, c_, cp), from_address(dbp, c_, cp)
    mean, var = from_address(meanp, c_, cp), from_address(varp, c_, cp)
    per = scr.size // nruns // 2
    for i in prange(nruns):
        xb, gb = _scratch(scr, 2 * i * per, per), _scratch(scr, (2 * i + 1) * per, per)
        lo, hi = _span(i, nruns, c_)
        for c in range(lo, hi):
            _bwd_channel(dy, dykind, x, xkind, w, mean, var, dx, dxkind, dw, db, c, n_, c_, s_,
                         cp, training, xb, gb)


_bwd_cf_serial = serial_twin(_bwd_cf)


def _kept(count: int) -> int:
    """Scratch elements per run and array: the channel when it is kept, else a block."""
    return count if count <= _KEEP else _BLOCK


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
    ms, vs = mean.contiguous(), var.contiguous()  # (C,) already: kept alive for the call
    nr = runs(x.numel(), c_)
    scr = np.empty(nr * _kept(n_ * s_), cp.dtype)
    kernel = _fwd_cf if nr > 1 else _fwd_cf_serial
    kernel(*arg(x), weight.data_ptr(), bias.data_ptr(), *arg(y), ms.data_ptr(), vs.data_ptr(), scr,
           n_, c_, s_, cp,
           training, nr)
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
    dw, db = torch.empty(c_, dtype=ct), torch.empty(c_, dtype=ct)
    if x.numel() == 0:
        return dx, dw.zero_(), db.zero_()
    mean, var = mean.contiguous(), var.contiguous()
    nr = runs(x.numel(), c_)
    scr = np.empty(2 * nr * _kept(n_ * s_), cp.dtype)
    kernel = _bwd_cf if nr > 1 else _bwd_cf_serial
    kernel(*arg(dy), *arg(x), weight.data_ptr(), mean.data_ptr(), var.data_ptr(), *arg(dx),
           dw.data_ptr(), db.data_ptr(), scr, n_, c_, s_, cp, training, nr)
    return dx, dw, db
