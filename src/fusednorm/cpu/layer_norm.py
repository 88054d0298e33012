"""Row norms on the CPU: launch plans for the numba kernels of `kernels/layer_norm.py`.

A plan is everything fixed for inputs of one shape, row stride, dtypes and flags: the compiled
kernel, the fixed half of its argument block, the outputs' shapes. `row_norm.py` keeps one per
call signature, so that a call costs an allocation or two, a `struct.pack` and the kernel.
`norm_fwd` and `norm_bwd` implement the backend contract of docs/DESIGN.md (used by the
torch.library ops) on top of the same plans.
"""

from __future__ import annotations

import torch

from fusednorm.cpu._launch import (
    STORAGE,
    Kernel,
    Layout,
    compute_dtype,
    scratch,
    thread_cap,
)
from fusednorm.cpu._launch import threads as threads_for

_num_threads = torch.get_num_threads

# Argument blocks (see `_launch.Layout`); absent tensors have address 0.
FWD_ARGS = Layout(
    per_call=("x", "residual", "weight", "bias", "y", "h", "mean", "rstd", "scratch", "seed_lo",
              "seed_hi"),
    fixed=("m", "n", "sx", "sr", "is_rms", "zero_centered", "stats", "has_weight", "has_bias"),
    floats=("eps", "p", "scale"),
)
BWD_ARGS = Layout(
    per_call=("dy", "saved", "weight", "bias", "mean", "rstd", "dh_out", "dx", "dresidual",
              "parts", "dweight", "dbias", "scratch", "seed_lo", "seed_hi"),
    fixed=("m", "n", "sdy", "ssaved", "sdh", "is_rms", "zero_centered", "acc", "nblocks",
           "has_weight", "has_bias"),
    floats=("p", "scale"),
)
MASK_ARGS = Layout(per_call=("out", "seed_lo", "seed_hi"), fixed=("m", "n"), floats=("p",))
SCRATCH_ROWS = 6  # rows of N compute-type elements of scratch per thread
_MAX_BLOCKS = 64  # row blocks of the backward: the weight-gradient partial rows
_PARTIAL_ELEMENTS = 1 << 18  # ... and the elements of those partial rows, beyond 8 blocks
# ... and at least this many rows to a block where M allows two blocks: each block zeroes, fills
# and adds up its partial rows, which for blocks of one row (64×4096) doubled what a backward
# moved and made it 1.35x torch's on one thread
_BLOCK_ROWS = 16


def _kernels():
    from fusednorm.cpu.kernels import layer_norm

    return layer_norm


_FWD = Kernel("row_norm_fwd", FWD_ARGS, lambda *key: _kernels().build_fwd(*key))
_BWD = Kernel("row_norm_bwd", BWD_ARGS, lambda *key: _kernels().build_bwd(*key))
_MASK = Kernel("keep_mask", MASK_ARGS, lambda: _kernels().build_keep_mask())


def _storage(t: torch.dtype | None) -> str:
    return "" if t is None else STORAGE[t]


def _seed_words(seed: int) -> tuple[int, int]:
    seed &= (1 << 64) - 1
    return seed & 0xFFFFFFFF, seed >> 32


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


class ForwardPlan:
    """The forward of m rows of n: x with row stride sx (inner stride 1), residual with row
    stride sr; y (and h) new, of shape `out_shape`; the statistics when `stats`.

    `x_contiguous`: x is contiguous, so y can be allocated like it (the cheapest way)."""

    def __init__(self, m: int, n: int, sx: int, sr: int, x_dtype: torch.dtype,
                 r_dtype: torch.dtype | None, w_dtype: torch.dtype | None,
                 b_dtype: torch.dtype | None, out_dtype: torch.dtype,
                 h_dtype: torch.dtype | None, eps: float, is_rms: bool, zero_centered: bool,
                 dropout_p: float, xhat_dtype: torch.dtype | None, stats: bool,
                 out_shape: tuple[int, ...], x_contiguous: bool = False) -> None:
        ct = compute_dtype(x_dtype)
        self.m, self.n, self.sx, self.ct, self.is_rms = m, n, sx, ct, is_rms
        self.out_dtype, self.h_dtype, self.out_shape = out_dtype, h_dtype, out_shape
        if xhat_dtype == ct:
            xhat_dtype = None  # rounding to the compute type is no rounding
        # (the weight and the bias, when both present, have one dtype: the checks see to it;
        # absent, they are taken as of the compute dtype)
        self.launch = _FWD[tuple(_storage(t) for t in (ct, x_dtype, r_dtype, w_dtype or b_dtype or ct,
                                                      out_dtype, h_dtype, xhat_dtype))]
        self.tail = FWD_ARGS.fixed(
            m=m, n=n, sx=sx, sr=sr, is_rms=is_rms, zero_centered=zero_centered, stats=stats,
            has_weight=w_dtype is not None, has_bias=b_dtype is not None, eps=eps, p=dropout_p,
            scale=1.0 / (1.0 - dropout_p))
        self.cap = thread_cap(m * n, m)
        # mean then rstd in one tensor (rstd alone for RMSNorm): one allocation, one save; made
        # `empty_like` a template (a dtype keyword makes torch.empty twice as slow)
        self.stats_len = (m if is_rms else 2 * m) if stats else 0
        self.stats_like = torch.empty(self.stats_len, dtype=ct)
        self.rstd_offset = 0 if is_rms else m * (8 if ct == torch.float64 else 4)
        self.like_x = x_contiguous and out_dtype == x_dtype
        self.h_like_x = x_contiguous and h_dtype == x_dtype
        # scratch: parameter rows that need converting, rows of x or h that need converting
        self.scratch_bytes = 0 if (x_dtype == ct and h_dtype is None and zero_centered is False
                                   and w_dtype in (ct, None) and b_dtype in (ct, None)
                                   and w_dtype is not None and b_dtype is not None) \
            else SCRATCH_ROWS * n * (8 if ct == torch.float64 else 4)

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None,
                 weight: torch.Tensor | None, bias: torch.Tensor | None, seed: int = 0):
        """(y, h, stats): h None without a residual or dropout, stats (mean then rstd; rstd
        alone for RMSNorm) None unless the plan keeps them."""
        y = (torch.empty_like(x) if self.like_x
             else torch.empty(self.out_shape, dtype=self.out_dtype))
        h = stats = None
        if self.h_dtype is not None:
            h = (torch.empty_like(x) if self.h_like_x
                 else torch.empty(self.out_shape, dtype=self.h_dtype))
        stats_ptr = 0
        if self.stats_len:
            stats = torch.empty_like(self.stats_like)
            stats_ptr = stats.data_ptr()
        # (`_launch.threads` and `Launch.__call__` inlined here and below: in a model each frame
        # costs several µs)
        threads = 1 if self.cap == 1 else min(self.cap, _num_threads())
        # (held in a local until the call returns: a scratch tensor may be this call's own)
        scr = scratch(threads * self.scratch_bytes) if self.scratch_bytes else None
        seed_lo, seed_hi = _seed_words(seed) if seed else (0, 0)
        block = FWD_ARGS.pack_call(
            x.data_ptr(), 0 if residual is None else residual.data_ptr(),
            0 if weight is None else weight.data_ptr(), 0 if bias is None else bias.data_ptr(),
            y.data_ptr(), 0 if h is None else h.data_ptr(), stats_ptr,
            stats_ptr + self.rstd_offset, 0 if scr is None else scr.data_ptr(), seed_lo,
            seed_hi) + self.tail
        if threads == 1:
            self.launch.serial(block)
        else:
            self.launch.on_threads(block, threads, 0)
        return y, h, stats


class BackwardPlan:
    """The backward of a `ForwardPlan`: dy with row stride sdy, the saved input (x, h, or y
    when `from_output`) with row stride ssaved, dh_out (the gradient flowing into h) with row
    stride sdh; dx (and dresidual) new, of shape `out_shape`."""

    def __init__(self, m: int, n: int, sdy: int, ssaved: int, sdh: int, ct: torch.dtype,
                 dy_dtype: torch.dtype, saved_dtype: torch.dtype, w_dtype: torch.dtype | None,
                 b_dtype: torch.dtype | None, dh_dtype: torch.dtype | None,
                 x_dtype: torch.dtype, dres_dtype: torch.dtype | None, is_rms: bool,
                 zero_centered: bool, dropout_p: float, need_dw: bool, need_db: bool,
                 from_output: bool, out_shape: tuple[int, ...]) -> None:
        self.m, self.n, self.ct, self.out_shape = m, n, ct, out_shape
        self.x_dtype, self.dres_dtype, self.need_dw, self.need_db = (
            x_dtype, dres_dtype, need_dw, need_db)
        self.launch = _BWD[tuple(_storage(t) for t in (
            ct, dy_dtype, saved_dtype, w_dtype or b_dtype or ct, dh_dtype, x_dtype, dres_dtype))
                           + ("1" if dropout_p > 0 else "", "1" if from_output else "")]
        # acc: 0 no weight gradients, 1 dweight, 2 dweight and dbias (a bias without a weight
        # gets a scratch dweight: rare enough not to deserve its own loop)
        self.acc = 2 if need_db else int(need_dw)
        # The blocks depend on M and N only (the weight gradients' summation order); long rows
        # get fewer blocks, so that the partial rows stay in cache and their sum stays short.
        self.nblocks = nb = min(m, max(2, m // _BLOCK_ROWS), _MAX_BLOCKS,
                                max(8, _PARTIAL_ELEMENTS // max(n, 1)))
        self.tail = BWD_ARGS.fixed(
            m=m, n=n, sdy=sdy, ssaved=ssaved, sdh=sdh, is_rms=is_rms,
            zero_centered=zero_centered, acc=self.acc, nblocks=nb, has_weight=w_dtype is not None, has_bias=b_dtype is not None, p=dropout_p,
            scale=1.0 / (1.0 - dropout_p))
        self.cap = thread_cap(m * n, nb)
        size = 8 if ct == torch.float64 else 4
        self.rstd_offset = 0 if is_rms else m * size
        self.scratch_bytes = SCRATCH_ROWS * n * size
        # dweight's partial rows, then dbias's, in scratch after the threads' rows
        self.parts_bytes = self.acc * nb * n * size
        self.dx_like_saved = saved_dtype == x_dtype  # then dx is allocated like the saved input
        # (templates: see ForwardPlan.stats_like) dweight and dbias in the parameters' dtype
        self.grad_like = torch.empty(n, dtype=w_dtype or b_dtype or ct)

    def __call__(self, dy: torch.Tensor, saved: torch.Tensor, weight: torch.Tensor | None,
                 bias: torch.Tensor | None, stats: torch.Tensor, dh_out: torch.Tensor | None,
                 seed: int = 0):
        """(dx, dresidual, dweight, dbias), the parameters' in their dtype; None for what is
        not computed. `stats` as `ForwardPlan` returns them."""
        dx = (torch.empty_like(saved) if self.dx_like_saved and saved.is_contiguous()
              else torch.empty(self.out_shape, dtype=self.x_dtype))
        dres = (None if self.dres_dtype is None
                else torch.empty(self.out_shape, dtype=self.dres_dtype))
        dw = db = None
        if self.acc:
            dw = torch.empty_like(self.grad_like)
            db = torch.empty_like(self.grad_like) if self.acc == 2 else None
        threads = 1 if self.cap == 1 else min(self.cap, _num_threads())
        rows = threads * self.scratch_bytes
        scr = scratch(rows + self.parts_bytes)  # (held until the kernel returns)
        seed_lo, seed_hi = _seed_words(seed) if seed else (0, 0)
        stats_ptr, scr_ptr = stats.data_ptr(), scr.data_ptr()
        block = BWD_ARGS.pack_call(
            dy.data_ptr(), saved.data_ptr(), 0 if weight is None else weight.data_ptr(),
            0 if bias is None else bias.data_ptr(), stats_ptr, stats_ptr + self.rstd_offset,
            0 if dh_out is None else dh_out.data_ptr(), dx.data_ptr(),
            0 if dres is None else dres.data_ptr(), scr_ptr + rows,
            0 if dw is None else dw.data_ptr(), 0 if db is None else db.data_ptr(), scr_ptr,
            seed_lo, seed_hi) + self.tail
        if threads == 1:
            self.launch.serial(block)
        else:
            self.launch.on_threads(block, threads, 0)
        return dx, dres, dw if self.need_dw else None, db if self.need_db else None


# --- the backend contract (docs/DESIGN.md), for the torch.library ops and the tests ------------


_PLANS: dict[tuple, ForwardPlan | BackwardPlan] = {}


def _plan(cls, *spec):
    plan = _PLANS.get((cls, spec))
    if plan is None:
        if len(_PLANS) >= 256:
            _PLANS.clear()
        plan = _PLANS[cls, spec] = cls(*spec)
    return plan


def _unit_rows(t: torch.Tensor | None) -> torch.Tensor | None:
    # the contract promises unit inner stride; a cheap guard for direct callers
    if t is not None and t.dim() == 2 and t.shape[1] > 1 and t.stride(1) != 1:
        return t.contiguous()
    return t


def _param(t: torch.Tensor | None) -> torch.Tensor | None:
    # weight and bias: contiguous (N,) by the contract; a cheap guard for direct callers
    if t is not None and t.numel() > 1 and t.stride(-1) != 1:
        return t.contiguous()
    return t


def _dtype(t: torch.Tensor | None) -> torch.dtype | None:
    return None if t is None else t.dtype


def _row_stride(t: torch.Tensor | None, n: int) -> int:
    """The row stride of (M, N) rows (0 for an expanded batch); N where it does not matter."""
    return n if t is None or t.shape[0] <= 1 else t.stride(0)


def norm_fwd(x, weight, bias, residual, eps, is_rms, zero_centered, dropout_p, seed, out_dtype,
             residual_dtype, xhat_dtype=None):
    """Normalize the rows of x (M, N); returns (y, h, mean, rstd) as in docs/DESIGN.md."""
    x, residual = _unit_rows(x), _unit_rows(residual)
    weight, bias = _param(weight), _param(bias)
    m, n = x.shape
    ct = compute_dtype(x.dtype)
    has_h = residual is not None or dropout_p > 0
    if m == 0 or n == 0:
        y = torch.empty((m, n), dtype=out_dtype)
        h = torch.empty((m, n) if has_h else (0,), dtype=residual_dtype or x.dtype)
        # torch's statistics of an empty row
        return y, h, torch.zeros(0 if is_rms else m, dtype=ct), torch.full((m,), float("nan"),
                                                                            dtype=ct)
    h_dtype = (residual_dtype or x.dtype) if has_h else None
    plan = _plan(ForwardPlan, m, n, _row_stride(x, n), _row_stride(residual, n),
                 x.dtype,
                 _dtype(residual), _dtype(weight), _dtype(bias), out_dtype, h_dtype, float(eps),
                 is_rms, zero_centered, float(dropout_p), xhat_dtype, True, (m, n))
    y, h, stats = plan(x, residual, weight, bias, seed if dropout_p > 0 else 0)
    if h is None:
        h = torch.empty((0,), dtype=x.dtype)
    if is_rms:
        return y, h, torch.empty((0,), dtype=ct), stats
    # separate tensors: the outputs of an op may not alias one another (nor be offset views)
    return y, h, stats[:m].clone(), stats[m:].clone()


def norm_bwd(dy, h, weight, bias, mean, rstd, dh_out, eps, is_rms, zero_centered, dropout_p,
             seed, has_residual, x_dtype, residual_dtype, need_weight_grad, from_output=False):
    """Gradients (dx, dresidual, dweight, dbias) of `norm_fwd`, as in docs/DESIGN.md."""
    dy, h, dh_out = _unit_rows(dy), _unit_rows(h), _unit_rows(dh_out)
    weight, bias = _param(weight), _param(bias)
    m, n = dy.shape
    ct = rstd.dtype
    need_dw = need_weight_grad and weight is not None
    need_db = need_weight_grad and bias is not None
    if m == 0 or n == 0:
        dres = torch.empty((m, n) if has_residual else (0,), dtype=residual_dtype or x_dtype)
        dw = torch.zeros(n, dtype=weight.dtype) if need_dw else None  # the gradients of no rows
        db = torch.zeros(n, dtype=bias.dtype) if need_db else None
        return torch.empty((m, n), dtype=x_dtype), dres, dw, db
    dres_dtype = (residual_dtype or x_dtype) if has_residual else None
    plan = _plan(BackwardPlan, m, n, _row_stride(dy, n), _row_stride(h, n),
                 _row_stride(dh_out, n), ct, dy.dtype, h.dtype, _dtype(weight), _dtype(bias),
                 _dtype(dh_out), x_dtype, dres_dtype, is_rms, zero_centered, float(dropout_p),
                 need_dw, need_db, from_output, (m, n))
    stats = rstd.contiguous() if is_rms else torch.cat([mean, rstd])
    dx, dres, dw, db = plan(dy, h, weight, bias, stats, dh_out, seed if dropout_p > 0 else 0)
    if dres is None:
        dres = torch.empty((0,), dtype=residual_dtype or x_dtype)
    return dx, dres, dw if need_dw else None, db if need_db else None


def dropout_keep_mask(seed: int, M: int, N: int, p: float, device="cpu") -> torch.Tensor:
    """The (M, N) bool mask of the elements the kernels keep for dropout probability p."""
    out = torch.empty((M, N), dtype=torch.bool)
    if M * N:
        seed_lo, seed_hi = _seed_words(seed)
        threads = threads_for(thread_cap(M * N, M))
        _MASK[()](MASK_ARGS.pack_call(out.data_ptr(), seed_lo, seed_hi)
                  + MASK_ARGS.fixed(m=M, n=N, p=float(p)), threads)
    return out.to(device)
