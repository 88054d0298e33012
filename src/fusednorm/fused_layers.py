"""``patch(model, fuse_residual=True)``: the residual add of Hugging Face decoder layers, fused
into the norm that follows it.

A pre-norm decoder layer computes ``h = residual + sublayer(x)`` and then ``norm(h)``; the add
is a whole pass over memory (and, in backward, another to sum h's two gradients) that
fusednorm's add+norm does inside the norm's own pass. The layer's code does the add, so fusing
it means running other code: the layer's forward is recognised by its code, as the norms are
(`patch._fingerprint`), and only a forward in ``_LAYERS`` below, token for token, is fused. Its
one change is mechanical: the three statements

    hidden_states = residual + <sublayer output>
    residual = hidden_states
    hidden_states = self.<norm>(hidden_states)

become ``hidden_states, residual = self.<norm>(<sublayer output>, residual=residual)``, whose
patched norm (an ``HFNorm``) returns y = norm(h) and h = residual + <sublayer output>, rounded
as torch's add rounds. The rewritten forward is compiled in the original's module, decorators
included (so its signature and keyword handling are the original's), and the layer's class is
swapped for a subclass holding it: hooks, ``isinstance`` checks, gradient checkpointing and the
object itself are untouched, and ``unpatch`` swaps the class back.

The add that ends a layer (before the next layer's input norm) is not fused: the layer's output
is the residual stream itself, which the model's loop, ``output_hidden_states`` hooks, gradient
checkpointing and the final norm all read; fusing it would change the layer's return value.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap

from torch import nn

# The decoder-layer forwards that are fused, as transformers writes them (checked against
# 5.24), with the norms whose preceding add is fused. Each text is shared by many classes:
# tests/test_fused_layers.py covers the families named.
_LLAMA = '''
@deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None,
            use_cache=False, position_embeddings=None, **kwargs):
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    hidden_states, _ = self.self_attn(
        hidden_states=hidden_states,
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=cache,
        use_cache=use_cache,
        position_embeddings=position_embeddings,
        **kwargs,
    )
    hidden_states = residual + hidden_states
    residual = hidden_states
    hidden_states = self.post_attention_layernorm(hidden_states)
    hidden_states = self.mlp(hidden_states)
    hidden_states = residual + hidden_states
    return hidden_states
'''
_LAYERS = {
    # Llama, Mistral, Qwen2, Qwen3, Gemma and ~60 more
    _LLAMA: ("post_attention_layernorm",),
    # Gemma2, Gemma3: a norm after each sublayer too; the add precedes the pre-MLP norm
    '''
@deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
def forward(self, hidden_states, position_embeddings=None, attention_mask=None,
            position_ids=None, cache=None, **kwargs):
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    hidden_states, _ = self.self_attn(
        hidden_states=hidden_states,
        position_embeddings=position_embeddings,
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=cache,
        **kwargs,
    )
    hidden_states = self.post_attention_layernorm(hidden_states)
    hidden_states = residual + hidden_states
    residual = hidden_states
    hidden_states = self.pre_feedforward_layernorm(hidden_states)
    hidden_states = self.mlp(hidden_states)
    hidden_states = self.post_feedforward_layernorm(hidden_states)
    hidden_states = residual + hidden_states
    return hidden_states
''': ("pre_feedforward_layernorm",),
    # Phi3: torch's dropout module runs first (its mask from torch's generator, as unpatched)
    '''
@deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None,
            use_cache=False, position_embeddings=None, **kwargs):
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    hidden_states, self_attn_weights = self.self_attn(
        hidden_states=hidden_states,
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=cache,
        use_cache=use_cache,
        position_embeddings=position_embeddings,
        **kwargs,
    )
    hidden_states = residual + self.resid_attn_dropout(hidden_states)
    residual = hidden_states
    hidden_states = self.post_attention_layernorm(hidden_states)
    hidden_states = self.mlp(hidden_states)
    hidden_states = residual + self.resid_mlp_dropout(hidden_states)
    return hidden_states
''': ("post_attention_layernorm",),
}


class UnknownLayer(Exception):
    """A decoder layer whose forward is not one of `_LAYERS`: why, for patch's message."""


@functools.cache
def _known() -> dict[str, tuple[str, ...]]:
    from fusednorm.patch import _fingerprint

    return {_fingerprint(ast.parse(src).body): norms for src, norms in _LAYERS.items()}


def is_decoder_layer(module: nn.Module) -> bool:
    """What fuse_residual=True must either fuse or refuse: a Hugging Face decoder layer by name
    (any class in its MRO), which is how transformers names every one of them."""
    return any(c.__name__.endswith("DecoderLayer") for c in type(module).__mro__)


def fused_class(cls: type) -> type:
    """The subclass of decoder-layer class ``cls`` whose forward fuses the residual adds;
    raises UnknownLayer when cls's forward is not a known one."""
    if "_fusednorm_unfused" in vars(cls):
        return cls
    return _fused_class(cls)


def norms_fused(cls: type) -> tuple[str, ...]:
    """The names of the norm submodules that the fused forward of ``cls`` calls with a
    residual."""
    return _parse(cls)[1]


@functools.cache
def _parse(cls: type) -> tuple[ast.FunctionDef, tuple[str, ...], object]:
    from fusednorm.patch import _fingerprint

    raw = inspect.unwrap(cls.forward)  # through transformers' gradient-checkpointing wrapper
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(raw)))
    except (OSError, TypeError, SyntaxError) as e:
        raise UnknownLayer("its forward's source is not available") from e
    fn = tree.body[0]
    norms = _known().get(_fingerprint([fn])) if isinstance(fn, ast.FunctionDef) else None
    if norms is None:
        raise UnknownLayer(f"its forward ({raw.__qualname__}) is not a decoder layer "
                           "fusednorm knows")
    # _fingerprint stripped the type hints in place: parse again for the code to compile
    fn = ast.parse(textwrap.dedent(inspect.getsource(raw))).body[0]
    return fn, norms, raw


@functools.cache
def _fused_class(cls: type) -> type:
    fn, norms, raw = _parse(cls)
    fn = _rewrite(fn, norms)
    module = ast.fix_missing_locations(ast.Module(body=[fn], type_ignores=[]))
    code = compile(module, f"<fusednorm: {raw.__qualname__} with the residual add fused>",
                   "exec")
    namespace: dict = {}
    # the installed transformers' own code, rewritten above; run in the original's module (its
    # names and decorators), it only defines the function
    exec(code, raw.__globals__, namespace)  # noqa: S102
    return type(cls.__name__, (cls,), {
        "forward": namespace["forward"], "_fusednorm_unfused": cls,
        "__module__": cls.__module__, "__qualname__": cls.__qualname__})


def _rewrite(fn: ast.FunctionDef, norms: tuple[str, ...]) -> ast.FunctionDef:
    """``A = R + E; R = A; A = self.norm(A)`` -> ``A, R = self.norm(E, residual=R)``, for each
    norm in ``norms`` (each must be found exactly once)."""
    body, found, i = [], [], 0
    stmts = fn.body
    while i < len(stmts):
        match = _match(stmts[i:i + 3])
        if match is not None and match[0] in norms:
            norm, a, r, e = match
            call = ast.Call(
                func=ast.Attribute(value=ast.Name("self", ast.Load()), attr=norm, ctx=ast.Load()),
                args=[e], keywords=[ast.keyword(arg="residual", value=ast.Name(r, ast.Load()))])
            target = ast.Tuple([ast.Name(a, ast.Store()), ast.Name(r, ast.Store())], ast.Store())
            body.append(ast.copy_location(ast.Assign(targets=[target], value=call), stmts[i]))
            found.append(norm)
            i += 3
        else:
            body.append(stmts[i])
            i += 1
    if sorted(found) != sorted(norms):  # the table and the rewrite disagree: a bug here
        raise AssertionError(f"fusednorm: fused {found} in {fn.name}, expected {norms}")
    fn.body = body
    return fn


def _match(stmts: list[ast.stmt]) -> tuple[str, str, str, ast.expr] | None:
    """(norm, A, R, E) when stmts are ``A = R + E; R = A; A = self.norm(A)``."""
    if len(stmts) != 3 or not all(isinstance(s, ast.Assign) and len(s.targets) == 1
                                  and isinstance(s.targets[0], ast.Name) for s in stmts):
        return None
    add, keep, norm = stmts
    a, r = add.targets[0].id, keep.targets[0].id
    if not (isinstance(add.value, ast.BinOp) and isinstance(add.value.op, ast.Add)
            and _is_name(add.value.left, r) and keep.targets[0].id == r
            and _is_name(keep.value, a) and norm.targets[0].id == a):
        return None
    call = norm.value
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
            and _is_name(call.func.value, "self") and len(call.args) == 1
            and _is_name(call.args[0], a) and not call.keywords):
        return None
    return call.func.attr, a, r, add.value.right


def _is_name(node: ast.expr, name: str) -> bool:
    return isinstance(node, ast.Name) and node.id == name
