"""The Triton kernels move each byte once: every path of every op, counted under the interpreter.

`byte_traffic.count_traffic` counts the distinct bytes each launch reads and writes, per tensor
(re-reads within a launch are served by the caches on a GPU; a second launch reads again). Each
test compares an op's total with its ideal, every tensor the op must move counted once:

    forward  |x| + |residual| + |weight| + |bias| + |y| + |h| + |mean| + |rstd|
    backward |dy| + |saved input| + |dh_out| + |weight| (+ |bias| recomputing from the output)
             + |mean| + |rstd| + |dx| + |dresidual| + |dweight| + |dbias|
    GroupNorm forward |x| + |weight| + |bias| + |y| + |mean| + |var|; backward |dy| + |x| +
             |weight| (+ |bias| with SiLU) + |mean| + |var| + |dx| + |dweight| + |dbias|

and asserts at most 1.03x forward and 1.08x backward (the backward's float32 partial rows of
dweight and dbias, written once and read once, take up to 5%). dresidual counts where the
caller asks for it: a tensor of its own (dropout, another dtype, or two leaves whose .grad
must not share memory); where it equals dx the caller passes has_residual=False and reuses dx.

Sizes: N not a multiple of 16 and the widest rows, every path (rows packed per program, one row
per program, rows split into chunks). The forward's bytes per row do not depend on M, so M is
tiny; the backward's partial rows do, so M gives two row blocks where the path has them.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from byte_traffic import count_traffic, nbytes
from helpers import GPU, randn

T = pytest.importorskip("fusednorm.triton.layer_norm")
TG = pytest.importorskip("fusednorm.triton.group_norm")

pytestmark = pytest.mark.skipif(GPU, reason="counts bytes under Triton's interpreter")

FWD_BOUND, BWD_BOUND = 1.03, 1.08


@triton.jit
def _copy_kernel(X, Y, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs, mask=offs < N), mask=offs < N)


def test_counter_sees_each_launch_and_only_distinct_bytes():
    x = randn(1000)
    y = torch.empty_like(x)
    with count_traffic() as t:
        for _ in range(2):  # a second launch over the same tensors counts again
            _copy_kernel[(4,)](x, y, 1000, BLOCK=256)
    assert [launch.kernel for launch in t.launches] == ["_copy_kernel"] * 2
    assert t.distinct() == 2 * nbytes(x, y) and t.distinct(x) == 2 * nbytes(x)
    assert t.stray == 0 and torch.equal(x, y)


def _row_tensors(m, n, is_rms, residual, dropout):
    x = randn(m, n, dtype=torch.bfloat16)
    r = randn(m, n, dtype=torch.bfloat16) if residual else None
    w = randn(n, std=0.3) + 1
    b = None if is_rms else randn(n)
    return x, r, w, b, 0.2 if dropout else 0.0


def _fwd(x, r, w, b, is_rms, p):
    with_h = r is not None or p > 0
    return T.norm_fwd(x, w, b, r, 1e-5, is_rms, False, p, 7, x.dtype,
                      x.dtype if with_h else None)


# (N, M): rows packed into a program; one row per program; two chunks; the widest rows
FWD_SHAPES = [(100, 37), (5000, 3), (T.FWD_FUSED_MAX + 3000, 2), (1 << 18, 2)]
VARIANTS = {"ln": (False, False, False), "rms+residual+dropout": (True, True, True)}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n, m", FWD_SHAPES, ids=lambda v: str(v))
def test_forward_moves_each_byte_once(n, m, variant):
    is_rms, residual, dropout = VARIANTS[variant]
    x, r, w, b, p = _row_tensors(m, n, is_rms, residual, dropout)
    with count_traffic() as t:
        y, h, mean, rstd = _fwd(x, r, w, b, is_rms, p)
    ideal = nbytes(x, r, w, b, y, h, mean, rstd)
    assert t.stray == 0
    assert t.distinct(x) == nbytes(x) and t.distinct(y) == nbytes(y)
    assert t.distinct() <= FWD_BOUND * ideal, f"{t.distinct() / ideal:.3f}x the ideal"


# N, and whether M gives two row blocks (float32 partial rows and their sum; M the smallest that
# does, from the blocks' minimum length) or one (M = 2: the gradients are written directly):
# rows packed; three chunks; the widest rows
BWD_SHAPES = [(100, True), (3000, True), (1 << 18, False)]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n, two_blocks", BWD_SHAPES, ids=str)
def test_backward_moves_each_byte_once(n, two_blocks, variant):
    is_rms, residual, dropout = VARIANTS[variant]
    # bfloat16 dy, saved input, dx (dh_out and dresidual with the residual); float32 partials
    # of dweight (and dbias), each written and read once
    min_rows = T._min_rows(8 * (1 + (not is_rms)), 2 * (3 + 2 * residual))
    m = 2 * min_rows if two_blocks else 2
    x, r, w, b, p = _row_tensors(m, n, is_rms, residual, dropout)
    _, h, mean, rstd = _fwd(x, r, w, b, is_rms, p)
    saved = h if h.numel() else x
    dy = randn(m, n, dtype=torch.bfloat16)
    dh_out = randn(m, n, dtype=torch.bfloat16) if residual else None
    with count_traffic() as t:
        dx, dres, dw, db = T.norm_bwd(dy, saved, w, b, mean, rstd, dh_out, 1e-5, is_rms, False,
                                      p, 7, residual, x.dtype, x.dtype, True)
    blocks = len([launch for launch in t.launches if launch.kernel == "_sum_rows_kernel"])
    assert blocks == two_blocks, "the case should reach the path it names"
    ideal = nbytes(dy, saved, dh_out, w, mean, rstd, dx, dres, dw, db)
    assert t.stray == 0
    for tensor in (dy, saved, dx):
        assert t.distinct(tensor) == nbytes(tensor)
    assert t.distinct() <= BWD_BOUND * ideal, f"{t.distinct() / ideal:.3f}x the ideal"


# (N, C, H, W, groups), layout, whether groups are split into chunks: groups that fit a tile
# (several to a tile); groups split into 2 chunks (channels first) or 4 (channels last);
# InstanceNorm (one channel per group: channels last, a tile holds 512 of its 900 positions)
GN_CASES = [((2, 12, 10, 10, 3), False, False), ((2, 12, 10, 10, 3), True, False),
            ((2, 8, 40, 40, 2), False, True), ((2, 8, 40, 40, 2), True, True),
            ((2, 6, 30, 30, 6), False, False), ((2, 6, 30, 30, 6), True, True)]


@pytest.mark.parametrize("silu", [False, True], ids=["plain", "silu"])
@pytest.mark.parametrize("shape, channels_last, split", GN_CASES, ids=str)
def test_group_norm_moves_each_byte_once(shape, channels_last, split, silu):
    n, c, h, w_, groups = shape
    x = randn(n, c, h * w_, dtype=torch.bfloat16)
    dy = randn(n, c, h * w_, dtype=torch.bfloat16)
    if channels_last:
        x, dy = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (x, dy))
    w, b = randn(c), randn(c)
    assert TG.tiling(c, h * w_, groups, channels_last, TG.FWD_TILE).split == split
    with count_traffic() as fwd:
        y, mean, var = TG.group_norm_fwd(x, w, b, groups, 1e-5, silu, channels_last)
    with count_traffic() as bwd:
        dx, dw, db = TG.group_norm_bwd(dy, x, w, b, mean, var, groups, 1e-5, silu, channels_last)
    assert fwd.stray == bwd.stray == 0
    assert fwd.distinct(x) == nbytes(x) and bwd.distinct(x) == nbytes(x)
    assert bwd.distinct(dy) == nbytes(dy)
    ideal = nbytes(x, w, b, y, mean, var)
    assert fwd.distinct() <= FWD_BOUND * ideal, f"forward {fwd.distinct() / ideal:.3f}x"
    ideal = nbytes(dy, x, w, b if silu else None, mean, var, dx, dw, db)
    assert bwd.distinct() <= BWD_BOUND * ideal, f"backward {bwd.distinct() / ideal:.3f}x"
