// The hand-written training steps of bench_core/manual.py, in C++: the same ATen operators in the
// same order and layouts, so losses and gradients are bit for bit the Python ones (and autograd's);
// what goes is the Python interpreter between the operators (about 95 calls in a split step).
// One exception, split batching's first layer: its weight's and r's gradients come from one
// written-out kernel (first_layer_grads) instead of two products, the same sums in another order.
// Built and loaded by bench_core/native.py; the operators are torch.ops.bench_core.*.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;

// ---- Split batching's first layer: W's and r's gradients in one pass ----------------------------
//
// Member m's rows of the batch, x_m [b, in], meet the shared weight W [in, out] scaled by r_m [in]:
// z_m = (x_m ∘ r_m) W, then z_m ∘ s_m. With G_m = x_mᵀ dz_m [in, out] (dz_m: d loss / d z_m),
//   dW = Σ_m r_m ∘ G_m (each row i scaled by r_m[i]),   dr_m[i] = Σ_j W[i, j] G_m[i, j].
// Autograd computes the same as (x ∘ r)ᵀ dz and, through x ∘ r's gradient dz Wᵀ [B, in], as
// Σ_b (dz Wᵀ ∘ x): two products of B·in·out multiply-adds each. Here there is one, done in tiles
// of 6 rows of W by 64 columns that stay in registers and are reduced into dW and dr at once, so
// G_m is never stored: the first layer's backward reads x, dz and W once each. The sums are the
// same ones in another order (float32 roundings differ from autograd's by about 1e-7 relative).

typedef float f32x16 __attribute__((vector_size(64)));
typedef float f32x16_unaligned __attribute__((vector_size(64), aligned(4)));
inline f32x16 load16(const float* p) { return *reinterpret_cast<const f32x16_unaligned*>(p); }
inline void store16(float* p, f32x16 v) { *reinterpret_cast<f32x16_unaligned*>(p) = v; }

constexpr int64_t kTileRows = 6, kTileVectors = 4, kTileCols = 16 * kTileVectors, kPanel = 4 * kTileRows;

// On x86-64 Linux the tile is compiled for AVX-512 and for the baseline, and the loader picks the one
// this CPU runs (a library built on one machine may be loaded on another).
#if defined(__x86_64__) && defined(__linux__) && (defined(__clang__) ? __clang_major__ >= 14 : __GNUC__ >= 11)
#define BENCH_X86_CLONES 1
#define BENCH_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "default")))
#else
#define BENCH_X86_CLONES 0
#define BENCH_CPU_CLONES
#endif

// Whether training uses the kernel on this CPU: only where it runs its AVX-512 build. A tile is 24
// 16-float vectors, one AVX-512 register each; built for narrower registers they spill, and the
// kernel took 15 ms built for AVX2 and 12 ms for the x86-64 baseline on this project's machine,
// against 1.7 ms for the two products it replaces (0.62 ms with AVX-512). Elsewhere (other x86-64
// CPUs, other architectures) training keeps the products; first_layer_grads still computes, slowly.
bool first_layer_fast() {
#if BENCH_X86_CLONES
  static const bool fast = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vl");
  }();
  return fast;
#else
  return false;
#endif
}

struct FirstLayer {
  const float* x;       // [E * b, in]
  const float* grad_z;  // [E * b, out_pad], columns from out on zero
  const float* weight;  // [in, out]
  const float* r;       // [E, in]
  float* grad_w;        // [in, out]
  float* grad_r;        // [E, in]
  int64_t n_members, rows, n_in, n_out, out_pad;
};

// Member m's G_m on rows [i0, i0 + n_rows) (n_rows <= kTileRows) by columns [j0, j0 + 64), from
// the panel (x's panel columns, [E * b, kPanel], the tile's rows from column s0): added into
// grad_w (m > 0) or written there (m = 0); each row's share of dr_m added to dr[row].
BENCH_CPU_CLONES void first_layer_tile(const FirstLayer& a, const float* __restrict panel, int64_t s0, int64_t i0,
                                       int64_t n_rows, int64_t j0, int64_t m, float* __restrict dr) {
  f32x16 acc[kTileRows][kTileVectors];
#pragma GCC unroll 8
  for (int ri = 0; ri < kTileRows; ++ri)
#pragma GCC unroll 4
    for (int c = 0; c < kTileVectors; ++c) acc[ri][c] = f32x16{};
  const float* xm = panel + m * a.rows * kPanel + s0;
  const float* gm = a.grad_z + m * a.rows * a.out_pad + j0;
  for (int64_t k = 0; k < a.rows; ++k) {
    const float* gk = gm + k * a.out_pad;
    const f32x16 g[kTileVectors] = {load16(gk), load16(gk + 16), load16(gk + 32), load16(gk + 48)};
    const float* xk = xm + k * kPanel;
#pragma GCC unroll 8
    for (int ri = 0; ri < kTileRows; ++ri) {
      const f32x16 xv = f32x16{} + xk[ri];
#pragma GCC unroll 4
      for (int c = 0; c < kTileVectors; ++c) acc[ri][c] += xv * g[c];
    }
  }
  const int64_t n_cols = std::min(kTileCols, a.n_out - j0);
#pragma GCC unroll 8
  for (int ri = 0; ri < kTileRows; ++ri) {  // constant indices into acc: it stays in registers
    if (ri == n_rows) break;
    const int64_t i = i0 + ri;
    const float rv = a.r[m * a.n_in + i];
    float* gw = a.grad_w + i * a.n_out + j0;
    const float* w = a.weight + i * a.n_out + j0;
    if (n_cols == kTileCols) {
      f32x16 d{};
#pragma GCC unroll 4
      for (int c = 0; c < kTileVectors; ++c) {
        store16(gw + 16 * c, m == 0 ? rv * acc[ri][c] : load16(gw + 16 * c) + rv * acc[ri][c]);
        d += load16(w + 16 * c) * acc[ri][c];
      }
      float sum = 0;
      for (int l = 0; l < 16; ++l) sum += d[l];
      dr[ri] += sum;
    } else {  // the last columns of a width that is not a multiple of 64
      float g[kTileCols];
#pragma GCC unroll 4
      for (int c = 0; c < kTileVectors; ++c) store16(g + 16 * c, acc[ri][c]);
      float sum = 0;
      for (int64_t j = 0; j < n_cols; ++j) {
        gw[j] = m == 0 ? rv * g[j] : gw[j] + rv * g[j];
        sum += w[j] * g[j];
      }
      dr[ri] += sum;
    }
  }
}

// Rows [p_begin, p_end) of W (panel by panel, kPanel rows each, the last one possibly fewer).
void first_layer_rows(const FirstLayer& a, int64_t p_begin, int64_t p_end) {
  const int64_t n_rows_all = a.n_members * a.rows;
  std::vector<float> panel(n_rows_all * kPanel);
  float* pk = panel.data();
  for (int64_t p0 = p_begin; p0 < p_end; p0 += kPanel) {
    const int64_t width = std::min(kPanel, p_end - p0);
    for (int64_t q = 0; q < n_rows_all; ++q) {  // x's columns [p0, p0 + width), zeros after them
      const float* src = a.x + q * a.n_in + p0;
      float* dst = pk + q * kPanel;
      for (int64_t l = 0; l < width; ++l) dst[l] = src[l];
      for (int64_t l = width; l < kPanel; ++l) dst[l] = 0.0f;  // rows computed, never stored
    }
    for (int64_t s0 = 0; s0 < width; s0 += kTileRows) {
      const int64_t n_rows = std::min(kTileRows, width - s0);
      for (int64_t m = 0; m < a.n_members; ++m) {
        float dr[kTileRows] = {};
        for (int64_t j0 = 0; j0 < a.n_out; j0 += kTileCols) first_layer_tile(a, pk, s0, p0 + s0, n_rows, j0, m, dr);
        for (int64_t ri = 0; ri < n_rows; ++ri) a.grad_r[m * a.n_in + p0 + s0 + ri] = dr[ri];
      }
    }
  }
}

bool first_layer_applies(const Tensor& x, const Tensor& grad_z, const Tensor& weight, const Tensor& r) {
  for (const Tensor* t : {&x, &grad_z, &weight, &r})
    if (t->device().type() != at::kCPU || t->scalar_type() != at::kFloat || !t->is_contiguous()) return false;
  return x.dim() == 3 && grad_z.dim() == 3 && weight.dim() == 2 && r.dim() == 2 && x.size(0) == r.size(0) &&
         grad_z.size(0) == x.size(0) && grad_z.size(1) == x.size(1) && weight.size(0) == x.size(2) &&
         weight.size(1) == grad_z.size(2) && r.size(1) == x.size(2);
}

// (dW [in, out], dr [E, in]) of split batching's first layer (see above). x: [E, b, in], the layer's
// input per member; grad_z: [E, b, out], d loss / d (x_m ∘ r_m) W; weight [in, out]; r [E, in]; all
// float32, contiguous, on the CPU.
std::tuple<Tensor, Tensor> first_layer_grads(const Tensor& x, const Tensor& grad_z, const Tensor& weight,
                                             const Tensor& r) {
  TORCH_CHECK(first_layer_applies(x, grad_z, weight, r),
              "first_layer_grads: x [E, b, in], grad_z [E, b, out], weight [in, out] and r [E, in], float32, contiguous, "
              "on the CPU");
  const int64_t n_members = x.size(0), rows = x.size(1), n_in = x.size(2), n_out = weight.size(1);
  Tensor grad_w = at::empty({n_in, n_out}, x.options()), grad_r = at::empty({n_members, n_in}, x.options());
  if (n_in == 0 || n_out == 0) return {grad_w.zero_(), grad_r.zero_()};
  const int64_t out_pad = (n_out + kTileCols - 1) / kTileCols * kTileCols;
  Tensor gz = grad_z;
  if (out_pad != n_out) {  // the tiles read 64 columns at a time
    gz = at::zeros({n_members * rows, out_pad}, x.options());
    gz.narrow(1, 0, n_out).copy_(grad_z.view({n_members * rows, n_out}));
  }
  const FirstLayer a{x.data_ptr<float>(), gz.data_ptr<float>(), weight.data_ptr<float>(), r.data_ptr<float>(),
                     grad_w.data_ptr<float>(), grad_r.data_ptr<float>(), n_members, rows, n_in, n_out, out_pad};
  const int64_t n_panels = (n_in + kPanel - 1) / kPanel;
  at::parallel_for(0, n_panels, 1, [&](int64_t begin, int64_t end) {
    first_layer_rows(a, begin * kPanel, std::min(end * kPanel, n_in));
  });
  return {grad_w, grad_r};
}

// x @ w (+ bias) through oneDNN: mkldnn::_linear_pointwise(x, w.t(), bias, "none", [], None), as
// bench_core.onednn.matmul calls it.
Tensor onednn_matmul(const Tensor& x, const Tensor& w, const c10::optional<Tensor>& bias = c10::nullopt) {
  static const c10::OperatorHandle op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  torch::jit::Stack stack;
  stack.reserve(6);
  stack.emplace_back(x);
  stack.emplace_back(w.t());
  stack.emplace_back(bias.has_value() ? c10::IValue(*bias) : c10::IValue());
  stack.emplace_back(std::string("none"));
  stack.emplace_back(c10::List<c10::optional<at::Scalar>>());
  stack.emplace_back(c10::IValue());
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

// a @ b, through oneDNN where the caller decided so (manual._product).
Tensor product(const Tensor& a, const Tensor& b, bool via_onednn) {
  return via_onednn ? onednn_matmul(a, b) : at::matmul(a, b);
}

// manual._loss_and_grad: (member losses [E], d loss / d logits [E, B, C]) of the members' mean
// cross-entropies, averaged (mean) or summed.
std::tuple<Tensor, Tensor> loss_and_grad(const Tensor& logits, const Tensor& labels, bool mean) {
  const int64_t n_members = logits.size(0), batch = logits.size(1), n_classes = logits.size(2);
  const double scale = mean ? 1.0 / static_cast<double>(n_members) : 1.0;
  const Tensor lab = labels.dim() == 1 ? labels.expand({n_members, batch}) : labels;
  const Tensor log_p = at::log_softmax(logits, 2);
  const Tensor nll = at::nll_loss(log_p.view({-1, n_classes}), lab.reshape({-1}), {}, at::Reduction::None);
  Tensor member_losses = nll.view({n_members, batch}).mean(1);
  const Tensor weight = at::scalar_tensor(scale, logits.options()).div_(batch);
  const Tensor grad_log_p =
      at::zeros_like(log_p).scatter_(2, lab.unsqueeze(2), (-weight).expand({n_members, batch, 1}));
  Tensor grad = at::_log_softmax_backward_data(grad_log_p, log_p, 2, logits.scalar_type());
  return {member_losses, grad};
}

// manual._batchensemble's per-member layers (all of split batching's; repeat batching's after its
// first layer) and the loss. h: [E, b, in], the first per-member layer's input, or with relu_first
// the shared first layer's output before its ReLU. params: per layer weight [in, out], r [E, in],
// s [E, out], bias [E, out]. Returns (member losses, the 4 gradients per layer in that order, and
// with relu_first the gradient of h). first_kernel: the first layer's W and r gradients through
// first_layer_grads where it applies (split batching, float32, an AVX-512 CPU), else through the two
// products autograd runs.
std::tuple<Tensor, std::vector<Tensor>, c10::optional<Tensor>> batchensemble_layers(
    const Tensor& h_in, const Tensor& labels, at::TensorList params, c10::List<bool> onednn, bool mean,
    bool relu_first, bool first_kernel) {
  at::NoGradGuard no_grad;
  const int64_t n_layers = static_cast<int64_t>(params.size()) / 4;
  TORCH_CHECK(static_cast<int64_t>(params.size()) == 4 * n_layers && static_cast<int64_t>(onednn.size()) == n_layers,
              "batchensemble_layers: 4 parameters and one oneDNN flag per layer");
  std::vector<Tensor> inputs, scaled, products;
  Tensor h = h_in;
  for (int64_t li = 0; li < n_layers; ++li) {
    const Tensor &weight = params[4 * li], &r = params[4 * li + 1], &s = params[4 * li + 2], &bias = params[4 * li + 3];
    if (li > 0 || relu_first) h = at::relu(h);
    const Tensor xr = (h * r.unsqueeze(1)).reshape({-1, weight.size(0)});  // (E*b, in)
    const Tensor z = product(xr, weight, onednn.get(li)).view({r.size(0), -1, weight.size(1)});  // (E, b, out)
    inputs.push_back(h);
    scaled.push_back(xr);
    products.push_back(z);
    h = at::addcmul(bias.unsqueeze(1), z, s.unsqueeze(1));
  }
  auto [member_losses, grad] = loss_and_grad(h.contiguous(), labels, mean);
  std::vector<Tensor> grads(params.size());
  for (int64_t li = n_layers - 1; li >= 0; --li) {
    const Tensor &weight = params[4 * li], &r = params[4 * li + 1], &s = params[4 * li + 2];
    const Tensor& inp = inputs[li];
    const bool need_input = li > 0 || relu_first;
    grads[4 * li + 3] = grad.sum(1);
    grads[4 * li + 2] = (grad * products[li]).sum(1);
    const Tensor grad_z = (grad * s.unsqueeze(1)).view({-1, weight.size(1)});  // (E*b, out)
    if (!need_input && first_kernel) {
      const Tensor grad_z3 = grad_z.view({r.size(0), -1, weight.size(1)});
      if (first_layer_fast() && first_layer_applies(inp, grad_z3, weight, r)) {  // dispatched: the profiler shows it
        static const auto op = c10::Dispatcher::singleton()
                                   .findSchemaOrThrow("bench_core::first_layer_grads", "")
                                   .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&)>();
        std::tie(grads[4 * li], grads[4 * li + 1]) = op.call(inp, grad_z3, weight, r);
        continue;
      }
    }
    grads[4 * li] = at::mm(scaled[li].t(), grad_z);  // (in, out)
    Tensor grad_xr = product(grad_z, weight.t(), onednn.get(li)).view_as(inp);  // (E, b, in)
    if (!need_input) {
      grads[4 * li + 1] = grad_xr.mul_(inp).sum(1);
      continue;
    }
    grads[4 * li + 1] = (grad_xr * inp).sum(1);
    grad = at::threshold_backward(grad_xr.mul_(r.unsqueeze(1)), inp, 0);  // through the ReLU before this layer
  }
  c10::optional<Tensor> grad_h;
  if (relu_first) grad_h = grad;
  return {member_losses, grads, grad_h};
}

// manual._vectorized: the classic ensemble on a shared batch x [B, in]; weights[0] [in, E, out],
// later weights [E, in, out], biases [E, out]. Returns (member losses, weights' and biases' gradients).
std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>> vectorized(
    const Tensor& x, const Tensor& labels, at::TensorList weights, at::TensorList biases, bool onednn, bool mean) {
  at::NoGradGuard no_grad;
  const int64_t n_layers = static_cast<int64_t>(weights.size());
  TORCH_CHECK(n_layers > 0 && static_cast<int64_t>(biases.size()) == n_layers, "vectorized: one bias per weight");
  const Tensor &w0 = weights[0], &b0 = biases[0];
  const int64_t n_in = w0.size(0), n_members = w0.size(1), n_out = w0.size(2), batch = x.size(0);
  const Tensor w = w0.view({n_in, -1});  // (in, E*out)
  Tensor h;  // models._members_product
  if (onednn) {
    h = onednn_matmul(x, w, b0.reshape({-1})).view({batch, n_members, n_out}).transpose(0, 1);
  } else {
    h = at::addmm(b0.reshape({-1, 1}), w.t(), x.t()).view({n_members, n_out, -1}).transpose(1, 2);
  }
  std::vector<Tensor> inputs;
  for (int64_t li = 1; li < n_layers; ++li) {
    inputs.push_back(at::relu(h));
    h = at::baddbmm(biases[li].unsqueeze(1), inputs.back(), weights[li]);  // (E, B, out)
  }
  auto [member_losses, grad] = loss_and_grad(h.contiguous(), labels, mean);
  std::vector<Tensor> grad_w(n_layers), grad_b(n_layers);
  for (int64_t li = n_layers - 1; li > 0; --li) {
    const Tensor& a = inputs[li - 1];
    grad_b[li] = grad.sum(1);
    grad_w[li] = at::bmm(a.transpose(1, 2), grad);
    grad = at::threshold_backward(at::bmm(grad, weights[li].transpose(1, 2)), a, 0);
  }
  const Tensor grad_z = grad.transpose(0, 1).reshape({batch, -1});  // models.shared_input_linear_grads
  grad_w[0] = at::mm(x.t(), grad_z).view({n_in, n_members, n_out});
  grad_b[0] = grad.sum(1);
  return {member_losses, grad_w, grad_b};
}

// manual._plain: one MLP of nn.Linear layers (weights [out, in]) on x [B, in].
std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>> plain(
    const Tensor& x, const Tensor& labels, at::TensorList weights, at::TensorList biases, bool mean) {
  at::NoGradGuard no_grad;
  const int64_t n_layers = static_cast<int64_t>(weights.size());
  TORCH_CHECK(n_layers > 0 && static_cast<int64_t>(biases.size()) == n_layers, "plain: one bias per weight");
  std::vector<Tensor> inputs{x};
  Tensor h = x;
  for (int64_t li = 0; li < n_layers; ++li) {
    if (li > 0) {
      h = at::relu(h);
      inputs.push_back(h);
    }
    h = at::addmm(biases[li], h, weights[li].t());  // (B, out)
  }
  auto [member_losses, grad3] = loss_and_grad(h.unsqueeze(0), labels, mean);
  Tensor grad = grad3[0];  // (B, C)
  std::vector<Tensor> grad_w(n_layers), grad_b(n_layers);
  for (int64_t li = n_layers - 1; li >= 0; --li) {
    const Tensor& a = inputs[li];
    grad_b[li] = grad.sum(0);
    grad_w[li] = grad.t().mm(a);  // (out, in)
    if (li > 0) grad = at::threshold_backward(grad.mm(weights[li]), a, 0);
  }
  return {member_losses, grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY(bench_core, m) {
  m.def(
      "batchensemble_layers(Tensor h, Tensor labels, Tensor[] params, bool[] onednn, bool mean, bool relu_first,"
      " bool first_kernel) -> (Tensor, Tensor[], Tensor?)");
  m.def("first_layer_grads(Tensor x, Tensor grad_z, Tensor weight, Tensor r) -> (Tensor, Tensor)");
  m.def("first_layer_fast() -> bool", &first_layer_fast);
  m.def(
      "vectorized(Tensor x, Tensor labels, Tensor[] weights, Tensor[] biases, bool onednn, bool mean)"
      " -> (Tensor, Tensor[], Tensor[])");
  m.def("plain(Tensor x, Tensor labels, Tensor[] weights, Tensor[] biases, bool mean) -> (Tensor, Tensor[], Tensor[])");
}

TORCH_LIBRARY_IMPL(bench_core, CPU, m) {
  m.impl("batchensemble_layers", &batchensemble_layers);
  m.impl("first_layer_grads", &first_layer_grads);
  m.impl("vectorized", &vectorized);
  m.impl("plain", &plain);
}
