"""An experiment, not part of the library: a module's kept GroupNorm plan (channels first
or last, float32, parameters as they are) run through a C++ autograd Function (torch's C++ custom
Function API, built with torch.utils.cpp_extension.load_inline: ~35 s here, a compiler needed)
that calls the same numba kernels by address, so that neither the forward nor the backward node
runs Python. Other plans keep the Python node. check.py: the same bits, and the per-call time;
steps.py: the float32 training steps of bench --models. Run from the repository root with
PYTHONPATH=src."""
import os, ctypes, torch
from torch.utils.cpp_extension import load_inline
SRC = r'''
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <unordered_map>
#include <cstring>
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
typedef void (*kern_t)(const int64_t*);
typedef void (*gomp_t)(void (*)(void*), void*, unsigned, unsigned);
static gomp_t gomp = nullptr;
struct Plan { int64_t fwd, bwd, threads, n, c, g, fshared, flocal, bshared, blocal, cl; std::string ftail, btail; };
static std::unordered_map<int64_t, Plan> plans;
void set_gomp(int64_t addr) { gomp = (gomp_t)addr; }
void add_plan(int64_t key, int64_t fwd, int64_t bwd, int64_t threads, int64_t n, int64_t c,
              int64_t g, int64_t fshared, int64_t flocal, int64_t bshared, int64_t blocal,
              int64_t cl, std::string ftail, std::string btail) {
  plans[key] = Plan{fwd, bwd, threads, n, c, g, fshared, flocal, bshared, blocal, cl, ftail, btail};
}
static void launch(int64_t fn, const Plan& p, const int64_t* block) {
  if (p.threads == 1) ((kern_t)fn)(block);
  else gomp((void (*)(void*))fn, (void*)block, (unsigned)p.threads, 0);
}
static int64_t scratch_at(int64_t need) {
  static thread_local at::Tensor scratch;
  if (!scratch.defined() || scratch.numel() < need) scratch = at::empty({std::max<int64_t>(need, 4096)}, at::kByte);
  return (int64_t)scratch.data_ptr();
}
struct GN : public torch::autograd::Function<GN> {
  static at::Tensor forward(AutogradContext* ctx, at::Tensor x, at::Tensor w, at::Tensor b, int64_t key) {
    const Plan& p = plans.at(key);
    auto y = at::empty_like(x);
    auto stats = at::empty({2, p.n, p.g}, x.options().dtype(at::kFloat));
    int64_t blk[32];
    int64_t mean = (int64_t)stats.data_ptr();
    int64_t s0 = p.cl ? scratch_at(p.fshared + p.threads * p.flocal) : 0;
    int64_t head[8] = {(int64_t)x.data_ptr(), (int64_t)w.data_ptr(), (int64_t)b.data_ptr(),
                       (int64_t)y.data_ptr(), mean, mean + p.n * p.g * 4, s0, s0 + p.fshared};
    int64_t h = p.cl ? 8 : 6;
    std::memcpy(blk, head, h * 8);
    std::memcpy(blk + h, p.ftail.data(), p.ftail.size());
    launch(p.fwd, p, blk);
    ctx->save_for_backward({x, w, b, stats});
    ctx->saved_data["key"] = key;
    return y;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const Plan& p = plans.at(ctx->saved_data["key"].toInt());
    auto x = saved[0], w = saved[1], b = saved[2], stats = saved[3];
    auto dy = grads[0];
    if (dy.strides() != x.strides()) dy = at::empty_like(x).copy_(dy);  // into x's layout
    auto dx = at::empty_like(x);
    auto dw = at::empty_like(w), db = at::empty_like(b);
    int64_t s0 = scratch_at(p.bshared + p.threads * p.blocal);
    int64_t mean = (int64_t)stats.data_ptr();
    int64_t blk[40];
    int64_t head[11] = {(int64_t)dy.data_ptr(), (int64_t)x.data_ptr(), (int64_t)w.data_ptr(),
                        (int64_t)b.data_ptr(), mean, mean + p.n * p.g * 4, (int64_t)dx.data_ptr(),
                        (int64_t)dw.data_ptr(), (int64_t)db.data_ptr(), s0, s0 + p.bshared};
    std::memcpy(blk, head, sizeof head);
    std::memcpy(blk + 11, p.btail.data(), p.btail.size());
    launch(p.bwd, p, blk);
    return {dx, dw, db, at::Tensor()};
  }
};
at::Tensor gn(at::Tensor x, at::Tensor w, at::Tensor b, int64_t key) { return GN::apply(x, w, b, key); }
'''
ext = load_inline("fusednorm_gn_proto", cpp_sources=SRC,
                  functions=["set_gomp", "add_plan", "gn"], extra_cflags=["-O2"], verbose=False)

from fusednorm.cpu import _launch
from fusednorm.cpu._channels import _CL_BWD
from fusednorm.cpu.group_norm import _CF_BWD
ext.set_gomp(ctypes.cast(_launch._runtime().openmp.parallel, ctypes.c_void_p).value)


def register(kplan):
    """kplan: a cpu GroupNormPlan (float32); the thread count as torch's now."""
    n, c, _ = kplan.shape
    key = id(kplan)
    if not kplan.cl:
        threads = 1 if kplan.cap == 1 else min(kplan.cap, torch.get_num_threads())
        ext.add_plan(key, kplan._fwd.address, _CF_BWD[kplan.key].address, threads, n, c,
                     kplan.groups, 0, 0, kplan.scratch.shared, kplan.scratch.local, 0,
                     kplan.tail, kplan.tail)
        return key
    cp = kplan._cl
    threads = 1 if cp.cap == 1 else min(cp.cap, torch.get_num_threads())
    need_f, tail_f = cp._tail(False, threads, True)
    need_b, tail_b = cp._tail(True, threads, True)
    ext.add_plan(key, cp._fwd.address, _CL_BWD[cp.key].address, threads, n, c, kplan.groups,
                 need_f.shared, need_f.local, need_b.shared, need_b.local, 1, tail_f, tail_b)
    return key


def install():
    """Route every module's kept plan (float32, parameters as they are) through the C++ node."""
    from fusednorm import group_norms as G
    keys = {}
    orig = G._group_norm_fast_c
    def fast(x, w, b, plan):
        k = plan.kernels
        key = keys.get(id(k))
        if key is None:
            key = keys[id(k)] = register(k) if (plan.direct and x.dtype == torch.float32) else 0
        if not key:
            return orig(x, w, b, plan)
        return ext.gn(x, w, b, key)
    G._group_norm_fast_c = fast
