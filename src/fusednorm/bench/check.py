"""Before anything is timed, every provider's outputs (and, for backward modes, gradients) are
compared with the float64 reference on the very inputs that will be timed:

    max|out - ref| <= 2 * max|torch - ref| + atol * max(1, max|ref|)

with torch's eager error as the yardstick (tests/helpers.py uses the same rule and table).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from fusednorm.bench.cases import Inputs, reference
from fusednorm.bench.providers import Fn

ATOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3, torch.float64: 1e-10}
GRAD_NAMES = ("dx", "dweight", "dbias", "dresidual")


@dataclass
class Verdict:
    fwd: str = "ok"  # "ok", "invalid" (wrong numbers) or "error" (raised)
    bwd: str = "ok"
    notes: list[str] = field(default_factory=list)
    worst: float = 0.0  # max over tensors of err / bound (<= 1 passes)

    def status(self, mode: str) -> str:
        if self.fwd != "ok" or mode == "fwd":
            return self.fwd
        return self.bwd


def _run(fn: Fn, inp: Inputs, grads: bool):
    """(outputs, gradients of the leaves or None); the leaves require grad only if grads."""
    for t in inp.leaves:
        t.requires_grad_(grads)
    outs = tuple(fn(*inp.args))
    if not grads:
        return outs, None
    dl = torch.autograd.grad(outs, inp.leaves, inp.grad_outs[: len(outs)], allow_unused=True)
    return outs, dl


def _expected(op: str, inp: Inputs, grads: bool):
    leaves64 = [t.detach().double().requires_grad_(grads) for t in inp.leaves]
    it = iter(leaves64)
    args = [None if t is None else next(it) for t in inp.args]
    outs = reference(op, *args)
    if not grads:
        return [o.detach() for o in outs], None
    g = [d.double() for d in inp.grad_outs[: len(outs)]]
    return [o.detach() for o in outs], torch.autograd.grad(outs, leaves64, g)


def _err(t, ref) -> float:
    if t is None or t.shape != ref.shape:
        return math.inf
    e = (t.detach().double() - ref).abs().max().item()
    return math.inf if math.isnan(e) else e


def _why(stage: str, e: Exception) -> str:
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    return f"{stage} raised {type(e).__name__}" + (f": {first}" if first else "")


def check(op: str, inp: Inputs, fns: dict[str, Fn], torch_fn: Fn, grads: bool
          ) -> dict[str, Verdict]:
    """One Verdict per provider; torch_fn (torch eager) gives the error allowance."""
    dtype = inp.args[0].dtype
    out_ref, grad_ref = _expected(op, inp, grads)
    refs = out_ref + list(grad_ref or [])
    names = ["y", "h"][: len(out_ref)]
    names += [GRAD_NAMES[i] for i, t in enumerate(inp.args) if t is not None] if grads else []
    t_outs, t_grads = _run(torch_fn, inp, grads)
    allowed = [2 * _err(t, r) + ATOL[dtype] * max(1.0, r.abs().max().item())
               for t, r in zip(list(t_outs) + list(t_grads or []), refs)]

    verdicts = {}
    for provider, fn in fns.items():
        v = verdicts[provider] = Verdict()
        try:  # inference first (what the fwd mode times), then with autograd
            got = list(_run(fn, inp, False)[0])
        except Exception as e:  # noqa: BLE001 -- a peer's or a compiler's failure is reported
            v.fwd = "error"
            v.notes.append(_why("fwd", e))
            continue
        if len(got) != len(out_ref):
            v.fwd = "invalid"
            v.notes.append(f"returned {len(got)} outputs, expected {len(out_ref)}")
            continue
        if grads:
            try:
                outs, dl = _run(fn, inp, True)
                got += list(outs) + list(dl)
            except Exception as e:  # noqa: BLE001
                v.bwd = "error"
                v.notes.append(_why("bwd", e))
        n = len(out_ref)
        expected = list(zip(names, refs, allowed))
        for i, t in enumerate(got):
            name, r, bound = expected[i] if i < n else expected[i - n]
            err = _err(t, r)
            v.worst = max(v.worst, err / bound)
            if err > bound:
                setattr(v, "fwd" if name in ("y", "h") else "bwd", "invalid")
                note = f"max|{name} - ref| = {err:.3g} > {bound:.3g} allowed"
                v.notes += [note] if note not in v.notes else []
    for t in inp.leaves:
        t.requires_grad_(False)
    return verdicts
