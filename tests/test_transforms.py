"""fusednorm under torch.func's transforms and forward-mode AD, every family.

Each transform of each public functional is compared with the same transform of torch's op on
the same float64 inputs, and both with the float64 reference transformed alike (the reference
is plain tensor arithmetic, so every transform applies to it); options torch lacks (residual,
zero-centred weight, out_dtype, memory_efficient) are compared with the reference alone. Under
vmap the kernels run once for the whole batch (`test_vmap_is_one_kernel_launch`).
"""

import functools

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.func as tf
import torch.nn.functional as F
from helpers import assert_close_to_ref, backend_params, row_kernel_inputs

import fusednorm
from fusednorm import reference as R

D = torch.float64
B = 3  # the vmapped batch


def _rand(*shape):
    return torch.randn(*shape, dtype=D)


# (ours, torch's, reference) of (x, weight, bias), and the per-sample shapes of x and weight
RUNNING = (torch.randn(6, dtype=D), torch.rand(6, dtype=D) + 0.5)
FAMILIES = {
    "layer_norm": (
        lambda x, w, b: fusednorm.layer_norm(x, (8,), w, b),
        lambda x, w, b: F.layer_norm(x, (8,), w, b),
        lambda x, w, b: R.layer_norm_ref(x, (8,), w, b),
        (5, 8), (8,)),
    "layer_norm_2d": (
        lambda x, w, b: fusednorm.layer_norm(x, (3, 4), w, b),
        lambda x, w, b: F.layer_norm(x, (3, 4), w, b),
        lambda x, w, b: R.layer_norm_ref(x, (3, 4), w, b),
        (2, 3, 4), (3, 4)),
    "rms_norm": (
        lambda x, w, b: fusednorm.rms_norm(x, (8,), w, 1e-6) + b,
        lambda x, w, b: F.rms_norm(x, (8,), w, 1e-6) + b,
        lambda x, w, b: R.rms_norm_ref(x, (8,), w, 1e-6) + b,
        (5, 8), (8,)),
    "group_norm": (
        lambda x, w, b: fusednorm.group_norm(x, 3, w, b),
        lambda x, w, b: F.group_norm(x, 3, w, b),
        lambda x, w, b: R.group_norm_ref(x, 3, w, b),
        (2, 6, 3, 2), (6,)),
    "group_norm_silu": (
        lambda x, w, b: fusednorm.group_norm(x, 3, w, b, activation="silu"),
        lambda x, w, b: F.silu(F.group_norm(x, 3, w, b)),
        lambda x, w, b: R.group_norm_ref(x, 3, w, b, activation="silu"),
        (2, 6, 3, 2), (6,)),
    "instance_norm": (
        lambda x, w, b: fusednorm.instance_norm(x, weight=w, bias=b),
        lambda x, w, b: F.instance_norm(x, weight=w, bias=b),
        lambda x, w, b: R.instance_norm_ref(x, weight=w, bias=b)[0],
        (2, 6, 5), (6,)),
    "batch_norm_train": (
        lambda x, w, b: fusednorm.batch_norm(x, None, None, w, b, True),
        lambda x, w, b: F.batch_norm(x, None, None, w, b, True),
        lambda x, w, b: R.batch_norm_ref(x, None, None, w, b, True)[0],
        (4, 6, 3), (6,)),
    "batch_norm_eval": (
        lambda x, w, b: fusednorm.batch_norm(x, *RUNNING, w, b, False),
        lambda x, w, b: F.batch_norm(x, *RUNNING, w, b, False),
        lambda x, w, b: R.batch_norm_ref(x, *RUNNING, w, b, False)[0],
        (4, 6, 3), (6,)),
}


def _loss(fn, cotangent):
    """A scalar whose gradient reaches every input, and whose second derivative is not 0."""
    return lambda x, w, b: (fn(x, w, b).sin() * cotangent).sum()


def _inputs(x_shape, w_shape):
    return _rand(*x_shape), _rand(*w_shape), _rand(*w_shape)


# transform name -> (fn, inputs) -> outputs; inputs are (x, weight, bias) of one sample
TRANSFORMS = {
    "vmap_x": lambda fn, x, w, b: tf.vmap(fn, in_dims=(0, None, None))(
        torch.stack([x, 2 * x + 1, -x]), w, b),
    "vmap_params": lambda fn, x, w, b: tf.vmap(fn, in_dims=(None, 0, 0))(
        x, torch.stack([w, -w, 2 * w]), torch.stack([b, b + 1, -b])),
    "vmap_all": lambda fn, x, w, b: tf.vmap(fn)(
        torch.stack([x, -x, x + 1]), torch.stack([w, -w, 2 * w]), torch.stack([b, b, -b])),
    "nested_vmap": lambda fn, x, w, b: tf.vmap(tf.vmap(fn, in_dims=(0, None, None)),
                                               in_dims=(0, None, None))(
        torch.stack([torch.stack([x, -x]), torch.stack([x + 1, 2 * x])]), w, b),
    "grad": lambda fn, x, w, b: tf.grad(_loss(fn, torch.cos(x)), argnums=(0, 1, 2))(x, w, b),
    "vmap_grad": lambda fn, x, w, b: tf.vmap(
        tf.grad(_loss(fn, torch.cos(x)), argnums=(0, 1, 2)), in_dims=(0, None, None))(
        torch.stack([x, -x, x + 1]), w, b),
    "jvp": lambda fn, x, w, b: tf.jvp(fn, (x, w, b), (x.cos(), w.sin(), b.cos())),
    "vmap_jvp": lambda fn, x, w, b: tf.vmap(
        lambda t: tf.jvp(fn, (x, w, b), (t, w.sin(), b.cos()))[1])(
        torch.stack([x.cos(), x.sin(), x])),
    "jacrev": lambda fn, x, w, b: tf.jacrev(fn, argnums=(0, 1, 2))(x, w, b),
    "jacfwd": lambda fn, x, w, b: tf.jacfwd(fn, argnums=(0, 1, 2))(x, w, b),
    "hessian": lambda fn, x, w, b: tf.hessian(_loss(fn, torch.cos(x)), argnums=(0, 1))(x, w, b),
    "jacrev_jacrev": lambda fn, x, w, b: tf.jacrev(tf.jacrev(_loss(fn, torch.cos(x))))(x, w, b),
    "jacfwd_jacfwd": lambda fn, x, w, b: tf.jacfwd(tf.jacfwd(_loss(fn, torch.cos(x)),
                                                             argnums=(0, 1)))(x, w, b),
    "forward_ad": lambda fn, x, w, b: _forward_ad(fn, x, w, b),
}


def _forward_ad(fn, x, w, b):
    with fwAD.dual_level():
        duals = [fwAD.make_dual(t, t.cos()) for t in (x, w, b)]
        return fwAD.unpack_dual(fn(*duals)).tangent


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _flat(o)]


def _compare(ours, theirs, ref, what):
    for i, (o, t, r) in enumerate(zip(_flat(ours), _flat(theirs), _flat(ref), strict=True)):
        assert_close_to_ref(o, t, r, dtype=D, what=f"{what}[{i}]")


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_transform_matches_torch(family, transform):
    ours, theirs, ref, x_shape, w_shape = FAMILIES[family]
    if transform in ("hessian", "jacrev_jacrev", "jacfwd_jacfwd") and family.startswith(
            "layer_norm_2d"):
        pytest.skip("the 1-D family covers second order")
    x, w, b = _inputs(x_shape, w_shape)
    apply = TRANSFORMS[transform]
    _compare(apply(ours, x, w, b), apply(theirs, x, w, b), apply(ref, x, w, b),
             f"{family} {transform}")


# --- options torch lacks: compared with the reference ----------------------------------------


def _fused(x, w, b, r, *, zero_centered=False, out_dtype=None, memory_efficient=False,
           is_rms=False):
    norm = fusednorm.rms_norm if is_rms else fusednorm.layer_norm
    params = (w,) if is_rms else (w, b)
    y, h = norm(x, (8,), *params, 1e-5, residual=r, zero_centered_weight=zero_centered,
                out_dtype=out_dtype, memory_efficient=memory_efficient)
    return y + h.square()  # both outputs reach the result


def _fused_ref(x, w, b, r, *, zero_centered=False, out_dtype=None, memory_efficient=False,
               is_rms=False):
    h = r + x
    if is_rms:
        y = R.rms_norm_ref(h, (8,), w, 1e-5, zero_centered=zero_centered)
    else:
        y = R.layer_norm_ref(h, (8,), w, b, 1e-5, zero_centered=zero_centered)
    return y + h.square()


OPTIONS = {
    "residual": {},
    "residual_rms": {"is_rms": True},
    "zero_centered": {"zero_centered": True},
    "out_dtype": {"out_dtype": torch.float64},
    "memory_efficient": {"memory_efficient": True},
}
FIRST_ORDER = ("vmap_x", "vmap_params", "vmap_all", "grad", "vmap_grad", "jvp", "jacrev",
               "jacfwd", "forward_ad")


@pytest.mark.parametrize("transform", FIRST_ORDER + ("hessian",))
@pytest.mark.parametrize("option", list(OPTIONS))
def test_fused_options_match_the_reference(option, transform):
    if option == "memory_efficient" and transform == "hessian":
        pytest.skip("memory_efficient has no second derivatives (a test below checks the error)")
    kwargs = OPTIONS[option]
    x, w, b = _inputs((4, 8), (8,))
    r = _rand(4, 8)
    ours = functools.partial(lambda x, w, b: _fused(x, w, b, r, **kwargs))
    ref = functools.partial(lambda x, w, b: _fused_ref(x, w, b, r, **kwargs))
    apply = TRANSFORMS[transform]
    expected = apply(ref, x, w, b)
    _compare(apply(ours, x, w, b), expected, expected, f"{option} {transform}")


def test_memory_efficient_refuses_second_derivatives():
    x, w, b = _inputs((4, 8), (8,))
    fn = lambda x: fusednorm.layer_norm(x, (8,), w, b, memory_efficient=True).sin().sum()
    with pytest.raises(RuntimeError, match="memory_efficient"):
        tf.hessian(fn)(x)


# --- dropout: torch's randomness rules under vmap; the mask is the one the kernels draw ---------


def _dropout(x, r):
    return fusednorm.layer_norm(x, (8,), residual=r, dropout_p=0.5)


def test_vmap_dropout_follows_torch_randomness_rules():
    x, r = _rand(B, 4, 8), _rand(B, 4, 8)
    with pytest.raises(RuntimeError) as ours:
        tf.vmap(_dropout)(x, r)
    with pytest.raises(RuntimeError) as theirs:
        tf.vmap(lambda x: F.dropout(x, 0.5))(x)
    assert str(ours.value) == str(theirs.value)
    # "same": every sample gets one mask; "different": masks of their own
    xs = x[0].expand(B, 4, 8)
    _, h = tf.vmap(_dropout, randomness="same")(xs, torch.zeros_like(xs))
    assert all(torch.equal(h[i] != 0, h[0] != 0) for i in range(B))
    _, h = tf.vmap(_dropout, randomness="different")(xs, torch.zeros_like(xs))
    assert not all(torch.equal(h[i] != 0, h[0] != 0) for i in range(B))


@pytest.mark.parametrize("randomness", ["same", "different"])
def test_vmap_grad_dropout_uses_the_forward_mask(randomness):
    """Per-sample gradients through dropout: dx = dh·keep/(1 − p) with the very mask of the
    forward (read off h = dropout(x) with a zero residual), and the norm's gradient as torch's
    layer_norm gives it for that h."""
    x = _rand(B, 4, 8)

    def loss(x):
        y, h = _dropout(x, torch.zeros_like(x))
        return (y.sin().sum() + h.square().sum()), h

    grads, h = tf.vmap(tf.grad(loss, has_aux=True), randomness=randomness)(x)
    keep = h != 0
    for i in range(B):
        hi = h[i].detach().requires_grad_()
        expected_dh, = torch.autograd.grad(
            F.layer_norm(hi, (8,)).sin().sum() + hi.square().sum(), hi)
        torch.testing.assert_close(grads[i], expected_dh * keep[i] / 0.5)


def test_grad_dropout_is_eager_autograd_for_the_same_seed():
    x, r = _rand(4, 8), _rand(4, 8)

    def loss(x):
        y, h = _dropout(x, r)
        return y.sin().sum() + h.square().sum()

    torch.manual_seed(7)
    got = tf.grad(loss)(x)
    torch.manual_seed(7)
    xe = x.clone().requires_grad_()
    loss(xe).backward()
    torch.testing.assert_close(got, xe.grad, rtol=0, atol=0)


# --- modules: functional_call, per-sample gradients, BatchNorm's rules under vmap ---------------


MODULES = {
    "LayerNorm": (lambda: fusednorm.LayerNorm(8), lambda: torch.nn.LayerNorm(8), (4, 8)),
    "RMSNorm": (lambda: fusednorm.RMSNorm(8), lambda: torch.nn.RMSNorm(8), (4, 8)),
    "GroupNorm": (lambda: fusednorm.GroupNorm(2, 6), lambda: torch.nn.GroupNorm(2, 6),
                  (2, 6, 5)),
    "InstanceNorm1d": (lambda: fusednorm.InstanceNorm1d(6, affine=True),
                       lambda: torch.nn.InstanceNorm1d(6, affine=True), (2, 6, 5)),
    "BatchNorm1d_eval": (lambda: fusednorm.BatchNorm1d(6).eval(),
                         lambda: torch.nn.BatchNorm1d(6).eval(), (4, 6, 5)),
}


def _randomized(module):
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5)
    return module.double()


@pytest.mark.parametrize("name", list(MODULES))
def test_per_sample_gradients_with_functional_call(name):
    """Opacus's fallback for layers it does not know: vmap(grad(functional_call))."""
    make_ours, make_torch, shape = MODULES[name]
    torch.manual_seed(1)
    ours = _randomized(make_ours())
    torch.manual_seed(1)
    theirs = _randomized(make_torch())
    x = _rand(B, *shape)

    def per_sample(module):
        params = {k: v.detach() for k, v in module.named_parameters()}
        buffers = dict(module.named_buffers())

        def loss(p, xi):
            return tf.functional_call(module, (p, buffers), (xi,)).sin().sum()

        return tf.vmap(tf.grad(loss), in_dims=(None, 0))(params, x)

    got, expected = per_sample(ours), per_sample(theirs)
    assert got.keys() == expected.keys()
    for k in got:
        torch.testing.assert_close(got[k], expected[k], msg=k)


def _train_batch_norm(module_class):
    torch.manual_seed(2)
    return _randomized(module_class(6)).train()


def test_vmap_over_training_batch_norm_raises_what_torch_raises():
    x = _rand(B, 4, 6, 5)
    with pytest.raises(Exception) as theirs:
        tf.vmap(_train_batch_norm(torch.nn.BatchNorm1d))(x)
    with pytest.raises(type(theirs.value)) as ours:
        tf.vmap(_train_batch_norm(fusednorm.BatchNorm1d))(x)
    assert str(ours.value) == str(theirs.value)


def test_replace_all_batch_norm_modules_then_vmap_matches_torch():
    x = _rand(B, 4, 6, 5)
    ours = torch.nn.Sequential(_train_batch_norm(fusednorm.BatchNorm1d))
    theirs = torch.nn.Sequential(_train_batch_norm(torch.nn.BatchNorm1d))
    tf.replace_all_batch_norm_modules_(ours)
    tf.replace_all_batch_norm_modules_(theirs)
    assert isinstance(ours[0], fusednorm.BatchNorm1d) and ours[0].running_mean is None
    torch.testing.assert_close(tf.vmap(ours)(x), tf.vmap(theirs)(x))
    grads = [tf.vmap(tf.grad(lambda xi, m=m: m(xi).sin().sum()))(x) for m in (ours, theirs)]
    torch.testing.assert_close(*grads)


def test_instance_norm_with_running_stats_under_vmap_is_torchs():
    x = _rand(B, 2, 6, 5)
    results = []
    for cls in (fusednorm.InstanceNorm1d, torch.nn.InstanceNorm1d):
        module = cls(6, track_running_stats=True).double()
        try:
            results.append(("ok", tf.vmap(module)(x), module.running_mean.clone()))
        except Exception as e:  # noqa: BLE001 - torch's rule for the in-place update
            results.append((type(e), str(e)))
    assert results[0][0] == results[1][0]
    if results[0][0] == "ok":
        torch.testing.assert_close(results[0][1:], results[1][1:])
    else:
        assert results[0] == results[1]


# --- what runs under vmap: the kernels, once -------------------------------------------------


@pytest.mark.parametrize("params_batched", [False, True])
def test_vmap_is_one_kernel_launch(params_batched):
    """A vmapped row norm is one launch over all the batch's rows, per-sample weights too."""
    x, w, b = _rand(B, 5, 8), _rand(B, 8), _rand(B, 8)
    if not params_batched:
        w, b = w[0], b[0]
    dims = (0, 0, 0) if params_batched else (0, None, None)
    with row_kernel_inputs("cpu") as seen:
        tf.vmap(lambda x, w, b: fusednorm.layer_norm(x, (8,), w, b), in_dims=dims)(x, w, b)
    assert [shape for shape, _, _ in seen] == [(B * 5, 8)]


def test_vmapped_group_norm_is_one_launch():
    from fusednorm.cpu import group_norm

    calls = []
    original = group_norm.group_norm_fwd

    def counting(x, *args):
        calls.append(tuple(x.shape))
        return original(x, *args)

    group_norm.group_norm_fwd = counting
    try:
        x = _rand(B, 2, 6, 4)
        tf.vmap(lambda x: fusednorm.group_norm(x, 3))(x)
    finally:
        group_norm.group_norm_fwd = original
    assert calls == [(B * 2, 6, 4)]


# --- every backend: the rules run each backend's kernels through the ops ----------------------


@pytest.mark.parametrize("transform", ["vmap_all", "vmap_grad", "jvp"])
@pytest.mark.parametrize("family", ["layer_norm", "group_norm_silu", "batch_norm_train"])
@pytest.mark.parametrize("backend", backend_params())
def test_transforms_on_each_backend(backend, family, transform):
    ours, theirs, ref, x_shape, w_shape = FAMILIES[family]
    x, w, b = _inputs(x_shape, w_shape)
    apply = TRANSFORMS[transform]
    with fusednorm.use_backend(backend):
        got = apply(ours, x, w, b)
    _compare(got, apply(theirs, x, w, b), apply(ref, x, w, b), f"{family} {transform}")
