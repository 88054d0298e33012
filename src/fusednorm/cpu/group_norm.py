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

How the channels-first work is laid out, and why: one task per (n, g), whose group is one
contiguous run of C/G·S elements, read in blocks of `_BLOCK` elements that may span channels.
Sweep 1 takes each block's moments by a corrected two-pass while it is in L1 and merges the
blocks in order with Chan's formula; sweep 2 normalizes each block channel segment by channel
segment, storing straight into y's type. A group of up to `_KEEP` elements is converted to the
compute type once, in sweep 1, into scratch that stays in L2 for sweep 2; larger groups are
converted again. The backward is the same two sweeps (per-channel Σg, Σg·x̂, kept for
dweight/dbias; then dx), keeping converted x and g = dy (dy·silu'(z)) between them. That blocked
path serves float16 and SiLU's backward; float32 and bfloat16 groups are read where they lie
(`_fwd_direct`, `_bwd_direct`): a bfloat16 value converts by a shift, cheaper to redo in each
sweep than to copy, and the per-channel loops stay inside one function. Every sum
is in an order fixed by the shape: the results are bitwise deterministic, whatever the threads.

Calls are cheap: tensors reach the kernels as addresses (`_launch.py`), scratch is unowned
views of one array allocated per call, and small calls run the kernels' serial twins.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from numba import njit, prange
from numba.extending import overload

from . import channels_last as nhwc
from ._channels import (
    _BLOCK,
    _REDUCE,
    PARALLEL_GRAIN,
    _block_moments,
    _chan,
    _dest,
    _exp,
    _grad_sums,
    _read,
    _silu_grad,
    _sum_over_n,
    conform,
    consts,
    empty_layout,
)
from ._dtypes import (
    BF16,
    F16,
    as_float,
    bf16_to_f32,
    f32_to_bf16,
    f32_to_f16,
    from_address,
    is_bits,
    load_row,
)
from ._launch import TAGS, serial_twin

# A group (BatchNorm: a channel) up to this many elements keeps its converted x (and g) in
# scratch between the two sweeps: 256 KiB per array in float32, so both stay in L2.
_KEEP = 1 << 16


# --- helpers shared with batch_norm.py ------------------------------------------------------------


@njit(inline="always", cache=True, error_model="numpy")
def _scratch(a, off, n):
    """a[off:off + n] as a view that holds no reference (a slice of an owned array costs two
    atomic operations, more than a short segment's arithmetic). `a` must be an argument of the
    kernel, so it outlives the view."""
    return from_address(a.ctypes.data + off * a.itemsize, n, a)


@njit(inline="always", cache=True, error_model="numpy")
def _span(i, parts, total):
    """Tasks [lo, hi) of the i-th of `parts` equal runs (one run per thread: scratch is per
    run; results do not depend on the split)."""
    per = (total + parts - 1) // parts
    return i * per, min(total, (i + 1) * per)


@njit(cache=True, error_model="numpy")
def _silu(z, one):
    return z / (one + _exp(-z))


def _store_affine(src, a, sh, silu, y, yo, ykind, one):
    """y[yo:yo + n] = silu?(src·a + sh) in y's storage type, n = src.size."""
    raise NotImplementedError  # only callable from numba code


@overload(_store_affine, inline="always", jit_options={"error_model": "numpy"})
def _store_affine_impl(src, a, sh, silu, y, yo, ykind, one):
    # One pass from the float segment to y's storage; the conversion branch is outside the loops.
    # No FMA contraction: sh = b − mean·a holds a rounded product, which x·a must cancel alike.
    if is_bits(y):

        def impl(src, a, sh, silu, y, yo, ykind, one):
            d = y[yo:yo + src.size]
            if silu and ykind == BF16:
                for j in range(d.size):
                    z = as_float(src, j) * a + sh
                    d[j] = f32_to_bf16(_silu(z, one))
            elif silu:
                for j in range(d.size):
                    z = as_float(src, j) * a + sh
                    d[j] = f32_to_f16(_silu(z, one))
            elif ykind == BF16:
                for j in range(d.size):
                    d[j] = f32_to_bf16(as_float(src, j) * a + sh)
            else:
                for j in range(d.size):
                    d[j] = f32_to_f16(as_float(src, j) * a + sh)

        return impl

    def native(src, a, sh, silu, y, yo, ykind, one):
        d = y[yo:yo + src.size]
        if silu:
            for j in range(d.size):
                z = as_float(src, j) * a + sh
                d[j] = _silu(z, one)
        else:
            for j in range(d.size):
                d[j] = as_float(src, j) * a + sh

    return native


def _store_dnorm(g, xs, mu, r, wc, mg, mgx, dx, o, dxkind):
    """dx[o:o + n] = rstd·(w·g − mg − x̂·mgx) in dx's storage type, n = g.size, as
    A·g + B·(x − mean) + C with the scalars folded (three operations an element, not seven)."""
    raise NotImplementedError


@overload(_store_dnorm, inline="always", jit_options={"error_model": "numpy"})
def _store_dnorm_impl(g, xs, mu, r, wc, mg, mgx, dx, o, dxkind):
    if is_bits(dx):

        def impl(g, xs, mu, r, wc, mg, mgx, dx, o, dxkind):
            d = dx[o:o + g.size]
            fa, fb, fc = r * wc, -(r * r * mgx), -(r * mg)
            if dxkind == BF16:
                for j in range(d.size):
                    d[j] = f32_to_bf16(fa * as_float(g, j) + fb * (as_float(xs, j) - mu) + fc)
            else:
                for j in range(d.size):
                    d[j] = f32_to_f16(fa * as_float(g, j) + fb * (as_float(xs, j) - mu) + fc)

        return impl

    def native(g, xs, mu, r, wc, mg, mgx, dx, o, dxkind):
        d = dx[o:o + g.size]
        fa, fb, fc = r * wc, -(r * r * mgx), -(r * mg)
        for j in range(d.size):
            d[j] = fa * as_float(g, j) + fb * (as_float(xs, j) - mu) + fc

    return native


def _load_moments(x, xkind, o, n, buf, cp):
    """(mean, M2) in float64 of x[o:o + n] as `_block_moments`, leaving it converted in buf when
    x is not stored in the compute type (only float16 reaches the blocked path at run time)."""
    raise NotImplementedError


@overload(_load_moments, jit_options={"fastmath": _REDUCE, "error_model": "numpy"})
def _load_moments_impl(x, xkind, o, n, buf, cp):
    if is_bits(x):

        def impl(x, xkind, o, n, buf, cp):
            a = buf[:n]
            load_row(x, o, n, xkind, a)
            return _block_moments(a, cp)

        return impl

    def native(x, xkind, o, n, buf, cp):
        return _block_moments(x[o:o + n], cp)

    return native


@njit(fastmath=_REDUCE, cache=True, error_model="numpy")
def _deviations(a, s, cp):
    """`_block_moments` of a (float, or bfloat16 read in place) given s = Σa."""
    mu = s / cp.dtype.type(a.size)
    sd, ss = cp[2], cp[2]
    for j in range(a.size):
        d = as_float(a, j) - mu
        sd += d
        ss += d * d
    sd64, n64 = np.float64(sd), np.float64(a.size)
    return np.float64(mu) + sd64 / n64, np.float64(ss) - sd64 * sd64 / n64


@njit(fastmath=_REDUCE, cache=True, error_model="numpy")
def _run_moments(a, cp):
    """(mean, M2) in float64 of the run a (float or bfloat16): the moments of each block of
    `_BLOCK` (Σ, then `_deviations`: read twice while in L1, never copied), merged in order with
    Chan's formula."""
    mu, m2, cnt = 0.0, 0.0, 0
    for o in range(0, a.size, _BLOCK):
        blk = a[o:o + _BLOCK]
        k = blk.size
        s = cp[2]
        for j in range(k):
            s += as_float(blk, j)
        bm, bm2 = _deviations(blk, s, cp)
        mu, m2, cnt = _chan(mu, m2, cnt, bm, bm2, k) if o else (bm, bm2, k)
    return mu, m2


def _load_grad_sums(dy, dykind, x, xkind, o, n, gq, xq, mu, r, cp):
    """(dy, x)[o:o + n] in the compute type (views, or converted into gq, xq) and their
    (Σg, Σg·x̂) as `_grad_sums`; bfloat16 blocks are converted and summed in one pass."""
    raise NotImplementedError


@overload(_load_grad_sums, jit_options={"fastmath": _REDUCE, "error_model": "numpy"})
def _load_grad_sums_impl(dy, dykind, x, xkind, o, n, gq, xq, mu, r, cp):
    if is_bits(x) and is_bits(dy):

        def impl(dy, dykind, x, xkind, o, n, gq, xq, mu, r, cp):
            ds, xs = gq[:n], xq[:n]
            if xkind != BF16 or dykind != BF16:
                load_row(x, o, n, xkind, xs)
                load_row(dy, o, n, dykind, ds)
                s1, s2 = _grad_sums(ds, xs, mu, r, cp)
                return ds, xs, s1, s2
            xb, db = x[o:o + n], dy[o:o + n]
            s1, s2 = cp[2], cp[2]
            for j in range(n):
                xv, g = bf16_to_f32(xb[j]), bf16_to_f32(db[j])
                xs[j] = xv
                ds[j] = g
                s1 += g
                s2 += g * ((xv - mu) * r)
            return ds, xs, s1, s2

        return impl

    def mixed(dy, dykind, x, xkind, o, n, gq, xq, mu, r, cp):
        xs, ds = _read(x, xkind, o, n, xq), _read(dy, dykind, o, n, gq)
        s1, s2 = _grad_sums(ds, xs, mu, r, cp)
        return ds, xs, s1, s2

    return mixed


def arg(t: torch.Tensor) -> tuple[int, np.ndarray, int]:
    """(address, tag, kind) of a contiguous tensor (see `_launch.tensor_arg`)."""
    tag, kind = TAGS[t.dtype]
    return t.data_ptr(), tag, kind


def runs(work: int, tasks: int) -> int:
    """Runs of tasks for a call over `work` elements: 1 (the serial twin) below the grain."""
    return 1 if work < PARALLEL_GRAIN else max(1, min(tasks, numba.get_num_threads()))


# --- channels first: one task per (n, g) ----------------------------------------------------------


@njit(cache=True, error_model="numpy")
def _fwd_group(x, xkind, w, b, y, ykind, mean, var, t, c_, s_, groups, cp, silu, buf):
    """Group t = (n, g): its moments (sweep 1), then y (sweep 2)."""
    cg = c_ // groups
    size = cg * s_
    keep = size <= _KEEP
    base, c0 = t * size, (t % groups) * cg
    mu, m2, cnt = 0.0, 0.0, 0
    for o in range(0, size, _BLOCK):
        k = min(_BLOCK, size - o)
        q = o if keep else 0
        bm, bm2 = _load_moments(x, xkind, base + o, k, buf[q:q + k], cp)
        mu, m2, cnt = _chan(mu, m2, cnt, bm, bm2, k) if o else (bm, bm2, k)
    mean[t] = mu
    var[t] = m2 / size
    m, r = mean[t], cp[1] / np.sqrt(var[t] + cp[0])  # rounded as the backward will read them
    for o in range(0, size, _BLOCK):
        k = min(_BLOCK, size - o)
        if keep:
            xs = _dest(x, base + o, k, buf[o:o + k])  # x itself, or its kept conversion
        else:
            xs = _read(x, xkind, base + o, k, buf[:k])
        j = o
        while j < o + k:  # the block's channel segments
            ci = j // s_
            e = min(o + k, (ci + 1) * s_)
            a = r * w[c0 + ci]
            _store_affine(xs[j - o:e - o], a, b[c0 + ci] - m * a, silu, y, base + j, ykind,
                          cp[1])
            j = e


@njit(cache=True, error_model="numpy")
def _fwd_direct(xs, w, b, y, ykind, mean, var, t, c0, cg, s_, cp, silu):
    """Group t read where it lies (xs: its float or bfloat16 run): moments, then y channel by
    channel, all loops in this function or inlined (per-call costs dominate short channels)."""
    size = cg * s_
    mu, m2 = _run_moments(xs, cp)
    mean[t] = mu
    var[t] = m2 / size
    m, r = mean[t], cp[1] / np.sqrt(var[t] + cp[0])  # rounded as the backward will read them
    for ci in range(cg):
        a = r * w[c0 + ci]
        _store_affine(xs[ci * s_:(ci + 1) * s_], a, b[c0 + ci] - m * a, silu, y,
                      t * size + ci * s_, ykind, cp[1])


@njit(parallel=True, cache=True, error_model="numpy")
def _fwd_cf(xp, xt, xkind, wp, bp, yp, yt, ykind, meanp, varp, scr, n_, c_, s_, groups, cp,
            silu, nruns):
    total = n_ * c_ * s_
    x, y = from_address(xp, total, xt), from_address(yp, total, yt)
    w, b = from_address(wp, c_, cp), from_address(bp, c_, cp)
    mean, var = from_address(meanp, n_ * groups, cp), from_address(varp, n_ * groups, cp)
    per = scr.size // nruns
    for i in prange(nruns):
        buf = _scratch(scr, i * per, per)
        lo, hi = _span(i, nruns, n_ * groups)
        cg = c_ // groups
        for t in range(lo, hi):
            if xkind == F16:
                _fwd_group(x, xkind, w, b, y, ykind, mean, var, t, c_, s_, groups, cp, silu,
                           buf)
            else:
                _fwd_direct(x[t * cg * s_:(t + 1) * cg * s_], w, b, y, ykind, mean, var, t,
                            (t % groups) * cg, cg, s_, cp, silu)


_fwd_cf_serial = serial_twin(_fwd_cf)


@njit(cache=True, error_model="numpy")
def _group_grad_means(w, c0, sdy, sdyx, size, cp):
    """The group's means of w·dy and w·dy·x̂ from its channels' Σg, Σg·x̂ (sdy, sdyx: the
    group's cg entries; weights from channel c0), in channel order."""
    gs, gsx = cp[2], cp[2]
    for ci in range(sdy.size):
        gs += w[c0 + ci] * sdy[ci]
        gsx += w[c0 + ci] * sdyx[ci]
    return gs / cp.dtype.type(size), gsx / cp.dtype.type(size)


@njit(cache=True, error_model="numpy")
def _bwd_group(dy, dykind, x, xkind, w, b, mean, var, dx, dxkind, sdy, sdyx, t, c_, s_, groups,
               cp, silu, xb, gb, db):
    """Backward of group t = (n, g): sweep 0 sums Σg, Σg·x̂ per channel, sweep 1 writes dx,
    block by block and, within a block, channel segment by segment. xb and gb keep converted x
    and g between the sweeps (g = dy·silu'(z), else dy); db takes a block of converted dy when
    silu (never aliasing gb, so the silu loop vectorizes)."""
    cg = c_ // groups
    size = cg * s_
    keep = size <= _KEEP
    base, c0 = t * size, (t % groups) * cg
    p0 = (t // groups) * c_ + c0  # the group's first (n, c) in sdy, sdyx
    mu, r = mean[t], cp[1] / np.sqrt(var[t] + cp[0])
    zero = cp[2]
    for ci in range(cg):
        sdy[p0 + ci] = zero
        sdyx[p0 + ci] = zero
    mg, mgx = zero, zero
    for sweep in range(2):
        if sweep == 1:
            mg, mgx = _group_grad_means(w, c0, sdy[p0:p0 + cg], sdyx[p0:p0 + cg], size, cp)
        fresh = sweep == 0 or not keep  # x and g are (re)computed, not kept
        for o in range(0, size, _BLOCK):
            e1 = min(o + _BLOCK, size)
            j = o
            while j < e1:  # the block's channel segments [j, e)
                ci = j // s_
                e = min(e1, (ci + 1) * s_)
                c, k, q = c0 + ci, e - j, j if keep else j - o
                xq, gq = xb[q:q + k], gb[q:q + k]
                if fresh and silu:
                    xs = _read(x, xkind, base + j, k, xq)
                    g = _read(dy, dykind, base + j, k, db[j - o:e - o])
                    g = _silu_grad(g, xs, mu, r, w[c], b[c], gq, cp)
                    if sweep == 0:
                        a1, a2 = _grad_sums(g, xs, mu, r, cp)
                elif sweep == 0:
                    g, xs, a1, a2 = _load_grad_sums(dy, dykind, x, xkind, base + j, k, gq, xq,
                                                    mu, r, cp)
                elif fresh:
                    xs, g = _read(x, xkind, base + j, k, xq), _read(dy, dykind, base + j, k, gq)
                else:
                    xs = _dest(x, base + j, k, xq)
                    g = gq if silu else _dest(dy, base + j, k, gq)
                if sweep == 0:
                    sdy[p0 + ci] += a1
                    sdyx[p0 + ci] += a2
                else:
                    _store_dnorm(g, xs, mu, r, w[c], mg, mgx, dx, base + j, dxkind)
                j = e


@njit(cache=True, error_model="numpy")
def _bwd_direct(g, xs, w, mean, var, dx, dxkind, sdy, sdyx, t, c0, cg, s_, cp):
    """Backward of group t without SiLU, dy and x read where they lie (g, xs: the group's float
    or bfloat16 runs, cheaper to read twice than to copy): Σg, Σg·x̂ per channel, then dx."""
    mu, r = mean[t], cp[1] / np.sqrt(var[t] + cp[0])
    for ci in range(cg):
        sdy[ci], sdyx[ci] = _grad_sums(g[ci * s_:(ci + 1) * s_], xs[ci * s_:(ci + 1) * s_], mu,
                                       r, cp)
    mg, mgx = _group_grad_means(w, c0, sdy, sdyx, cg * s_, cp)
    for ci in range(cg):
        lo, hi = ci * s_, (ci + 1) * s_
        _store_dnorm(g[lo:hi], xs[lo:hi], mu, r, w[c0 + ci], mg, mgx, dx, t * cg * s_ + lo,
                     dxkind)


@njit(parallel=True, cache=True, error_model="numpy")
def _bwd_cf(dyp, dyt, dykind, xp, xt, xkind, wp, bp, meanp, varp, dxp, dxt, dxkind, dwp, dbp,
            scr, n_, c_, s_, groups, cp, silu, nruns):
    total = n_ * c_ * s_
    dy, x = from_address(dyp, total, dyt), from_address(xp, total, xt)
    dx = from_address(dxp, total, dxt)
    w, b = from_address(wp, c_, cp), from_address(bp, c_, cp)
    dw, db = from_address(dwp, c_, cp), from_address(dbp, c_, cp)
    mean, var = from_address(meanp, n_ * groups, cp), from_address(varp, n_ * groups, cp)
    nc = n_ * c_
    sdy, sdyx = _scratch(scr, 0, nc), _scratch(scr, nc, nc)  # Σg, Σg·x̂ per (n, c)
    per = (scr.size - 2 * nc) // nruns
    keep = per - _BLOCK  # xb and gb, then db
    for i in prange(nruns):
        at = 2 * nc + i * per
        xb, gb = _scratch(scr, at, keep // 2), _scratch(scr, at + keep // 2, keep // 2)
        dbk = _scratch(scr, at + keep, _BLOCK)
        lo, hi = _span(i, nruns, n_ * groups)
        cg = c_ // groups
        for t in range(lo, hi):
            if silu or xkind == F16 or dykind == F16:
                _bwd_group(dy, dykind, x, xkind, w, b, mean, var, dx, dxkind, sdy, sdyx, t, c_,
                           s_, groups, cp, silu, xb, gb, dbk)
            else:
                p0, o = (t // groups) * c_ + (t % groups) * cg, t * cg * s_
                _bwd_direct(dy[o:o + cg * s_], x[o:o + cg * s_], w, mean, var, dx, dxkind,
                            sdy[p0:p0 + cg], sdyx[p0:p0 + cg], t, (t % groups) * cg, cg, s_, cp)
    _sum_over_n(sdy, n_, c_, db)
    _sum_over_n(sdyx, n_, c_, dw)


_bwd_cf_serial = serial_twin(_bwd_cf)


def _kept(size: int) -> int:
    """Scratch elements per run and array: the whole group when it is kept, else a block."""
    return size if size <= _KEEP else min(size, _BLOCK)


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
    mean = torch.empty((n_, groups), dtype=weight.dtype)
    var = torch.empty((n_, groups), dtype=weight.dtype)
    if x.numel() == 0:
        return y, mean.fill_(float("nan")), var.fill_(float("nan"))
    nr = runs(x.numel(), n_ * groups)
    blocked = x.dtype == torch.float16  # only the blocked path (`_fwd_group`) uses scratch
    scr = np.empty(nr * _kept(c_ // groups * s_) if blocked else 0, cp.dtype)
    kernel = _fwd_cf if nr > 1 else _fwd_cf_serial
    kernel(*arg(x), weight.data_ptr(), bias.data_ptr(), *arg(y), mean.data_ptr(), var.data_ptr(),
           scr, n_, c_, s_, groups, cp, silu, nr)
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
    dw, db = torch.empty(c_, dtype=weight.dtype), torch.empty(c_, dtype=weight.dtype)
    if x.numel() == 0:
        return dx, dw.zero_(), db.zero_()
    nr = runs(x.numel(), n_ * groups)
    scr = np.empty(2 * n_ * c_ + nr * (2 * _kept(c_ // groups * s_) + _BLOCK), cp.dtype)
    kernel = _bwd_cf if nr > 1 else _bwd_cf_serial
    mean, var = mean.contiguous(), var.contiguous()
    kernel(*arg(dy), *arg(x), weight.data_ptr(), bias.data_ptr(), mean.data_ptr(),
           var.data_ptr(), *arg(dx), dw.data_ptr(), db.data_ptr(), scr, n_, c_, s_, groups, cp,
           silu, nr)
    return dx, dw, db
