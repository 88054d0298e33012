// GroupNorm's autograd node in C++, for a module's kept plan (group_norms.py, `_GroupPlan.native`).
//
// Why: the Python autograd Function costs ~15-30 µs a call more than torch's C++ node, forward
// and backward, and inside a model (cold caches) several times that: ~1.5% of a diffusion
// model's float32 training step (benchmarks/results/cpu/cpp_node_prototype). This node runs
// the same numba kernels (called by address, exactly as cpu/group_norm.py and cpu/_channels.py
// launch them) with torch's C++ custom Function, so neither pass enters Python.
//
// The plan's descriptor (`GroupNormPlan.native_descriptor`) is bytes: the int64 fields of
// `Desc`, then the forward's and the backward's fixed block parts (`Layout.fixed`). A block is
// the per-call addresses (the Layout's order) followed by the fixed part.

#include <torch/extension.h>

#include <cstring>
#include <string>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using KernelFn = void (*)(const int64_t*);
using ParallelFn = void (*)(void (*)(void*), void*, unsigned, unsigned);

ParallelFn parallel = nullptr;  // GOMP_parallel of torch's OpenMP runtime (none: serial only)
// Python: first-order gradients, differentiable again (never freed: a static py::object would be
// released after the interpreter)
py::object* double_backward = nullptr;

struct Desc {
  int64_t fwd, bwd;        // kernel addresses
  int64_t threads, cap;    // the thread count the fixed parts were made for (any other runs them
                           // too: it only picks how the work is split); the plan's cap
  int64_t n, c, groups;    // x as (N, C, S)
  int64_t var_at;          // bytes from the means to the variances in stats
  int64_t stats_dtype;     // 0: float32, 1: float64
  int64_t fshared, flocal, bshared, blocal;  // scratch bytes (shared, per thread)
  int64_t channels_last;   // the forward's block takes scratch (channels last) or not
  int64_t silu;            // (for the double backward)
  int64_t ftail, btail;    // lengths in bytes of the fixed parts that follow
  double eps;
};
constexpr int64_t kMaxBlock = 64;  // int64 slots: the largest block is ~25

const Desc& desc_of(const std::string& bytes) {
  TORCH_CHECK(bytes.size() >= sizeof(Desc), "fusednorm: bad GroupNorm descriptor");
  return *reinterpret_cast<const Desc*>(bytes.data());
}

int64_t threads_now(const Desc& d) {
  return d.cap == 1 ? 1 : std::min<int64_t>(d.cap, at::get_num_threads());
}

void launch(int64_t fn, int64_t threads, const int64_t* block) {
  if (threads == 1 || parallel == nullptr) {
    reinterpret_cast<KernelFn>(fn)(block);
  } else {
    parallel(reinterpret_cast<void (*)(void*)>(fn), const_cast<int64_t*>(block),
             static_cast<unsigned>(threads), 0);
  }
}

// This thread's scratch, reused by its next call (the kernels never allocate).
int64_t scratch(int64_t nbytes) {
  static thread_local at::Tensor buf;
  if (!buf.defined() || buf.numel() < nbytes) {
    buf = at::empty({std::max<int64_t>(nbytes, 4096)}, at::kByte);
  }
  return reinterpret_cast<int64_t>(buf.data_ptr());
}

int64_t addr(const at::Tensor& t) { return reinterpret_cast<int64_t>(t.data_ptr()); }

void run(const std::string& bytes, int64_t fn, const int64_t* head, int64_t head_len,
         int64_t tail_at, int64_t tail_len, int64_t threads) {
  int64_t block[kMaxBlock];
  TORCH_CHECK(head_len * 8 + tail_len <= kMaxBlock * 8, "fusednorm: block too long");
  std::memcpy(block, head, head_len * 8);
  std::memcpy(block + head_len, bytes.data() + tail_at, tail_len);
  launch(fn, threads, block);
}

struct GroupNormNode : public torch::autograd::Function<GroupNormNode> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& bias, const std::string& bytes) {
    const Desc& d = desc_of(bytes);
    const int64_t threads = threads_now(d);
    auto y = at::empty_like(x);
    auto stats = at::empty({2, d.n, d.groups},
                           x.options().dtype(d.stats_dtype ? at::kDouble : at::kFloat));
    const int64_t mean = addr(stats);
    const int64_t s0 = d.channels_last ? scratch(d.fshared + threads * d.flocal) : 0;
    const int64_t head[8] = {addr(x), addr(weight), addr(bias), addr(y), mean, mean + d.var_at,
                             s0, s0 + d.fshared};
    run(bytes, d.fwd, head, d.channels_last ? 8 : 6, sizeof(Desc), d.ftail, threads);
    ctx->save_for_backward({x, weight, bias, stats});
    ctx->saved_data["desc"] = bytes;
    ctx->set_materialize_grads(false);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) {
      return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    }
    const std::string bytes = ctx->saved_data["desc"].toStringRef();
    const Desc& d = desc_of(bytes);
    auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &bias = saved[2], &stats = saved[3];
    at::Tensor dy = grads[0];
    if (at::GradMode::is_enabled()) {  // create_graph: torch's ops, differentiable again
      py::gil_scoped_acquire gil;
      py::tuple got = (*double_backward)(x, weight, bias, dy, d.groups, d.eps, bool(d.silu));
      variable_list out(4);
      for (int i = 0; i < 3; ++i) {
        if (ctx->needs_input_grad(i) && !got[i].is_none()) out[i] = got[i].cast<at::Tensor>();
      }
      return out;
    }
    if (dy.strides() != x.strides() || dy.scalar_type() != x.scalar_type()) {
      dy = at::empty_like(x).copy_(dy);  // into x's layout and dtype
    }
    const int64_t threads = threads_now(d);
    auto dx = at::empty_like(x);
    auto dw = at::empty_like(weight);
    auto db = at::empty_like(bias);
    const int64_t mean = addr(stats);
    const int64_t s0 = scratch(d.bshared + threads * d.blocal);
    const int64_t head[11] = {addr(dy), addr(x), addr(weight), addr(bias), mean, mean + d.var_at,
                              addr(dx), addr(dw), addr(db), s0, s0 + d.bshared};
    run(bytes, d.bwd, head, 11, sizeof(Desc) + d.ftail, d.btail, threads);
    return {ctx->needs_input_grad(0) ? dx : at::Tensor(),
            ctx->needs_input_grad(1) ? dw : at::Tensor(),
            ctx->needs_input_grad(2) ? db : at::Tensor(), at::Tensor()};
  }
};

// (the descriptor first: the plan binds it with functools.partial)
at::Tensor group_norm(const std::string& bytes, const at::Tensor& x, const at::Tensor& weight,
                      const at::Tensor& bias) {
  return GroupNormNode::apply(x, weight, bias, bytes);
}

void set_runtime(int64_t parallel_address, py::object double_backward_fn) {
  parallel = reinterpret_cast<ParallelFn>(parallel_address);
  double_backward = new py::object(std::move(double_backward_fn));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("group_norm", &group_norm, "GroupNorm on a kept plan, with a C++ autograd node");
  m.def("set_runtime", &set_runtime);
  m.attr("DESC_BYTES") = py::int_(sizeof(Desc));
}
