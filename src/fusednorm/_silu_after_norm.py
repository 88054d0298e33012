"""`patch(model, fuse_activation=True)`: a GroupNorm whose output goes straight into a SiLU
module computes silu(norm(x)) in one pass (the GroupNorm kernels' fused SiLU), and that SiLU
module passes the result on.

Which norms qualify is read from the code of the module that holds them (diffusers' ResNet
blocks: `h = self.norm1(h); h = self.nonlinearity(h)`), never guessed from names:

- every use of `self.<norm>` in the holder's class is a call `V = self.<norm>(V)` (calls with
  other arguments raise in GroupNorm.forward, before computing anything), and the statement
  run next, on every path, is `V = self.<act>(V)` with `<act>` an `nn.SiLU`: the norm's output
  has no other reader;
- a call inside an `if` whose test reads the holder's configuration (`self.attr == "const"`,
  `self.attr is None`, `self.attr`) and selects the other branch does not count; that test is
  kept as a guard, checked at every call: should the attribute change, the norm stops fusing;
- no hooks on either module, the norm held by that one module only.

At run time the norm fuses only when called from the holder's forward (the frame a module call
puts a few levels up; called from anywhere else it is the plain GroupNorm), and marks its
output tensor; the SiLU module returns a marked tensor as
it is (unmarking it) and applies SiLU to anything else (the same module also takes a time
embedding in diffusers' blocks). Under torch.compile and TorchScript both modules compute
what the originals do, unfused.

Every check is on each call's way, inside models where the Python around a kernel runs
cache-cold (a few µs a step costs a percent of a small model's inference): the frame is looked
up where a plain module call puts it, and the guards' attributes are compared by identity with
the objects they held when the norm was fused (immutable constants: the same object, the same
tests), the tests themselves evaluated only once an attribute has been reassigned.
"""

import ast
import functools
import inspect
import operator
import sys
import textwrap
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusednorm.group_norms import GroupNorm

_MARK = "_fusednorm_silu_applied"
_is_scripting = torch.jit.is_scripting
_getframe = sys._getframe


class GroupNormThenSiLU(GroupNorm):
    """A GroupNorm whose every output goes into a SiLU module next (see the module docstring):
    in eager mode it returns silu(norm(x)), computed in one pass and marked for that module."""

    def forward(self, input: Tensor) -> Tensor:
        if _is_scripting():
            return F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)
        else:  # (TorchScript compiles the branch it takes only; inline: a step less per call)
            holder, guards, code, held = self._fusednorm_fusion
            parent = holder()
            fuse = (type(input) is Tensor and parent is not None
                    and not torch.compiler.is_compiling() and _called_from(code, parent)
                    and _guards_hold(parent, guards, held))
            y = self._eager(input, "silu" if fuse else None)
            if fuse:
                setattr(y, _MARK, True)
            return y

    # Copies and pickles hold the holder itself (a copy of the model: the copy of the holder)
    # in the weak reference's place, and make the fusion anew from it.
    def __getstate__(self):
        state = super().__getstate__()
        holder, guards, _code, held = state.pop("_fusednorm_fusion")
        state["_fusednorm_fused_in"] = (holder(), guards, held)
        return state

    def __setstate__(self, state):
        holder, guards, held = state.pop("_fusednorm_fused_in")
        super().__setstate__(state)
        _set_fusion(self, holder, guards, held)


def _called_from(code, holder: nn.Module) -> bool:
    """Whether the holder's forward (`code`) called this norm: four frames up in a plain module
    call (this one, the norm's forward and the module call's two; hooks add none), else two to
    five (a torch whose module call takes other frames)."""
    try:
        frame = _getframe(4)
    except ValueError:  # (a stack not that deep: not called from a module's forward)
        return False
    if frame.f_code is not code:
        frame = _getframe(2)
        for _ in range(4):
            if frame is None or frame.f_code is code:
                break
            frame = frame.f_back
        else:
            return False
    return frame is not None and frame.f_locals.get("self") is holder


def _guards_hold(holder: nn.Module, guards: tuple[tuple, ...], held: tuple[tuple, ...]) -> bool:
    """Whether every guard holds: each attribute still the object it was when the norm was
    fused (constants: so every test as it was), else the tests themselves."""
    for attr, value in held:
        if getattr(holder, attr, None) is not value:
            return all(_test(getattr(holder, a, None), op, const) == v
                       for a, op, const, v in guards)
    return True


class SiLUAfterNorm(nn.SiLU):
    """nn.SiLU that passes on a fused norm's output, SiLU already applied (its mark taken off)."""

    def forward(self, input: Tensor) -> Tensor:
        if _is_scripting():
            return F.silu(input, inplace=self.inplace)
        else:
            if (type(input) is Tensor and not torch.compiler.is_compiling()
                    and getattr(input, _MARK, False)):
                delattr(input, _MARK)
                return input
            return F.silu(input, inplace=self.inplace)


# --- reading the holder's code ------------------------------------------------------------------

_OPS = {"Eq": operator.eq, "NotEq": operator.ne, "Is": operator.is_, "IsNot": operator.is_not}
_CONFIG_TYPES = (str, int, float, bool, type(None))


def _test(value, op: str, const) -> bool:
    return bool(value) if op == "truth" else bool(_OPS[op](value, const))


def _self_attr(node) -> str | None:
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
            and node.value.id == "self"):
        return node.attr
    return None


def _static_test(test, holder) -> tuple[tuple, bool] | None:
    """(guard, the test's value now) for an `if` test that reads the holder's configuration
    alone; a guard (attr, op, const, value) holds while `op(holder.attr, const)` is value."""
    negate = False
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        test, negate = test.operand, True
    if (attr := _self_attr(test)) is not None:
        op, const = "truth", None
    elif (isinstance(test, ast.Compare) and len(test.ops) == 1
          and type(test.ops[0]).__name__ in _OPS and (attr := _self_attr(test.left)) is not None
          and isinstance(test.comparators[0], ast.Constant)):
        op, const = type(test.ops[0]).__name__, test.comparators[0].value
    else:
        return None
    value = getattr(holder, attr, None)
    if not isinstance(value, _CONFIG_TYPES):
        return None
    now = _test(value, op, const)
    return (attr, op, const, now), now != negate


def _call_of(stmt) -> tuple[str, str] | None:
    """(attr, V) where stmt is `V = self.attr(V)`."""
    if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1
            and isinstance(stmt.targets[0], ast.Name) and isinstance(stmt.value, ast.Call)):
        return None
    call, var = stmt.value, stmt.targets[0].id
    attr = _self_attr(call.func)
    if attr is None or call.keywords or len(call.args) != 1 \
            or not (isinstance(call.args[0], ast.Name) and call.args[0].id == var):
        return None
    return attr, var


def _raises(node, sites) -> bool:
    """A call of a norm with two positional arguments or more: GroupNorm.forward(input) raises
    before computing anything (diffusers' `self.conv_norm_out(sample, latent_embeds)`, for its
    other kind of norm)."""
    return (isinstance(node, ast.Call) and _self_attr(node.func) in sites
            and len(node.args) >= 2 and not any(isinstance(a, ast.Starred) for a in node.args))


@functools.cache
def _class_code(cls: type) -> tuple[ast.AST | None, tuple[ast.AST, ...]]:
    """The holder class's forward, and its classes' other functions but __init__ (a use of a
    norm there would be a call the forward does not show)."""
    forward, others = None, []
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            break
        for name, value in vars(klass).items():
            if isinstance(value, property):
                value = value.fget
            elif isinstance(value, (staticmethod, classmethod)):
                continue
            if not inspect.isfunction(value) or name == "__init__":
                continue
            try:
                tree = ast.parse(textwrap.dedent(inspect.getsource(value)))
            except (OSError, TypeError, SyntaxError):
                return None, ()
            if name == "forward" and forward is None:
                forward = tree.body[0]
            elif name != "forward":
                others.append(tree)
    return forward, tuple(others)


def fusable(holder: nn.Module, norms: set[str], activations: set[str]
            ) -> dict[str, tuple[set[str], tuple[tuple, ...]]]:
    """norm name -> (the SiLU modules it feeds, guards) for the holder's GroupNorms (names in
    `norms`) whose every output goes into one of its SiLU modules (`activations`) next."""
    forward, others = _class_code(type(holder))
    if forward is None:
        return {}
    used_elsewhere = {a for tree in others for node in ast.walk(tree)
                      if (a := _self_attr(node)) is not None}
    sites: dict[str, list] = {n: [] for n in norms - used_elsewhere}
    bad: set[str] = set()

    def other_uses(root) -> None:
        skip = {id(n.func) for n in ast.walk(root) if _raises(n, sites)}
        bad.update(node.attr for node in ast.walk(root)
                   if _self_attr(node) in sites and id(node) not in skip)

    def walk(block: list, successors: list, guards: tuple, reachable: bool) -> None:
        for i, stmt in enumerate(block):
            after = block[i + 1:i + 2] or successors
            call = _call_of(stmt)
            if call is not None and call[0] in sites:
                sites[call[0]].append((call[1], after, guards, reachable))
            elif isinstance(stmt, ast.If):  # its branches run into what follows it
                other_uses(stmt.test)
                static = _static_test(stmt.test, holder)
                for branch, taken in ((stmt.body, True), (stmt.orelse, False)):
                    if static is None:
                        walk(branch, after, guards, reachable)
                    else:
                        guard, value = static
                        walk(branch, after, (*guards, guard), reachable and value == taken)
            else:  # any other use, a call in a loop or a with block among them
                other_uses(stmt)

    walk(forward.body, [], (), True)
    found = {}
    for norm, calls in sites.items():
        feeds, guards = set(), set()
        for var, after, path, reachable in calls:
            if not reachable:  # ruled out by the configuration: it must stay so
                guards.update(path)
                continue
            nxt = _call_of(after[0]) if after else None
            if nxt is None or nxt[1] != var or nxt[0] not in activations:
                feeds = set()
                break
            feeds.add(nxt[0])
        if feeds and norm not in bad:
            found[norm] = (feeds, tuple(sorted(guards, key=repr)))
    return found


def fuse(new: nn.Module, holder: nn.Module, guards: tuple[tuple, ...]) -> None:
    """Make `new` (fusednorm's GroupNorm in the holder's norm's place) a GroupNormThenSiLU."""
    new.__class__ = GroupNormThenSiLU
    held = tuple((attr, getattr(holder, attr, None)) for attr in sorted({g[0] for g in guards}))
    _set_fusion(new, holder, guards, held)


def _set_fusion(norm: GroupNormThenSiLU, holder: nn.Module | None, guards: tuple[tuple, ...],
                held: tuple[tuple, ...]) -> None:
    if holder is None:  # (the holder was gone when this norm was copied: it never fuses)
        norm.__dict__["_fusednorm_fusion"] = (_gone, guards, None, held)
        return
    code = inspect.unwrap(type(holder).forward).__code__  # (what runs in the holder's frame)
    norm.__dict__["_fusednorm_fusion"] = (weakref.ref(holder), guards, code, held)


def _gone() -> None:
    return None
