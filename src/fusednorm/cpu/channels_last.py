"""GroupNorm, InstanceNorm and BatchNorm on channels-last input, on the CPU in numba.

The contract is the one at the top of `group_norm.py` (BatchNorm's, `batch_norm.py`), with x an
(N, C, S) view of strides (S·C, 1, C): channels innermost, so x is N·S rows of C channels.

The rows are read in blocks of `rows` = 4096 // C rows (a shape-only split, so the result never
depends on the thread count). A block's per-channel sums (inner loops along channels,
contiguous, a few rows per sweep) give per-(n, block, group) moments by a corrected two-pass
while the block is in L1; the pieces are merged in float64 in block order with Chan's formula.
BatchNorm and InstanceNorm are the case of one group per channel; BatchNorm's blocks run over
all N·S rows, merged by spans of `_SPAN` blocks, then span by span. Every sum is in a fixed
order: the results are bitwise deterministic.

How a call is made cheap (see `_launch.py`): one kernel per call, taking tensors as addresses;
below `PARALLEL_GRAIN` elements its serial twin runs instead. Half storage is converted in the
loops themselves (no conversion buffers); the storage type is told by the tag's numba type
(bfloat16 as uint16, float16 as int16), so the conversion is chosen at compile time.
GroupNorm runs one task per sample when there are samples for every thread (the sample stays in
L2 between statistics and normalization), else tasks per (n, block): both use the same block
functions in the same order, so the same bits. The block functions are in `_cl_blocks.py`.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from numba import njit, prange

from ._channels import PARALLEL_GRAIN, _sum_over_n, conform, consts, empty_layout
from ._cl_blocks import (
    _add_rows,
    _apply_rows,
    _block_moments,
    _chan_row,
    _coefs,
    _dx_rows,
    _gn_dx_coefs,
    _grad_coefs,
    _grad_sums,
    _merge_sample,
    _part,
)
from ._dtypes import from_address
from ._launch import serial_twin

_CL_BLOCK = 4096  # elements per block (rows × C): a shape-only split, in L1
_SPAN = 16  # BatchNorm: blocks per statistics piece (the pieces of all N·S rows, merged in order)
# tags of the storage types (see `_launch.py`); float16 as int16, to tell it from bfloat16
_TAGS = {torch.float32: np.zeros(1, np.float32), torch.float64: np.zeros(1, np.float64),
         torch.bfloat16: np.zeros(1, np.uint16), torch.float16: np.zeros(1, np.int16)}


# --- kernels: tensors as (address, tag); `nt` runs of tasks, one per thread ----------------------
# A block is rows r0 = bi·rows .. of a sample (GroupNorm) or of all N·S rows (BatchNorm).


@njit(parallel=True, cache=True, error_model="numpy")
def _gn_fwd(xp, yp, xt, wp, bp, meanp, varp, cp, n_, s_, c_, groups, rows, silu, by_sample,
            nt):
    x, y = from_address(xp, n_ * s_ * c_, xt), from_address(yp, n_ * s_ * c_, xt)
    w, b = from_address(wp, c_, cp), from_address(bp, c_, cp)
    mean, var = from_address(meanp, n_ * groups, cp), from_address(varp, n_ * groups, cp)
    nblk = (s_ + rows - 1) // rows
    cg = c_ // groups
    if by_sample:  # a task per sample: its slab stays in L2 for the normalization
        for t in prange(nt):
            lo, hi = _part(t, nt, n_)
            scr = np.empty(5 * c_, cp.dtype)
            a, sh = scr[3 * c_:4 * c_], scr[4 * c_:]
            mg = np.empty(4 * groups)  # the block's moments, and the merged ones
            for n in range(lo, hi):
                cnt = 0
                for bi in range(nblk):  # merged as they come: the same steps as _merge_sample
                    r0 = bi * rows
                    nr = min(s_, r0 + rows) - r0
                    _block_moments(x, (n * s_ + r0) * c_, nr, c_, groups, cp, scr, mg[:groups],
                                   mg[groups:2 * groups])
                    cnt = _chan_row(mg[2 * groups:3 * groups], mg[3 * groups:], cnt,
                                    mg[:groups], mg[groups:2 * groups], nr * cg)
                for g in range(groups):
                    mean[n * groups + g] = mg[2 * groups + g]
                    var[n * groups + g] = mg[3 * groups + g] / cnt
                _coefs(mean, var, groups, cg, n, w, b, cp, a, sh)
                _apply_rows(x, y, n * s_ * c_, s_, c_, a, sh, silu, cp)
        return
    pmean, pm2 = np.empty(n_ * nblk * groups), np.empty(n_ * nblk * groups)
    ntask = n_ * nblk
    for t in prange(nt):
        lo, hi = _part(t, nt, ntask)
        scr = np.empty(3 * c_, cp.dtype)
        for k in range(lo, hi):
            n, r0 = k // nblk, (k % nblk) * rows
            _block_moments(x, (n * s_ + r0) * c_, min(s_, r0 + rows) - r0, c_, groups, cp, scr,
                           pmean[k * groups:(k + 1) * groups], pm2[k * groups:(k + 1) * groups])
    ab, mg = np.empty(2 * n_ * c_, cp.dtype), np.empty(2 * groups)
    for n in range(n_):
        _merge_sample(pmean, pm2, n, s_, c_, groups, rows, mean, var, mg[:groups], mg[groups:])
        _coefs(mean, var, groups, c_ // groups, n, w, b, cp, ab[2 * n * c_:(2 * n + 1) * c_],
               ab[(2 * n + 1) * c_:(2 * n + 2) * c_])
    for t in prange(nt):
        lo, hi = _part(t, nt, ntask)
        for k in range(lo, hi):
            n, r0 = k // nblk, (k % nblk) * rows
            _apply_rows(x, y, (n * s_ + r0) * c_, min(s_, r0 + rows) - r0, c_,
                        ab[2 * n * c_:(2 * n + 1) * c_], ab[(2 * n + 1) * c_:(2 * n + 2) * c_],
                        silu, cp)


@njit(parallel=True, cache=True, error_model="numpy")
def _gn_bwd(dyp, xp, dxp, xt, wp, bp, meanp, varp, dwp, dbp, cp, n_, s_, c_, groups, rows,
            silu, by_sample, nt):
    size = n_ * s_ * c_
    dy, x, dx = from_address(dyp, size, xt), from_address(xp, size, xt), \
        from_address(dxp, size, xt)
    w, b = from_address(wp, c_, cp), from_address(bp, c_, cp)
    mean, var = from_address(meanp, n_ * groups, cp), from_address(varp, n_ * groups, cp)
    cg = c_ // groups
    nblk = (s_ + rows - 1) // rows
    sdy, sdyx = np.empty(n_ * c_, cp.dtype), np.empty(n_ * c_, cp.dtype)  # Σg, Σg·x̂ per (n, c)
    if by_sample:
        for t in prange(nt):
            lo, hi = _part(t, nt, n_)
            scr = np.empty(7 * c_, cp.dtype)
            m, r, rw = scr[:c_], scr[c_:2 * c_], scr[2 * c_:3 * c_]
            k0, k2 = scr[3 * c_:4 * c_], scr[4 * c_:5 * c_]
            s1, s2 = scr[5 * c_:6 * c_], scr[6 * c_:]
            for n in range(lo, hi):
                _grad_coefs(mean, var, groups, cg, n, w, cp, m, r, rw)
                for bi in range(nblk):
                    r0 = bi * rows
                    _grad_sums(dy, x, (n * s_ + r0) * c_, min(s_, r0 + rows) - r0, c_, m, rw, b,
                               silu, cp, s1, s2)
                    _add_rows(sdy[n * c_:(n + 1) * c_], s1, bi == 0)
                    _add_rows(sdyx[n * c_:(n + 1) * c_], s2, bi == 0)
                _gn_dx_coefs(sdy, sdyx, n, c_, groups, s_, w, r, cp, k0, k2)
                _dx_rows(dy, x, dx, n * s_ * c_, s_, c_, m, rw, b, k0, k2, silu, cp)
    else:
        ntask = n_ * nblk
        co = np.empty(5 * n_ * c_, cp.dtype)  # per sample: m, r, rw, k0, k2
        for n in range(n_):
            o = 5 * n * c_
            _grad_coefs(mean, var, groups, cg, n, w, cp, co[o:o + c_], co[o + c_:o + 2 * c_],
                        co[o + 2 * c_:o + 3 * c_])
        ps = np.empty(2 * ntask * c_, cp.dtype)
        for t in prange(nt):
            lo, hi = _part(t, nt, ntask)
            for k in range(lo, hi):
                n, r0 = k // nblk, (k % nblk) * rows
                o = 5 * n * c_
                _grad_sums(dy, x, (n * s_ + r0) * c_, min(s_, r0 + rows) - r0, c_,
                           co[o:o + c_], co[o + 2 * c_:o + 3 * c_], b, silu, cp,
                           ps[2 * k * c_:(2 * k + 1) * c_], ps[(2 * k + 1) * c_:(2 * k + 2) * c_])
        for n in range(n_):
            for bi in range(nblk):
                k = n * nblk + bi
                _add_rows(sdy[n * c_:(n + 1) * c_], ps[2 * k * c_:(2 * k + 1) * c_], bi == 0)
                _add_rows(sdyx[n * c_:(n + 1) * c_], ps[(2 * k + 1) * c_:(2 * k + 2) * c_],
                          bi == 0)
            o = 5 * n * c_
            _gn_dx_coefs(sdy, sdyx, n, c_, groups, s_, w, co[o + c_:o + 2 * c_], cp,
                         co[o + 3 * c_:o + 4 * c_], co[o + 4 * c_:o + 5 * c_])
        for t in prange(nt):
            lo, hi = _part(t, nt, ntask)
            for k in range(lo, hi):
                n, r0 = k // nblk, (k % nblk) * rows
                o = 5 * n * c_
                _dx_rows(dy, x, dx, (n * s_ + r0) * c_, min(s_, r0 + rows) - r0, c_,
                         co[o:o + c_], co[o + 2 * c_:o + 3 * c_], b, co[o + 3 * c_:o + 4 * c_],
                         co[o + 4 * c_:o + 5 * c_], silu, cp)
    _sum_over_n(sdy, n_, c_, from_address(dbp, c_, cp))
    _sum_over_n(sdyx, n_, c_, from_address(dwp, c_, cp))


@njit(parallel=True, cache=True, error_model="numpy")
def _bn_fwd(xp, yp, xt, wp, bp, meanp, varp, cp, m_, c_, rows, training, nt):
    x, y = from_address(xp, m_ * c_, xt), from_address(yp, m_ * c_, xt)
    w, b = from_address(wp, c_, cp), from_address(bp, c_, cp)
    mean, var = from_address(meanp, c_, cp), from_address(varp, c_, cp)
    if training:
        nblk = (m_ + rows - 1) // rows
        nsp = (nblk + _SPAN - 1) // _SPAN
        pmean, pm2 = np.empty(nsp * c_), np.empty(nsp * c_)
        for t in prange(nt):
            lo, hi = _part(t, nt, nsp)
            scr, bm = np.empty(3 * c_, cp.dtype), np.empty(2 * c_)
            for j in range(lo, hi):
                cnt = 0
                for bi in range(j * _SPAN, min(nblk, (j + 1) * _SPAN)):
                    r0 = bi * rows
                    nr = min(m_, r0 + rows) - r0
                    _block_moments(x, r0 * c_, nr, c_, c_, cp, scr, bm[:c_], bm[c_:])
                    cnt = _chan_row(pmean[j * c_:(j + 1) * c_], pm2[j * c_:(j + 1) * c_], cnt,
                                    bm[:c_], bm[c_:], nr)
        mu, m2 = np.zeros(c_), np.zeros(c_)
        cnt = 0
        for j in range(nsp):
            k = min(m_, (j + 1) * _SPAN * rows) - j * _SPAN * rows
            cnt = _chan_row(mu, m2, cnt, pmean[j * c_:(j + 1) * c_], pm2[j * c_:(j + 1) * c_], k)
        for c in range(c_):
            mean[c] = mu[c]
            var[c] = m2[c] / cnt
    ab = np.empty(2 * c_, cp.dtype)
    _coefs(mean, var, 0, 1, 0, w, b, cp, ab[:c_], ab[c_:])
    for t in prange(nt):
        lo, hi = _part(t, nt, m_)
        _apply_rows(x, y, lo * c_, hi - lo, c_, ab[:c_], ab[c_:], False, cp)


@njit(parallel=True, cache=True, error_model="numpy")
def _bn_bwd(dyp, xp, dxp, xt, wp, meanp, varp, dwp, dbp, cp, m_, c_, rows, training, nt):
    dy, x, dx = from_address(dyp, m_ * c_, xt), from_address(xp, m_ * c_, xt), \
        from_address(dxp, m_ * c_, xt)
    w, mean, var = from_address(wp, c_, cp), from_address(meanp, c_, cp), \
        from_address(varp, c_, cp)
    dw, db = from_address(dwp, c_, cp), from_address(dbp, c_, cp)
    co = np.empty(5 * c_, cp.dtype)
    m, r, rw, k0, k2 = co[:c_], co[c_:2 * c_], co[2 * c_:3 * c_], co[3 * c_:4 * c_], co[4 * c_:]
    _grad_coefs(mean, var, 0, 1, 0, w, cp, m, r, rw)
    span = _SPAN * rows
    nsp = (m_ + span - 1) // span
    ps = np.empty(2 * nsp * c_, cp.dtype)
    for t in prange(nt):
        lo, hi = _part(t, nt, nsp)
        for j in range(lo, hi):
            _grad_sums(dy, x, j * span * c_, min(m_, (j + 1) * span) - j * span, c_, m, rw, w,
                       False, cp, ps[2 * j * c_:(2 * j + 1) * c_],
                       ps[(2 * j + 1) * c_:(2 * j + 2) * c_])
    for j in range(nsp):
        _add_rows(db, ps[2 * j * c_:(2 * j + 1) * c_], j == 0)
        _add_rows(dw, ps[(2 * j + 1) * c_:(2 * j + 2) * c_], j == 0)
    count = cp.dtype.type(m_)
    for c in range(c_):
        dw[c] *= r[c]  # Σ g·x̂
        # the means over the channel of w·dy and w·dy·x̂; zero when the statistics are constants
        k0[c] = -r[c] * (w[c] * db[c] / count) if training else cp[2]
        k2[c] = -r[c] * r[c] * (w[c] * dw[c] / count) if training else cp[2]
    for t in prange(nt):
        lo, hi = _part(t, nt, m_)
        _dx_rows(dy, x, dx, lo * c_, hi - lo, c_, m, rw, w, k0, k2, False, cp)


_gn_fwd_serial = serial_twin(_gn_fwd)
_gn_bwd_serial = serial_twin(_gn_bwd)
_bn_fwd_serial = serial_twin(_bn_fwd)
_bn_bwd_serial = serial_twin(_bn_bwd)


# --- launchers ------------------------------------------------------------------------------------


def cl_rows(c: int) -> int:
    """Rows (spatial positions) per block: from C alone."""
    return max(1, _CL_BLOCK // max(c, 1))


def _threads(x: torch.Tensor) -> int:
    return 1 if x.numel() < PARALLEL_GRAIN else numba.get_num_threads()


def group_norm_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int,
                   eps: float, silu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = conform(x, True)
    n_, c_, s_ = x.shape
    ct = weight.dtype
    y = empty_layout(x, True)
    mean, var = torch.empty((n_, groups), dtype=ct), torch.empty((n_, groups), dtype=ct)
    if x.numel() == 0:
        return y, mean.fill_(float("nan")), var.fill_(float("nan"))
    nt = _threads(x)
    kernel = _gn_fwd if nt > 1 else _gn_fwd_serial
    kernel(x.data_ptr(), y.data_ptr(), _TAGS[x.dtype], weight.data_ptr(), bias.data_ptr(),
           mean.data_ptr(), var.data_ptr(), consts(ct, eps), n_, s_, c_, groups, cl_rows(c_),
           silu, n_ >= 2 * nt, nt)
    return y, mean, var


def group_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   mean: torch.Tensor, var: torch.Tensor, groups: int, eps: float, silu: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = conform(x, True)
    dy = conform(dy if dy.dtype == x.dtype else dy.to(x.dtype), True)
    n_, c_, s_ = x.shape
    ct = weight.dtype
    dx = empty_layout(x, True)
    if x.numel() == 0:
        return dx, torch.zeros(c_, dtype=ct), torch.zeros(c_, dtype=ct)
    dw, db = torch.empty(c_, dtype=ct), torch.empty(c_, dtype=ct)
    mean, var = mean.contiguous(), var.contiguous()
    nt = _threads(x)
    kernel = _gn_bwd if nt > 1 else _gn_bwd_serial
    kernel(dy.data_ptr(), x.data_ptr(), dx.data_ptr(), _TAGS[x.dtype], weight.data_ptr(),
           bias.data_ptr(), mean.data_ptr(), var.data_ptr(), dw.data_ptr(), db.data_ptr(),
           consts(ct, eps), n_, s_, c_, groups, cl_rows(c_), silu, n_ >= 2 * nt, nt)
    return dx, dw, db


def batch_norm_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   mean: torch.Tensor | None, var: torch.Tensor | None, eps: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = conform(x, True)
    n_, c_, s_ = x.shape
    ct = weight.dtype
    y = empty_layout(x, True)
    training = mean is None
    if training:
        mean, var = torch.empty(c_, dtype=ct), torch.empty(c_, dtype=ct)
    if x.numel() == 0:
        if training:
            mean.fill_(float("nan"))
            var.fill_(float("nan"))
        return y, mean, var
    # (held in names: a temporary's memory would be freed before the kernel reads it)
    mean_c, var_c = mean.contiguous(), var.contiguous()
    nt = _threads(x)
    kernel = _bn_fwd if nt > 1 else _bn_fwd_serial
    kernel(x.data_ptr(), y.data_ptr(), _TAGS[x.dtype], weight.data_ptr(), bias.data_ptr(),
           mean_c.data_ptr(), var_c.data_ptr(), consts(ct, eps),
           n_ * s_, c_, cl_rows(c_), training, nt)
    return y, mean, var


def batch_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   mean: torch.Tensor, var: torch.Tensor, eps: float, training: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = conform(x, True)
    dy = conform(dy if dy.dtype == x.dtype else dy.to(x.dtype), True)
    n_, c_, s_ = x.shape
    ct = weight.dtype
    dx = empty_layout(x, True)
    if x.numel() == 0:
        return dx, torch.zeros(c_, dtype=ct), torch.zeros(c_, dtype=ct)
    dw, db = torch.empty(c_, dtype=ct), torch.empty(c_, dtype=ct)
    mean, var = mean.contiguous(), var.contiguous()
    nt = _threads(x)
    kernel = _bn_bwd if nt > 1 else _bn_bwd_serial
    kernel(dy.data_ptr(), x.data_ptr(), dx.data_ptr(), _TAGS[x.dtype], weight.data_ptr(),
           mean.data_ptr(), var.data_ptr(), dw.data_ptr(), db.data_ptr(), consts(ct, eps),
           n_ * s_, c_, cl_rows(c_), training, nt)
    return dx, dw, db
