"""Put fusednorm's kernels into an already-built model: ``patch(model)``, ``unpatch(model)``.

Each norm is swapped for a new module object that takes over the original's state (the very same
Parameter objects, hooks and attributes: optimizers, tied weights and state_dict keys are
untouched) and computes what the original computed, cast order included:

- torch.nn.LayerNorm, RMSNorm, GroupNorm, BatchNorm*d and InstanceNorm*d, of exactly that type,
  become fusednorm's subclass of the same torch module (where fusednorm exports one);
- a Hugging Face norm becomes an ``HFNorm`` when its code is one of the forwards in ``_HF``
  below, token for token. Recognising code rather than class names covers the many copies
  transformers makes of each norm (LlamaRMSNorm, MistralRMSNorm, Qwen2RMSNorm, ...), and a norm
  that a newer transformers changes is reported, never mis-patched.

Any other module with "norm" in its class name is left alone and listed in the report. A norm
that is recognised but configured in a way fusednorm cannot reproduce raises before anything is
swapped. transformers is never imported.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

import fusednorm
from fusednorm import _silu_after_norm, fused_layers
from fusednorm._checks import HALF_DTYPES, compute_dtype
from fusednorm.row_norm import layer_norm, rms_norm

# torch norm type -> constructor arguments of the fusednorm class of the same name (used where
# fusednorm has it), read from a module; the module's own state then replaces the new one's.
_TORCH = {
    nn.LayerNorm: lambda m: (m.normalized_shape, m.eps, m.elementwise_affine),
    nn.RMSNorm: lambda m: (m.normalized_shape, m.eps, m.elementwise_affine),
    nn.GroupNorm: lambda m: (m.num_groups, m.num_channels, m.eps, m.affine),
    **dict.fromkeys(
        (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d,
         nn.InstanceNorm3d),
        lambda m: (m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)),
}


# Cast orders: (input dtype, weight dtype) -> (xhat_dtype, out_dtype) of fusednorm's functions.
def _cast_back_then_scale(x, w):  # weight * x̂.to(input dtype): the product in promote(w, x)
    return x, torch.promote_types(w, x)


def _scale_in_fp32(x, w):  # (weight * x̂ in float32).to(input dtype)
    return None, x


def _t5(x, w):  # x̂ rounded to a half weight's dtype; else the product in float32 (or float64)
    return (w, w) if w in HALF_DTYPES else (None, torch.promote_types(w, torch.promote_types(
        x, torch.float32)))


@dataclass(frozen=True)
class Rule:
    """How to reproduce one Hugging Face norm with fusednorm's options."""

    eps: str  # the attribute holding epsilon
    casts: Callable[[torch.dtype, torch.dtype], tuple[torch.dtype | None, torch.dtype]]
    is_rms: bool = True
    zero_centered: bool = False
    weighted: bool = True


_RMS = """
def forward(self, hidden_states):
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
"""
_NORM = """
def _norm(self, x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
"""
# The Hugging Face code reproduced, as transformers writes it (checked against 5.24), comments
# and type hints aside.
_HF = {
    # LlamaRMSNorm and ~140 copies: Mistral, Qwen2/3, Phi3, ...
    _RMS + "    return self.weight * hidden_states.to(input_dtype)": Rule(
        "variance_epsilon", _cast_back_then_scale),
    # GptOss, Olmo2, ...; Helium, NemotronH
    _RMS + "    return (self.weight * hidden_states).to(input_dtype)": Rule(
        "variance_epsilon", _scale_in_fp32),
    _RMS + "    return (self.weight.to(torch.float32) * hidden_states).to(input_dtype)": Rule(
        "variance_epsilon", _scale_in_fp32),
    # Gemma 1-3, Qwen3Next: x̂ * (1 + w) in float32
    _NORM + """
def forward(self, x):
    output = self._norm(x.float())
    output = output * (1.0 + self.weight.float())
    return output.type_as(x)
""": Rule("eps", _scale_in_fp32, zero_centered=True),
    _NORM + """
def forward(self, x):
    output = self._norm(x.float()).type_as(x)
    return output * self.weight
""": Rule("eps", _cast_back_then_scale),  # Llama4TextRMSNorm
    _NORM + """
def forward(self, x):
    return self._norm(x.float()).type_as(x)
""": Rule("eps", _scale_in_fp32, weighted=False),  # Llama4TextL2Norm, NanoChat, ...
    # T5, MT5, LongT5, Pix2Struct, ...
    """
def forward(self, hidden_states):
    variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    if self.weight.dtype in [torch.float16, torch.bfloat16]:
        hidden_states = hidden_states.to(self.weight.dtype)
    return self.weight * hidden_states
""": Rule("variance_epsilon", _t5),
    # Cohere, Cohere2: a LayerNorm without bias
    """
def forward(self, hidden_states):
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    mean = hidden_states.mean(-1, keepdim=True)
    variance = (hidden_states - mean).pow(2).mean(-1, keepdim=True)
    hidden_states = (hidden_states - mean) * torch.rsqrt(variance + self.variance_epsilon)
    hidden_states = self.weight.to(torch.float32) * hidden_states
    return hidden_states.to(input_dtype)
""": Rule("variance_epsilon", _scale_in_fp32, is_rms=False),
}


def _fingerprint(body: list[ast.stmt]) -> str:
    """The methods that compute, as an AST dump: comments, docstrings, type hints and layout do
    not count; __init__ and extra_repr (no numerics) are left out."""
    dumps = []
    for fn in body:
        if not isinstance(fn, ast.FunctionDef) or fn.name in ("__init__", "extra_repr"):
            continue
        fn.returns = None
        for node in ast.walk(fn):
            if isinstance(node, ast.arg):
                node.annotation = None
        first = fn.body[0]
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
            fn.body = fn.body[1:]  # docstring
        dumps.append(ast.dump(fn))
    return "\n".join(sorted(dumps))


@functools.cache
def _hf_rules() -> dict[str, Rule]:
    return {_fingerprint(ast.parse(src).body): rule for src, rule in _HF.items()}


@functools.cache
def _hf_rule(cls: type) -> Rule | None:
    if cls.__bases__ != (nn.Module,) or cls.forward.__qualname__ != f"{cls.__qualname__}.forward":
        return None  # a subclass of another module, or a forward swapped in (hub kernels)
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):  # no source: not recognised
        return None
    return _hf_rules().get(_fingerprint(tree.body[0].body))


class HFNorm(nn.Module):
    """A Hugging Face norm on fusednorm's kernels: the original's attributes and Parameter, its
    cast order. (float64 input is computed in float64, where Hugging Face's code upcasts only
    to float32.)"""

    def __init__(self, rule: Rule) -> None:
        super().__init__()
        self._fusednorm_rule = rule

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor | None = None):
        """The norm of hidden_states; with ``residual`` (a decoder layer patched with
        fuse_residual=True), ``(norm(h), h)`` where h = residual + hidden_states, in one pass."""
        rule, x = self._fusednorm_rule, hidden_states
        if residual is not None and residual.dtype != x.dtype:
            # torch's add promotes, the kernels keep the residual's dtype: add as torch does
            h = residual + x
            return self.forward(h), h
        w = self.weight if rule.weighted else None
        xhat_dtype, out_dtype = rule.casts(x.dtype, x.dtype if w is None else w.dtype)
        if w is not None and w.dtype != x.dtype and not (
                w.dtype == torch.float32 and x.dtype in HALF_DTYPES):
            # the kernels take a weight of the input's dtype or float32: cast it, exactly
            if w.dtype == torch.float64 and not rule.zero_centered:
                raise NotImplementedError(
                    f"fusednorm: {self.extra_repr()} multiplies a float64 weight in float64 "
                    f"with {x.dtype} input; fusednorm computes in float32 there")
            w = w.to(compute_dtype(x.dtype))
        norm = rms_norm if rule.is_rms else layer_norm
        return norm(x, x.shape[-1:], w, eps=getattr(self, rule.eps), out_dtype=out_dtype,
                    xhat_dtype=xhat_dtype, zero_centered_weight=rule.zero_centered,
                    residual=residual)

    def extra_repr(self) -> str:
        shape = f"{tuple(self.weight.shape)}, " if self._fusednorm_rule.weighted else ""
        eps = getattr(self, self._fusednorm_rule.eps)
        return f"{type(self._fusednorm_original).__name__}, {shape}eps={eps}"


@dataclass
class PatchReport:
    """What patch() did, as module path -> class name."""

    replaced: dict[str, str] = field(default_factory=dict)
    left_alone: dict[str, str] = field(default_factory=dict)  # norm-like, not recognised
    fused_residual: dict[str, str] = field(default_factory=dict)  # decoder layers
    fused_activation: dict[str, str] = field(default_factory=dict)  # GroupNorms then SiLU

    def __str__(self) -> str:
        def count(d):
            return ", ".join(f"{k} x{n}" for k, n in Counter(d.values()).items()) or "nothing"
        fused = (f"; fused the residual add in {count(self.fused_residual)}"
                 if self.fused_residual else "")
        if self.fused_activation:
            fused += f"; fused the SiLU after {count(self.fused_activation)}"
        return (f"fusednorm.patch replaced {count(self.replaced)}{fused}; left alone "
                f"{count(self.left_alone)}")


def patch(model: nn.Module, *, fuse_residual: bool = False,
          fuse_activation: bool = False) -> PatchReport:
    """Replace, in place, the norms inside ``model`` by fusednorm's, keeping their Parameter
    objects, state_dict keys and numerics. Returns what was replaced and the norm-like modules
    left alone; raises NotImplementedError, before changing anything, for a recognised norm it
    cannot reproduce. ``unpatch(model)`` restores the original modules.

    ``fuse_residual=True`` also fuses, in each Hugging Face decoder layer, the residual add that
    precedes a norm into that norm (see fusednorm.fused_layers); a decoder layer whose forward
    fusednorm does not know raises NotImplementedError, before anything is changed.

    ``fuse_activation=True`` also fuses into a GroupNorm the SiLU module its output goes into
    next, where the code of the module holding both shows that nothing else reads that output
    (diffusers' ResNet blocks, UNet and autoencoder heads; see fusednorm._silu_after_norm).
    In half precision the SiLU then reads the norm's float32 result, not its rounded output."""
    _expect_module("patch", model, "the model whose norms it replaces in place")
    report, plan, new_of = PatchReport(), [], {}
    for path, parent in model.named_modules():
        for name, child in parent._modules.items():
            if child is None:
                continue
            where = f"{path}.{name}" if path else name
            if id(child) not in new_of:
                new_of[id(child)] = new = _replacement(child, where)
                if new is not None:
                    report.replaced[where] = type(child).__name__
                elif "norm" in type(child).__name__.lower() and not child._modules \
                        and not type(child).__module__.startswith("fusednorm"):
                    report.left_alone[where] = type(child).__name__
            if new_of[id(child)] is not None:
                plan.append((parent, name, new_of[id(child)]))
    layers = _fusable_layers(model, new_of) if fuse_residual else []
    fusions = _silu_fusions(model, new_of, plan) if fuse_activation else []
    for parent, name, new in plan:
        setattr(parent, name, new)
    for where, holder, norm, guards in fusions:
        report.fused_activation[where] = "GroupNorm"
        _silu_after_norm.fuse(norm, holder, guards)
    for where, layer, cls in layers:
        report.fused_residual[where] = type(layer).__name__
        layer.__class__ = cls
    return report


def _fusable_layers(model: nn.Module, new_of: dict) -> list[tuple[str, nn.Module, type]]:
    """(path, layer, fused class) of each decoder layer not fused yet; raises for one that
    cannot be fused, and when there is none at all (a patch that would silently do nothing)."""
    layers, seen = [], False
    for where, layer in model.named_modules():
        if not fused_layers.is_decoder_layer(layer):
            continue
        seen = True
        if "_fusednorm_unfused" in vars(type(layer)):
            continue  # fused by an earlier patch
        if "forward" in vars(layer):
            _fail(layer, where, "its forward was replaced on the instance (by a hooks library "
                                "such as accelerate?); patch the model before that")
        try:
            cls = fused_layers.fused_class(type(layer))
        except fused_layers.UnknownLayer as e:
            _fail(layer, where, f"fuse_residual=True: {e}, so its residual adds cannot be "
                                "fused without changing what it computes")
        for name in fused_layers.norms_fused(type(layer)):
            norm = layer._modules.get(name)
            new = new_of.get(id(norm)) or norm
            if not isinstance(new, HFNorm):
                _fail(layer, where, f"fuse_residual=True: its {name} "
                                    f"({type(norm).__name__}) is not a norm fusednorm replaces")
            if norm._forward_hooks or norm._forward_pre_hooks:
                _fail(layer, where, f"fuse_residual=True: its {name} has hooks, which would see "
                                    "the fused call's arguments and outputs")
        layers.append((where, layer, cls))
    if not seen:
        raise NotImplementedError(
            "fusednorm.patch(fuse_residual=True) found no Hugging Face decoder layer in "
            f"{type(model).__name__}. Nothing was replaced.")
    return layers


def _silu_fusions(model: nn.Module, new_of: dict, plan: list) -> list[tuple]:
    """(path, holder, new norm, guards) of each replaced GroupNorm whose output goes into a
    SiLU module next (see _silu_after_norm); adds those SiLU modules' replacements to plan."""
    held = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    fusions, silus = [], {}
    for where, holder in model.named_modules():
        if "forward" in vars(holder):
            continue  # (replaced on the instance: the class's code is not what runs)
        children = {n: c for n, c in holder._modules.items() if c is not None and not (
            c._forward_hooks or c._forward_pre_hooks)}
        norms = {n for n, c in children.items()
                 if type(new_of.get(id(c))) is fusednorm.GroupNorm and held[id(c)] == 1}
        acts = {n for n, c in children.items() if type(c) is nn.SiLU}
        if not norms or not acts:
            continue
        for name, (feeds, guards) in _silu_after_norm.fusable(holder, norms, acts).items():
            path = f"{where}.{name}" if where else name
            fusions.append((path, holder, new_of[id(children[name])], guards))
            for act in feeds:
                silus[id(children[act])] = children[act]
    for key, act in silus.items():
        new_of[key] = _adopt(_silu_after_norm.SiLUAfterNorm(act.inplace), act)
    for _, parent in model.named_modules():
        plan.extend((parent, name, new_of[id(child)]) for name, child in parent._modules.items()
                    if id(child) in silus)
    return fusions


def unpatch(model: nn.Module) -> dict[str, str]:
    """Put back the modules that patch() replaced (with the replacements' current parameters);
    returns module path -> class name of what was restored."""
    _expect_module("unpatch", model, "a model that fusednorm.patch changed")
    restored = {}
    for path, module in model.named_modules():
        unfused = vars(type(module)).get("_fusednorm_unfused")
        if unfused is not None:  # a decoder layer with fused residual adds
            module.__class__ = unfused
            restored[path] = unfused.__name__
    for path, parent in list(model.named_modules()):
        for name, child in list(parent._modules.items()):
            original = vars(child).get("_fusednorm_original") if child is not None else None
            if original is None:
                continue
            # the replacement's current tensors: a .to() or sharding may have swapped them
            original._parameters.update(child._parameters)
            original._buffers.update(child._buffers)
            original.training = child.training
            setattr(parent, name, original)
            restored[f"{path}.{name}" if path else name] = type(original).__name__
    return restored


def _expect_module(name: str, model, what_it_is: str) -> None:
    if not isinstance(model, nn.Module):
        got = (f"the class {model.__name__} (an instance is needed)" if isinstance(model, type)
               else type(model).__name__)
        raise TypeError(f"fusednorm.{name}(model) takes a torch.nn.Module ({what_it_is}), "
                        f"got {got}")


def _replacement(module: nn.Module, where: str) -> nn.Module | None:
    cls = type(module)
    if cls in _TORCH:
        ours = getattr(fusednorm, cls.__name__, None)
        if ours is None:
            return None
        new = ours(*_TORCH[cls](module), device="meta")
    elif (rule := _hf_rule(cls)) is not None:
        _check_hf(module, rule, where)
        new = HFNorm(rule)
    else:
        return None
    if "forward" in vars(module):
        _fail(module, where, "its forward was replaced on the instance (by a hooks library such "
                             "as accelerate?); patch the model before that")
    return _adopt(new, module)


def _check_hf(module: nn.Module, rule: Rule, where: str) -> None:
    expected = {"weight"} if rule.weighted else set()
    weight = module._parameters.get("weight")
    if set(module._parameters) != expected or (rule.weighted and weight is None):
        _fail(module, where, f"it has parameters {sorted(module._parameters)}, not "
                             f"{sorted(expected)}")
    if module._buffers or module._modules:
        _fail(module, where, "it has buffers or submodules")
    if weight is not None and weight.dim() != 1:
        _fail(module, where, f"its weight of shape {tuple(weight.shape)} scales each position "
                             "of the leading dims differently (a per-head weight) while the "
                             "norm is over the last dim only; fusednorm's weights have the "
                             "normalized shape")
    if not isinstance(getattr(module, rule.eps, None), (int, float)):
        _fail(module, where, f"its {rule.eps} is not a number")


def _fail(module: nn.Module, where: str, why: str):
    raise NotImplementedError(
        f"fusednorm.patch cannot reproduce {where} ({type(module).__name__}): {why}. "
        "Nothing was replaced.")


def _adopt(new: nn.Module, old: nn.Module) -> nn.Module:
    """``new`` takes over ``old``'s state: the same Parameter objects, hooks and attributes, in
    containers of its own; ``old`` is kept (unregistered) for unpatch."""
    state = dict(vars(old))
    for key in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
        state[key] = type(state[key])(state[key])
    new.__dict__.update(state)
    new.__dict__["_fusednorm_original"] = old
    return new
