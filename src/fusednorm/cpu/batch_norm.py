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

How the work is laid out, channels first: float32 and bfloat16 are read in place, in memory
order (a channel's rows are C·S apart: walking one channel at a time strides across pages and
measured up to 2.5x slower). The statistics: N is split by its size alone into up to `_CHUNKS`
chunks of samples; a chunk's rows (n, c) are read in order, each row's moments taken by a
corrected two-pass (`_run_moments`) and merged into its channel's in sample order with Chan's
formula; the chunks are merged in order. Then y over all rows in order. The backward likewise:
per-chunk Σdy, Σdy·x̂ per channel (each row summed whole), added in chunk order (dbias,
dweight), then dx in order. float16, whose conversion is too slow to repeat, is one task per channel instead,
read in blocks of `_BLOCK` elements that may span rows, gathered and converted into scratch
that keeps a channel of up to `_KEEP` elements between the two sweeps. The helpers are
GroupNorm's (`group_norm.py`). Channels-last input goes to `channels_last.py` (one group per
channel), the pieces merged over (n, block) in order. Every sum is in an order fixed by the shape:
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
from ._dtypes import F16, from_address, load_row
from ._launch import serial_twin
from .group_norm import (
    _KEEP,
    _run_moments,
    _scratch,
    _span,
    _store_affine,
    _store_dnorm,
    arg,
    runs,
)

_CHUNKS = 16  # chunks of samples whose per-channel statistics are merged in order

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


@njit(cache=True, error_model="numpy")
def _chunks(n_):
    """(samples per chunk, chunks): N split into up to `_CHUNKS` chunks of samples, from N alone."""
    per = (n_ + _CHUNKS - 1) // _CHUNKS
    return per, (n_ + per - 1) // per


@njit(cache=True, error_model="numpy")
def _chunk_moments(x, n0, n1, c_, s_, cp, pm, pm2):
    """Per-channel float64 (mean, M2) of samples n0..n1 into pm, pm2 (C), read in memory order:
    each row's moments (`_run_moments`, in place) merged in sample order with Chan's formula."""
    for n in range(n0, n1):
        for c in range(c_):
            o = (n * c_ + c) * s_
            rm, rm2 = _run_moments(x[o:o + s_], cp)
            if n == n0:
                pm[c], pm2[c] = rm, rm2
            else:
                pm[c], pm2[c], _ = _chan(pm[c], pm2[c], (n - n0) * s_, rm, rm2, s_)


@njit(cache=True, error_model="numpy")
def _chunk_grad_sums(dy, x, n0, n1, c_, s_, co, cp, s1, s2):
    """Per-channel Σdy and Σdy·x̂ of samples n0..n1 into s1, s2 (C), dy and x read in place in
    memory order, each row summed whole then added in sample order; co: mean and rstd (2·C)."""
    for n in range(n0, n1):
        for c in range(c_):
            o = (n * c_ + c) * s_
            a1, a2 = _grad_sums(dy[o:o + s_], x[o:o + s_], co[c], co[c_ + c], cp)
            if n == n0:
                s1[c], s2[c] = a1, a2
            else:
                s1[c] += a1
                s2[c] += a2


@njit(parallel=True, cache=True, error_model="numpy")
def _fwd_cf(xp, xt, xkind, wp, bp, yp, yt, ykind, meanp, varp, scr, n_, c_, s_, cp, training,
            nruns):
    total = n_ * c_ * s_
    x, y = from_address(xp, total, xt), from_address(yp, total, yt)
    w, b = from_address(wp, c_, cp), from_address(bp, c_, cp)
    mean, var = from_address(meanp, c_, cp), from_address(varp, c_, cp)
    if xkind == F16:
        per = scr.size // nruns
        for i in prange(nruns):
            buf = _scratch(scr, i * per, per)
            lo, hi = _span(i, nruns, c_)
            for c in range(lo, hi):
                _fwd_channel(x, xkind, w, b, y, ykind, mean, var, c, n_, c_, s_, cp, training,
                             buf)
        return
    if training:
        per, nch = _chunks(n_)
        pm = np.empty(2 * nch * c_)
        for i in prange(nruns):
            lo, hi = _span(i, nruns, nch)
            for k in range(lo, hi):
                _chunk_moments(x, k * per, min(n_, (k + 1) * per), c_, s_, cp,
                               pm[2 * k * c_:(2 * k + 1) * c_], pm[(2 * k + 1) * c_:(2 * k + 2) * c_])
        for c in range(c_):  # the chunks merged in order
            mu, m2, cnt = 0.0, 0.0, 0
            for k in range(nch):
                mu, m2, cnt = _chan(mu, m2, cnt, pm[2 * k * c_ + c], pm[(2 * k + 1) * c_ + c],
                                    (min(n_, (k + 1) * per) - k * per) * s_)
            mean[c] = mu
            var[c] = m2 / cnt
    ab = np.empty(2 * c_, cp.dtype)
    for c in range(c_):
        ab[c] = cp[1] / np.sqrt(var[c] + cp[0]) * w[c]
        ab[c_ + c] = b[c] - mean[c] * ab[c]
    for i in prange(nruns):  # y in memory order: the rows (n, c) streamed
        lo, hi = _span(i, nruns, n_ * c_)
        for q in range(lo, hi):
            c = q % c_
            _store_affine(x[q * s_:(q + 1) * s_], ab[c], ab[c_ + c], False, y, q * s_, ykind,
                          cp[1])


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
    if xkind == F16 or dykind == F16:
        per = scr.size // nruns // 2
        for i in prange(nruns):
            xb, gb = _scratch(scr, 2 * i * per, per), _scratch(scr, (2 * i + 1) * per, per)
            lo, hi = _span(i, nruns, c_)
            for c in range(lo, hi):
                _bwd_channel(dy, dykind, x, xkind, w, mean, var, dx, dxkind, dw, db, c, n_,
                             c_, s_, cp, training, xb, gb)
        return
    co = np.empty(4 * c_, cp.dtype)  # per channel: mean, rstd, the means of w·dy, w·dy·x̂
    for c in range(c_):
        co[c], co[c_ + c] = mean[c], cp[1] / np.sqrt(var[c] + cp[0])
    per, nch = _chunks(n_)
    ps = np.empty(2 * nch * c_, cp.dtype)  # per chunk: Σdy, Σdy·x̂ per channel
    for i in prange(nruns):
        lo, hi = _span(i, nruns, nch)
        for k in range(lo, hi):
            _chunk_grad_sums(dy, x, k * per, min(n_, (k + 1) * per), c_, s_, co, cp,
                             ps[2 * k * c_:(2 * k + 1) * c_], ps[(2 * k + 1) * c_:(2 * k + 2) * c_])
    for c in range(c_):
        s1, s2 = ps[c], ps[c_ + c]
        for k in range(1, nch):
            s1 += ps[2 * k * c_ + c]
            s2 += ps[(2 * k + 1) * c_ + c]
        db[c], dw[c] = s1, s2
        co[2 * c_ + c], co[3 * c_ + c] = cp[2], cp[2]  # zero when the statistics are constants
        if training:
            co[2 * c_ + c] = w[c] * s1 / cp.dtype.type(n_ * s_)
            co[3 * c_ + c] = w[c] * s2 / cp.dtype.type(n_ * s_)
    for i in prange(nruns):  # dx in memory order
        lo, hi = _span(i, nruns, n_ * c_)
        for q in range(lo, hi):
            c = q % c_
            o = q * s_
            _store_dnorm(dy[o:o + s_], x[o:o + s_], co[c], co[c_ + c], w[c], co[2 * c_ + c],
                         co[3 * c_ + c], dx, o, dxkind)


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
    half = x.dtype == torch.float16  # the per-channel blocked path, with its scratch
    nr = runs(x.numel(), c_ if half else n_ * c_)
    scr = np.empty(nr * _kept(n_ * s_) if half else 0, cp.dtype)
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
    half = torch.float16 in (x.dtype, dy.dtype)  # the per-channel blocked path, with its scratch
    nr = runs(x.numel(), c_ if half else n_ * c_)
    scr = np.empty(2 * nr * _kept(n_ * s_) if half else 0, cp.dtype)
    kernel = _bwd_cf if nr > 1 else _bwd_cf_serial
    kernel(*arg(dy), *arg(x), weight.data_ptr(), mean.data_ptr(), var.data_ptr(), *arg(dx),
           dw.data_ptr(), db.data_ptr(), scr, n_, c_, s_, cp, training, nr)
    return dx, dw, db
