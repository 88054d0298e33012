"""What the Triton kernels share: the device guard, Triton's view of row alignment, the
correctly rounded rsqrt, the way the programs that split one row (or group) exchange partial
sums, and the fixed-order sum of float32 partial rows of the parameter gradients.

Exchange. When a row is wider than one program holds, K programs each keep one chunk of it in
registers and need the sums of all K chunks. Two ways, chosen by `sync_flags`:

- cooperative (a GPU, LEADER=False, SYNC=True): every program publishes its chunk's sums, then
  waits until all K chunks of its row have (`publish` / `wait`: a counter per row, release and
  acquire). Programs take their work from a ticket counter in the order they start (`slot`),
  so a row's K programs hold consecutive tickets and wait only for each other; with K no larger
  than the SM count they are resident together and cannot deadlock.
- leader (LEADER=True): chunk 0 of each row computes the sums of all K chunks itself (reading
  the row a second time, within the same launch) and publishes them; the other chunks wait for
  it (SYNC=True, a GPU when K exceeds its SM count, or with `COOPERATE = False`) or, in Triton's
  interpreter, which runs programs one after another in grid order, simply read them after it
  (SYNC=False: no tickets, no waiting, the CI path). The leader never waits, so this path needs
  no co-residency.

Both compute a chunk's sums with the same code on the same tile shape and merge them in chunk
order, so they give the same bits (checked on a GPU by the tests marked gpu_only).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .._backend import triton_interpreted

# On a GPU the programs of a split row cooperate; False makes a GPU take the leader path too
# (the GPU-only tests compare the two).
COOPERATE = True


def on_device(fn):
    """Launch on the first argument's GPU: Triton launches on the current device, so a tensor on
    cuda:1 would otherwise be handed to a kernel running on cuda:0."""

    @functools.wraps(fn)
    def wrapper(first, *args, **kwargs):
        if first.is_cuda and first.device.index != torch.cuda.current_device():
            with torch.cuda.device(first.device):
                return fn(first, *args, **kwargs)
        return fn(first, *args, **kwargs)

    return wrapper


def alignment(n: int, *strides: int) -> int:
    """The largest power of two up to 16 dividing n and every stride. Kernels take n and the
    strides divided by it (and the factor as a constexpr), so Triton knows that rows start on
    16-byte boundaries and loads 128 bits at a time; it specialises integers only on
    divisibility by 16, which N = 3000 (a multiple of 8) misses."""
    a = 16
    while a > 1 and any(v % a for v in (n, *strides)):
        a //= 2
    return a


@functools.lru_cache(maxsize=16)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sync_flags(device: torch.device, k: int) -> tuple[bool, bool]:
    """(LEADER, SYNC) for rows split into k chunks (see the module docstring)."""
    if triton_interpreted() or device.type != "cuda":
        return True, False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return not COOPERATE or k > _sm_count(index), True


def sync_buffer(device: torch.device, rows: int, sync: bool, dummy: torch.Tensor):
    """The ticket counter and one arrival counter per row, zeroed (a memset: CUDA-graph safe)."""
    return torch.zeros(rows + 1, dtype=torch.int32, device=device) if sync else dummy


@triton.jit
def slot(SYNCBUF, K, SYNC: tl.constexpr):
    """(tile, chunk) of this program in a (tiles, K) grid: from the ticket counter SYNCBUF[0] on a
    GPU (start order), from the program ids in the interpreter (which runs program (t, 0), the
    leader, before (t, 1), ...)."""
    if SYNC:
        t = tl.atomic_add(SYNCBUF, 1)
        tile, k = t // K, t % K
    else:
        tile, k = tl.program_id(0), tl.program_id(1)
    return tile, k


@triton.jit
def publish(SYNCBUF, rows, row_ok, count):
    """After this program's stores of the sums of `rows`: add `count` to their arrival counters.
    The barrier orders every thread's stores before the release."""
    tl.debug_barrier()
    tl.atomic_add(SYNCBUF + 1 + rows, count, mask=row_ok, sem="release")


@triton.jit
def wait(SYNCBUF, rows, row_ok, K):
    """Spin until all K chunks of `rows` have published (acquire: their sums are visible)."""
    seen = tl.atomic_add(SYNCBUF + 1 + rows, 0, mask=row_ok, sem="acquire")
    while tl.min(tl.where(row_ok, seen, K), axis=0) < K:
        seen = tl.atomic_add(SYNCBUF + 1 + rows, 0, mask=row_ok, sem="acquire")


@triton.jit
def load_sums(S, rows, row_ok, K, KP: tl.constexpr):
    """The (ROWS, KP) sums S[row, k] of every chunk, zero beyond K. Volatile: other programs
    wrote them during this launch, so no stale L1 line may answer."""
    ks = tl.arange(0, KP)
    ok = row_ok[:, None] & (ks < K)[None, :]
    return tl.load(S + rows.to(tl.int64)[:, None] * K + ks[None, :], mask=ok, other=0.0,
                   volatile=True)


@triton.jit
def rsqrt_rn(v, COMPUTE: tl.constexpr):
    """1/sqrt(v), correctly rounded: tl.rsqrt, tl.sqrt and float32 division are approximations."""
    if COMPUTE == tl.float64:
        return 1.0 / tl.sqrt(v)  # IEEE in float64
    else:
        return tl.div_rn(1.0, tl.sqrt_rn(v))


@triton.jit
def merge_moments(s1, s2, n_k, k_ok, n):
    """(mean, biased variance) per row from (ROWS, K) chunk sums s1 = Σv and s2 = Σ(v - chunk
    mean)² over n_k elements each: Chan's exact merge, in chunk order. For K = 1 it reduces bit
    for bit to the plain two-pass formulas."""
    mean = tl.sum(s1, axis=1) / n
    dev = s1 / n_k - mean[:, None]
    return mean, tl.sum(tl.where(k_ok, s2 + n_k * dev * dev, 0.0), axis=1) / n


@triton.jit
def _sum_rows_kernel(PW, PB, DW, DB, P, n_al, PB_ROWS: tl.constexpr, RB: tl.constexpr,
                     ALIGN: tl.constexpr, DW_GRAD: tl.constexpr, DB_GRAD: tl.constexpr,
                     COMPUTE: tl.constexpr):
    """DW, DB = the sums of the P partial rows PW, PB (P, N), in a fixed order, RB columns."""
    N = n_al * ALIGN
    cols = tl.program_id(0) * RB + tl.arange(0, RB)
    col_ok = cols < N
    acc_w = tl.zeros([PB_ROWS, RB], COMPUTE)
    acc_b = tl.zeros([PB_ROWS, RB], COMPUTE)
    for p0 in range(0, P, PB_ROWS):
        ps = p0 + tl.arange(0, PB_ROWS)
        ok = (ps < P)[:, None] & col_ok[None, :]
        offs = ps.to(tl.int64)[:, None] * N + cols[None, :]
        if DW_GRAD:
            acc_w += tl.load(PW + offs, mask=ok, other=0.0)
        if DB_GRAD:
            acc_b += tl.load(PB + offs, mask=ok, other=0.0)
    if DW_GRAD:
        tl.store(DW + cols, tl.sum(acc_w, axis=0).to(DW.dtype.element_ty), mask=col_ok)
    if DB_GRAD:
        tl.store(DB + cols, tl.sum(acc_b, axis=0).to(DB.dtype.element_ty), mask=col_ok)


# The final sum: a program reads up to SUM_ROWS partial rows of a column block at once (32 KB in
# flight), in column blocks narrow enough to give about SUM_PROGRAMS programs.
SUM_ROWS, SUM_TILE, SUM_PROGRAMS = 256, 4096, 396


def sum_partial_rows(pw: torch.Tensor | None, pb: torch.Tensor | None,
                     dw: torch.Tensor | None, db: torch.Tensor | None) -> None:
    """dw, db (N,) = the column sums of the float32 partial rows pw, pb (P, N), in row order
    (either pair may be None)."""
    parts = pw if pw is not None else pb
    p, n = parts.shape
    rows = min(SUM_ROWS, triton.next_power_of_2(p))
    rb = max(16, min(SUM_TILE // rows, triton.next_power_of_2(triton.cdiv(n, SUM_PROGRAMS))))
    _sum_rows_kernel[(triton.cdiv(n, rb),)](
        parts if pw is None else pw, parts if pb is None else pb,
        (db if dw is None else dw), (dw if db is None else db), p, n // alignment(n), PB_ROWS=rows,
        RB=rb, ALIGN=alignment(n), DW_GRAD=pw is not None, DB_GRAD=pb is not None,
        COMPUTE=tl.float64 if parts.dtype == torch.float64 else tl.float32,
        num_warps=8, num_stages=1, enable_fp_fusion=True,
    )
