// The hand-written training steps of bench_core/manual.py, in C++: the same ATen operators in the
// same order and layouts, so losses and gradients are bit for bit the Python ones (and autograd's);
// what goes is the Python interpreter between the operators (about 95 calls in a split step).
// The exceptions are first layers, on AVX-512 CPUs: BatchEnsemble's weight and r gradients come from
// one written-out kernel (first_layer_grads) instead of products, the same sums in another order,
// and the classic ensemble's first-layer weight gets Adam's step inside its gradient's kernel
// (first_layer_adam). And BatchEnsemble's per-member layers do their element-wise work and the loss in
// loops of their own (namespace fused, with batchensemble_layers' `fused`), within float32's rounding.
// Built and loaded by bench_core/native.py; the operators are torch.ops.bench_core.*.
#include <ATen/ATen.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <initializer_list>
#include <limits>
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

// acc = Σ_k x[k, rows of the tile] ⊗ grad_z[k, 64 columns]: a tile of xᵀ dz over `rows` rows, x's
// tile columns read from a packed panel (row stride kPanel), grad_z's from row stride out_pad. Inlined
// into each caller's build, so acc stays in registers.
__attribute__((always_inline)) inline void accumulate_tile(f32x16 (&acc)[kTileRows][kTileVectors],
                                                           const float* __restrict xm, const float* __restrict gm,
                                                           int64_t rows, int64_t out_pad) {
#pragma GCC unroll 8
  for (int ri = 0; ri < kTileRows; ++ri)
#pragma GCC unroll 4
    for (int c = 0; c < kTileVectors; ++c) acc[ri][c] = f32x16{};
  for (int64_t k = 0; k < rows; ++k) {
    const float* gk = gm + k * out_pad;
    const f32x16 g[kTileVectors] = {load16(gk), load16(gk + 16), load16(gk + 32), load16(gk + 48)};
    const float* xk = xm + k * kPanel;
#pragma GCC unroll 8
    for (int ri = 0; ri < kTileRows; ++ri) {
      // xk[ri] in all 16 lanes, broadcast straight from memory (vbroadcastss zmm, m32: a load) where
      // f32x16{} + xk[ri] was an add (0 + a is not a where a is -0; a - 0 is a, so this folds) and a
      // broadcast from a register, which on Intel's AVX-512 cores takes the port of the second
      // multiply-add unit: 6 of each per 24 multiply-adds put a lone tile at about 65 % of MKL's
      // rate on one core of an Intel Xeon (2026-11-27). Not a helper function: one returning a
      // 64-byte vector is compiled for the baseline and built its lanes one by one.
      const f32x16 xv = xk[ri] - f32x16{};
#pragma GCC unroll 4
      for (int c = 0; c < kTileVectors; ++c) acc[ri][c] += xv * g[c];
    }
  }
}

// The sum of v's 16 elements as a tree (halves added: 8 + 8, 4 + 4, 2 + 2, 1 + 1), in place of 16
// additions one after the other, each waiting on the last: split's kernel took 0.58 against 0.69 ms
// on CIFAR-10-sized operands (this project's machine; docs/speed-log.md, eighteenth session).
__attribute__((always_inline)) inline float sum16(f32x16 v) {
  typedef float f32x8 __attribute__((vector_size(32)));
  typedef float f32x4 __attribute__((vector_size(16)));
  const f32x8 a = f32x8{v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]} +
                  f32x8{v[8], v[9], v[10], v[11], v[12], v[13], v[14], v[15]};
  const f32x4 b = f32x4{a[0], a[1], a[2], a[3]} + f32x4{a[4], a[5], a[6], a[7]};
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// x's columns [p0, p0 + width) of its n_rows rows (row stride n_in) packed into panel [n_rows, kPanel],
// zeros after them: the tiles' rows past width are computed and never stored. Each row's columns of
// the next panel are asked of the cache (L2) meanwhile: x's rows are 12 KiB apart at CIFAR-10's
// width and a panel reads 96 bytes of each, a pattern the hardware prefetchers followed poorly here:
// with x out of the cache, split's kernel took 0.55 against 0.61 ms.
void pack_panel(const float* x, int64_t n_rows, int64_t n_in, int64_t p0, int64_t width, float* panel) {
  for (int64_t q = 0; q < n_rows; ++q) {
    const float* src = x + q * n_in + p0;
    float* dst = panel + q * kPanel;
    if (p0 + 2 * kPanel <= n_in) {
      __builtin_prefetch(src + kPanel, 0, 2);
      __builtin_prefetch(src + 2 * kPanel - 1, 0, 2);
    }
    for (int64_t l = 0; l < width; ++l) dst[l] = src[l];
    for (int64_t l = width; l < kPanel; ++l) dst[l] = 0.0f;
  }
}

// grad_z [n_rows, n_out] with its columns padded with zeros to a multiple of 64 (the tiles read 64
// at a time): (the padded tensor, or grad_z itself where no padding is needed; its row stride).
std::tuple<Tensor, int64_t> padded_columns(const Tensor& grad_z, int64_t n_rows, int64_t n_out) {
  const int64_t out_pad = (n_out + kTileCols - 1) / kTileCols * kTileCols;
  if (out_pad == n_out) return {grad_z, out_pad};
  Tensor gz = at::zeros({n_rows, out_pad}, grad_z.options());
  gz.narrow(1, 0, n_out).copy_(grad_z.reshape({n_rows, n_out}));
  return {gz, out_pad};
}

// Whether every tensor is a contiguous float32 CPU tensor, as the kernels read them.
bool cpu_float32_contiguous(std::initializer_list<const Tensor*> tensors) {
  for (const Tensor* t : tensors)
    if (t->device().type() != at::kCPU || t->scalar_type() != at::kFloat || !t->is_contiguous()) return false;
  return true;
}

struct FirstLayer {
  const float* x;       // [E * b, in], or [b, in] shared by the members (shared_x)
  const float* grad_z;  // [E * b, out_pad], columns from out on zero
  const float* weight;  // [in, out]
  const float* r;       // [E, in]
  float* grad_w;        // [in, out]
  float* grad_r;        // [E, in]
  int64_t n_members, rows, n_in, n_out, out_pad;
  bool shared_x;
};

// Member m's G_m on rows [i0, i0 + n_rows) (n_rows <= kTileRows) by columns [j0, j0 + 64), from
// the panel (x's panel columns, [E * b, kPanel], the tile's rows from column s0): added into
// grad_w (m > 0) or written there (m = 0); each row's share of dr_m added to dr[row].
BENCH_CPU_CLONES void first_layer_tile(const FirstLayer& a, const float* __restrict panel, int64_t s0, int64_t i0,
                                       int64_t n_rows, int64_t j0, int64_t m, float* __restrict dr) {
  f32x16 acc[kTileRows][kTileVectors];
  accumulate_tile(acc, panel + (a.shared_x ? 0 : m) * a.rows * kPanel + s0, a.grad_z + m * a.rows * a.out_pad + j0,
                  a.rows, a.out_pad);
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
      dr[ri] += sum16(d);
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
  const int64_t n_rows_all = (a.shared_x ? 1 : a.n_members) * a.rows;
  std::vector<float> panel(n_rows_all * kPanel);
  float* pk = panel.data();
  for (int64_t p0 = p_begin; p0 < p_end; p0 += kPanel) {
    const int64_t width = std::min(kPanel, p_end - p0);
    pack_panel(a.x, n_rows_all, a.n_in, p0, width, pk);
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
  if (!cpu_float32_contiguous({&x, &grad_z, &weight, &r})) return false;
  if (grad_z.dim() != 3 || weight.dim() != 2 || r.dim() != 2 || grad_z.size(0) != r.size(0)) return false;
  const bool shared = x.dim() == 2;  // repeat batching: every member on the whole batch
  if (!shared && (x.dim() != 3 || x.size(0) != r.size(0))) return false;
  const int64_t rows = x.size(shared ? 0 : 1), n_in = x.size(shared ? 1 : 2);
  return grad_z.size(1) == rows && weight.size(0) == n_in && weight.size(1) == grad_z.size(2) && r.size(1) == n_in;
}

// (dW [in, out], dr [E, in]) of BatchEnsemble's first layer (see above). x: [E, b, in], the layer's
// input per member (split batching), or [b, in], one input every member reads (repeat batching:
// G_m = xᵀ dz_m); grad_z: [E, b, out], d loss / d (x_m ∘ r_m) W; weight [in, out]; r [E, in]; all
// float32, contiguous, on the CPU.
std::tuple<Tensor, Tensor> first_layer_grads(const Tensor& x, const Tensor& grad_z, const Tensor& weight,
                                             const Tensor& r) {
  TORCH_CHECK(first_layer_applies(x, grad_z, weight, r),
              "first_layer_grads: x [E, b, in] or [b, in], grad_z [E, b, out], weight [in, out] and r [E, in], float32, "
              "contiguous, on the CPU");
  const bool shared_x = x.dim() == 2;
  const int64_t n_members = r.size(0), rows = grad_z.size(1), n_in = weight.size(0), n_out = weight.size(1);
  Tensor grad_w = at::empty({n_in, n_out}, x.options()), grad_r = at::empty({n_members, n_in}, x.options());
  if (n_in == 0 || n_out == 0) return {grad_w.zero_(), grad_r.zero_()};
  const auto [gz, out_pad] = padded_columns(grad_z, n_members * rows, n_out);
  const FirstLayer a{x.data_ptr<float>(), gz.data_ptr<float>(), weight.data_ptr<float>(), r.data_ptr<float>(),
                     grad_w.data_ptr<float>(), grad_r.data_ptr<float>(), n_members, rows, n_in, n_out, out_pad,
                     shared_x};
  const int64_t n_panels = (n_in + kPanel - 1) / kPanel;
  at::parallel_for(0, n_panels, 1, [&](int64_t begin, int64_t end) {
    first_layer_rows(a, begin * kPanel, std::min(end * kPanel, n_in));
  });
  return {grad_w, grad_r};
}

// ---- The classic ensemble's first layer: W's gradient and Adam's step on W in one pass ---------
//
// The members' first layers are one weight W [in, E·out] on the shared batch x [B, in]; its gradient
// is xᵀ dz. Taken as a product it is written out (7.5 MiB at CIFAR-10's E = 5) and read back by
// Adam's step, which also reads and writes W and its two moments. Here each panel of kPanel rows of
// W gets its gradient from register tiles (accumulate_tile, as first_layer_tile's: one member, no r)
// into a buffer the size of L2's share, and Adam's step follows on those rows at once: the gradient is never
// written out, and W's rows are stepped while the buffer is still in the cache. The gradient is the
// same sum in another order (float32 roundings differ from the product's by about 1e-7 relative);
// Adam's step is torch._fused_adam_'s (torch.optim.Adam(fused=True)) on AVX-512, bit for bit on the
// same gradient with torch 2.14 (tested; older torches formed exp_avg without lerp: within rounding):
// its operations in its order, fused multiply-adds where it has them.

struct AdamCoefficients {
  float neg_step_size, lerp_weight, beta2, sq_weight, bias_correction2_sqrt, eps, weight_decay;
};

// Adam's coefficients at `step` (this step's count, already incremented), as _fused_adam_ rounds them:
// computed in double, then float.
AdamCoefficients adam_coefficients(double step, double lr, double beta1, double beta2, double eps,
                                   double weight_decay) {
  const double bias_correction1 = 1 - std::pow(beta1, step), bias_correction2 = 1 - std::pow(beta2, step);
  return {static_cast<float>(-(lr / bias_correction1)), static_cast<float>(1 - beta1), static_cast<float>(beta2),
          static_cast<float>(1 - beta2), static_cast<float>(std::sqrt(bias_correction2)), static_cast<float>(eps),
          static_cast<float>(weight_decay)};
}

#if BENCH_X86_CLONES
// Adam's step on n elements of one row, as _fused_adam_'s AVX-512 loop makes it (exp_avg by lerp as
// one fused multiply-add, exp_avg_sq's and weight decay's sums fused as torch's build fuses them),
// the row's last n % 16 elements through the same vector operations, masked. Only for AVX-512 CPUs
// (first_layer_fast). Contraction off: every fused multiply-add is written, none added.
#if defined(__clang__)
#define BENCH_NO_CONTRACT _Pragma("clang fp contract(off)")
#define BENCH_NO_CONTRACT_ATTR
#else
#define BENCH_NO_CONTRACT
#define BENCH_NO_CONTRACT_ATTR __attribute__((optimize("fp-contract=off")))
#endif
__attribute__((target("arch=x86-64-v4"))) BENCH_NO_CONTRACT_ATTR void adam_row(
    float* __restrict param, float* __restrict exp_avg, float* __restrict exp_avg_sq, const float* __restrict grad,
    int64_t n, const AdamCoefficients& c) {
  BENCH_NO_CONTRACT
  const __m512 lerp_weight = _mm512_set1_ps(c.lerp_weight), beta2 = _mm512_set1_ps(c.beta2),
               sq_weight = _mm512_set1_ps(c.sq_weight), bc2_sqrt = _mm512_set1_ps(c.bias_correction2_sqrt),
               eps = _mm512_set1_ps(c.eps), neg_step = _mm512_set1_ps(c.neg_step_size),
               decay = _mm512_set1_ps(c.weight_decay), one = _mm512_set1_ps(1.0f);
  const bool small = std::abs(c.lerp_weight) < 0.5f;  // exp_avg.lerp_(grad, 1 - beta1), as torch picks the form
  const __m512 coeff = small ? lerp_weight : _mm512_sub_ps(lerp_weight, one);
  for (int64_t d = 0; d < n; d += 16) {
    const __mmask16 k = n - d >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - d)) - 1);
    __m512 p = _mm512_maskz_loadu_ps(k, param + d), g = _mm512_maskz_loadu_ps(k, grad + d);
    if (c.weight_decay != 0.0f) g = _mm512_fmadd_ps(p, decay, g);
    __m512 m = _mm512_maskz_loadu_ps(k, exp_avg + d);
    m = _mm512_fmadd_ps(coeff, _mm512_sub_ps(g, m), small ? m : g);
    __m512 v = _mm512_maskz_loadu_ps(k, exp_avg_sq + d);
    v = _mm512_fmadd_ps(_mm512_mul_ps(sq_weight, g), g, _mm512_mul_ps(v, beta2));
    _mm512_mask_storeu_ps(exp_avg + d, k, m);
    _mm512_mask_storeu_ps(exp_avg_sq + d, k, v);
    const __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(v), bc2_sqrt), eps);
    p = _mm512_add_ps(p, _mm512_div_ps(_mm512_mul_ps(neg_step, m), denom));
    _mm512_mask_storeu_ps(param + d, k, p);
  }
}
#else
void adam_row(float*, float*, float*, const float*, int64_t, const AdamCoefficients&) {
  TORCH_CHECK(false, "first_layer_adam: only on x86-64 CPUs with AVX-512");
}
#endif

// G's tile of rows [s0, s0 + n_rows) of the panel (n_rows <= kTileRows) by columns [j0, j0 + 64),
// written to buf [kPanel, out_pad].
BENCH_CPU_CLONES void product_tile(const float* __restrict panel, const float* __restrict grad_z, int64_t rows,
                                   int64_t out_pad, int64_t s0, int64_t n_rows, int64_t j0, float* __restrict buf) {
  f32x16 acc[kTileRows][kTileVectors];
  accumulate_tile(acc, panel + s0, grad_z + j0, rows, out_pad);
#pragma GCC unroll 8
  for (int ri = 0; ri < kTileRows; ++ri) {
    if (ri == n_rows) break;
#pragma GCC unroll 4
    for (int c = 0; c < kTileVectors; ++c) store16(buf + (s0 + ri) * out_pad + j0 + 16 * c, acc[ri][c]);
  }
}

struct FirstLayerAdam {
  const float* x;       // [B, in]
  const float* grad_z;  // [B, out_pad], columns from out on zero
  float* weight;        // [in, out], and its moments
  float* exp_avg;
  float* exp_avg_sq;
  int64_t rows, n_in, n_out, out_pad;
  AdamCoefficients c;
};

// Rows [p_begin, p_end) of W: per panel of kPanel rows, their gradient, then Adam's step on them.
void first_layer_adam_rows(const FirstLayerAdam& a, int64_t p_begin, int64_t p_end) {
  std::vector<float> panel(a.rows * kPanel), buf(kPanel * a.out_pad);
  for (int64_t p0 = p_begin; p0 < p_end; p0 += kPanel) {
    const int64_t width = std::min(kPanel, p_end - p0);
    pack_panel(a.x, a.rows, a.n_in, p0, width, panel.data());
    for (int64_t s0 = 0; s0 < width; s0 += kTileRows)
      for (int64_t j0 = 0; j0 < a.n_out; j0 += kTileCols)
        product_tile(panel.data(), a.grad_z, a.rows, a.out_pad, s0, std::min(kTileRows, width - s0), j0, buf.data());
    for (int64_t ri = 0; ri < width; ++ri) {
      const int64_t o = (p0 + ri) * a.n_out;
      adam_row(a.weight + o, a.exp_avg + o, a.exp_avg_sq + o, buf.data() + ri * a.out_pad, a.n_out, a.c);
    }
  }
}

bool first_layer_adam_applies(const Tensor& x, const Tensor& grad_z, const Tensor& weight, const Tensor& exp_avg,
                              const Tensor& exp_avg_sq, const Tensor& step) {
  if (!cpu_float32_contiguous({&x, &grad_z, &weight, &exp_avg, &exp_avg_sq})) return false;
  return x.dim() == 2 && grad_z.dim() == 2 && weight.dim() == 2 && grad_z.size(0) == x.size(0) &&
         weight.size(0) == x.size(1) && weight.size(1) == grad_z.size(1) && exp_avg.sizes() == weight.sizes() &&
         exp_avg_sq.sizes() == weight.sizes() && step.device().type() == at::kCPU && step.numel() == 1;
}

// W's gradient xᵀ dz and Adam's step on W with it, in place (see above); the gradient is not kept.
// x [B, in], grad_z [B, out], weight, exp_avg, exp_avg_sq [in, out]: float32, contiguous, on the CPU;
// step: Adam's step count for W, incremented here, then read as _fused_adam_ reads it. AVX-512 only.
void first_layer_adam(const Tensor& x, const Tensor& grad_z, const Tensor& weight, const Tensor& exp_avg,
                      const Tensor& exp_avg_sq, const Tensor& step, double lr, double beta1, double beta2, double eps,
                      double weight_decay) {
  TORCH_CHECK(first_layer_adam_applies(x, grad_z, weight, exp_avg, exp_avg_sq, step),
              "first_layer_adam: x [B, in], grad_z [B, out], weight, exp_avg and exp_avg_sq [in, out], float32, "
              "contiguous, and a one-element step count, on the CPU");
  TORCH_CHECK(first_layer_fast(), "first_layer_adam: only on x86-64 CPUs with AVX-512");
  step.add_(1);  // Adam counts the step before it steps (torch._foreach_add_(steps, 1), then _fused_adam_)
  const int64_t rows = x.size(0), n_in = x.size(1), n_out = weight.size(1);
  if (n_in == 0 || n_out == 0) return;
  const auto [gz, out_pad] = padded_columns(grad_z, rows, n_out);
  const FirstLayerAdam a{x.data_ptr<float>(), gz.data_ptr<float>(), weight.data_ptr<float>(), exp_avg.data_ptr<float>(),
                         exp_avg_sq.data_ptr<float>(), rows, n_in, n_out, out_pad,
                         adam_coefficients(step.item<float>(), lr, beta1, beta2, eps, weight_decay)};
  const int64_t n_panels = (n_in + kPanel - 1) / kPanel;
  at::parallel_for(0, n_panels, 1, [&](int64_t begin, int64_t end) {
    first_layer_adam_rows(a, begin * kPanel, std::min(end * kPanel, n_in));
  });
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

// ---- Wide products in chunks of their inner dimension, one thread each --------------------------
//
// A first layer's forward product, a [M, K] @ b [K, N] with K in the thousands and M, N of a batch
// and a layer's width, took 0.85–0.88× MKL's own two-thread time on two cores of an Intel Xeon as
// two single-threaded products over halves of K, added (a [125, 3072] @ [3072, 128]: 0.285 against
// 0.337 ms; [128, 3072] @ [3072, 640]: 1.46 against 1.67 ms), each thread reading its own half of the
// weight, which first_layer_grads, first_layer_adam and Adam also share out by rows. The same bits
// as (bias + a₀ b₀) + a₁ b₁ from single-threaded products; within float32's rounding of a b + bias.
// Only where torch runs on as many threads as there are chunks (at most kMaxChunks: more threads were
// not measured, and a chunk runs on one thread), b's rows are contiguous (with nn.Linear's weight
// transposed, [128, 3072] @ [3072, 128] took 1.15× MKL's time in chunks: single MLPs keep MKL's), the
// product is large enough (kChunkMinMacs) and each chunk at least kChunkMinWidth wide.
// BENCH_CHUNKED_PRODUCTS=0 (manual.ENV_CHUNKED) turns it off.
constexpr int64_t kMaxChunks = 2, kChunkMinWidth = 256, kChunkMinMacs = int64_t{1} << 22;

// Whether the environment variable `name` turns a fast path off: its value, blanks around it
// stripped, is "0" (as bench_core.errors.switched_off reads it).
bool switched_off(const char* name) {
  const char* value = std::getenv(name);
  if (value == nullptr) return false;
  const std::string text(value), blanks = " \t\n\r\f\v";
  const auto first = text.find_first_not_of(blanks);
  return first != std::string::npos && text.substr(first, text.find_last_not_of(blanks) - first + 1) == "0";
}

// How many chunks chunked_product takes a @ b in here (0: none, one threaded product instead).
int64_t product_chunks(const Tensor& a, const Tensor& b) {
  if (a.dim() != 2 || b.dim() != 2 || a.size(1) != b.size(0) || a.device().type() != at::kCPU ||
      b.device().type() != at::kCPU || a.scalar_type() != at::kFloat || b.scalar_type() != at::kFloat ||
      b.stride(1) != 1 || at::in_parallel_region())
    return 0;
  if (switched_off("BENCH_CHUNKED_PRODUCTS")) return 0;
  const int64_t threads = at::get_num_threads(), m = a.size(0), k = a.size(1), n = b.size(1);
  if (threads < 2 || threads > kMaxChunks || k < threads * kChunkMinWidth || m * k * n < kChunkMinMacs) return 0;
  return threads;
}

// a @ b (+ bias [N]) in `chunks` chunks of K (product_chunks' count), or with none as one product
// (through oneDNN with via_onednn). The first chunk's product takes the bias (addmm), the others are
// added to it in order.
Tensor product_in_chunks(const Tensor& a, const Tensor& b, const c10::optional<Tensor>& bias, bool via_onednn,
                         int64_t chunks) {
  if (chunks == 0) {
    if (via_onednn) return onednn_matmul(a, b, bias);
    return bias ? at::addmm(*bias, a, b) : at::matmul(a, b);
  }
  const int64_t k = a.size(1), m = a.size(0), n = b.size(1);
  std::vector<Tensor> parts(chunks);
  for (int64_t c = 0; c < chunks; ++c) parts[c] = at::empty({m, n}, a.options());
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    at::NoGradGuard no_grad;  // thread-local: the worker threads' own
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t k0 = k * c / chunks, k1 = k * (c + 1) / chunks;
      const Tensor ac = a.narrow(1, k0, k1 - k0), bc = b.narrow(0, k0, k1 - k0);
      if (c == 0 && bias) {
        at::addmm_out(parts[c], *bias, ac, bc);
      } else {
        at::mm_out(parts[c], ac, bc);
      }
    }
  });
  for (int64_t c = 1; c < chunks; ++c) parts[0].add_(parts[c]);
  return parts[0];
}

// a @ b (+ bias) in as many chunks as product_chunks says, never through oneDNN in chunks.
Tensor chunked_product(const Tensor& a, const Tensor& b, const c10::optional<Tensor>& bias, bool via_onednn) {
  return product_in_chunks(a, b, bias, via_onednn, via_onednn ? 0 : product_chunks(a, b));
}

// chunked_product as an operator, with the number of chunks it took (tests).
std::tuple<Tensor, int64_t> chunked_product_op(const Tensor& a, const Tensor& b, const c10::optional<Tensor>& bias) {
  at::NoGradGuard no_grad;
  const int64_t chunks = product_chunks(a, b);
  return {product_in_chunks(a, b, bias, false, chunks), chunks};
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

// BatchEnsemble's first-layer W and r gradients through first_layer_grads, dispatched (the profiler shows
// it), where the kernel is asked for (first_kernel), fast on this CPU and takes these operands; nullopt
// elsewhere, and the caller takes the products. grad_z [E, b, out].
c10::optional<std::tuple<Tensor, Tensor>> first_layer_kernel_grads(const Tensor& x, const Tensor& grad_z,
                                                                   const Tensor& weight, const Tensor& r,
                                                                   bool first_kernel) {
  if (!first_kernel || !first_layer_fast() || !first_layer_applies(x, grad_z, weight, r)) return c10::nullopt;
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("bench_core::first_layer_grads", "")
                             .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                               const Tensor&)>();
  return op.call(x, grad_z, weight, r);
}

// ---- BatchEnsemble's per-member layers: their element-wise work and the loss in loops of their own ---
//
// A per-member layer's tensors are small ([E, b, out]: [5, 25, 128] in split batching at CIFAR-10's
// batch), and through ATen each element-wise step is an operator call of its own (a dispatch, an
// output allocated, a pass): x ∘ r, ReLU, z ∘ s + bias in the forward; Σ dy, Σ dy ∘ z, dy ∘ s,
// Σ dx ∘ x, dx ∘ r and the ReLU's mask in the backward; about a dozen for the cross-entropy. Here
// the forward is one loop per layer (ReLU and the next layer's ∘ r folded into the last one's
// affine step), the backward two (the output side's three results in one pass, the input side's
// two in another), and the cross-entropy and its gradient one pass over the logits. The products
// stay ATen's (MKL's or oneDNN's) and the first layer's gradients first_layer_grads'. Same values,
// other roundings: sums over the batch run row after row (ATen's sum adds in chunks of 16),
// multiply-adds may be fused, and softmax's exp and log are the C library's, so results differ
// from the ATen operators' by a few float32 roundings (tested against them). float32, contiguous
// operands, on the CPU; batchensemble_layers' `fused` false (manual.ENV_FUSED) keeps ATen's
// operators, bit for bit the Python step's.
namespace fused {

constexpr int64_t kGrain = 32768;  // elements: fewer than that on one thread (ATen's grain for element-wise work)

// f(q0, q1) over rows [0, n_rows) of width n, in parallel where there are enough elements.
template <class F>
void by_rows(int64_t n_rows, int64_t n, const F& f) {
  at::parallel_for(0, n_rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(n, 1)), f);
}

// f(j0, j1) over columns [0, n) of n_rows rows, in blocks of 16 columns, in parallel where there are
// enough elements: for sums down the rows, each column's on one thread.
template <class F>
void by_columns(int64_t n_rows, int64_t n, const F& f) {
  const int64_t blocks = (n + 15) / 16, grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(16 * n_rows, 1));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) { f(16 * b0, std::min(16 * b1, n)); });
}

// ReLU as ATen's: max(v, 0) with NaN kept.
inline float relu(float v) { return v < 0.0f ? 0.0f : v; }

// The first per-member layer's input: inp = relu(h) (with relu) or h, and xr = inp ∘ r_m, rows
// [q0, q1) of [E·b, n]. h's rows may be strided (row q = (m, k) at m·stride_m + k·stride_k, columns
// contiguous); inp and xr are contiguous. Without relu inp is h itself and not written.
BENCH_CPU_CLONES void input_rows(const float* __restrict h, int64_t stride_m, int64_t stride_k,
                                 const float* __restrict r, int64_t b, int64_t n, bool with_relu,
                                 float* __restrict inp, float* __restrict xr, int64_t q0, int64_t q1) {
  for (int64_t q = q0; q < q1; ++q) {
    const int64_t m = q / b;
    const float* hq = h + m * stride_m + (q - m * b) * stride_k;
    const float* rm = r + m * n;
    float* xq = xr + q * n;
    if (with_relu) {
      float* iq = inp + q * n;
      for (int64_t j = 0; j < n; ++j) {
        const float v = relu(hq[j]);
        iq[j] = v;
        xq[j] = v * rm[j];
      }
    } else {
      for (int64_t j = 0; j < n; ++j) xq[j] = hq[j] * rm[j];
    }
  }
}

// A layer's affine step y = bias_m + z ∘ s_m on rows [q0, q1) of [E·b, n]; with r_next (a layer
// follows) the next layer's input relu(y) into out and relu(y) ∘ r_next into xr, else y into out.
BENCH_CPU_CLONES void affine_rows(const float* __restrict z, const float* __restrict s, const float* __restrict bias,
                                  const float* __restrict r_next, int64_t b, int64_t n, float* __restrict out,
                                  float* __restrict xr, int64_t q0, int64_t q1) {
  for (int64_t q = q0; q < q1; ++q) {
    const int64_t m = q / b;
    const float *zq = z + q * n, *sm = s + m * n, *bm = bias + m * n;
    float* oq = out + q * n;
    if (r_next == nullptr) {
      for (int64_t j = 0; j < n; ++j) oq[j] = bm[j] + zq[j] * sm[j];
      continue;
    }
    const float* rm = r_next + m * n;
    float* xq = xr + q * n;
    for (int64_t j = 0; j < n; ++j) {
      const float v = relu(bm[j] + zq[j] * sm[j]);
      oq[j] = v;
      xq[j] = v * rm[j];
    }
  }
}

// The output side of a layer's backward on columns [j0, j1): from dy [E, b, n] and z, the bias's
// gradient Σ_k dy, s's Σ_k dy ∘ z ([E, n]) and dz = dy ∘ s_m ([E, b, n]), in one pass.
BENCH_CPU_CLONES void output_grads(const float* __restrict dy, const float* __restrict z, const float* __restrict s,
                                   int64_t n_members, int64_t b, int64_t n, float* __restrict grad_bias,
                                   float* __restrict grad_s, float* __restrict dz, int64_t j0, int64_t j1) {
  for (int64_t m = 0; m < n_members; ++m) {
    float *gb = grad_bias + m * n, *gs = grad_s + m * n;
    const float* sm = s + m * n;
    for (int64_t j = j0; j < j1; ++j) gb[j] = gs[j] = 0.0f;
    for (int64_t k = 0; k < b; ++k) {
      const int64_t o = (m * b + k) * n;
      for (int64_t j = j0; j < j1; ++j) {
        const float g = dy[o + j];
        gb[j] += g;
        gs[j] += g * z[o + j];
        dz[o + j] = g * sm[j];
      }
    }
  }
}

// The input side on columns [j0, j1): from d(x ∘ r) [E, b, n] and the layer's input x, r's gradient
// Σ_k d(x ∘ r) ∘ x ([E, n]) and, with dh (a ReLU before the layer), the gradient through it:
// x <= 0 ? 0 : d(x ∘ r) ∘ r_m (ATen's threshold_backward: NaN passes).
BENCH_CPU_CLONES void input_grads(const float* __restrict dxr, const float* __restrict x, const float* __restrict r,
                                  int64_t n_members, int64_t b, int64_t n, float* __restrict grad_r,
                                  float* __restrict dh, int64_t j0, int64_t j1) {
  for (int64_t m = 0; m < n_members; ++m) {
    float* gr = grad_r + m * n;
    const float* rm = r + m * n;
    for (int64_t j = j0; j < j1; ++j) gr[j] = 0.0f;
    for (int64_t k = 0; k < b; ++k) {
      const int64_t o = (m * b + k) * n;
      for (int64_t j = j0; j < j1; ++j) gr[j] += dxr[o + j] * x[o + j];
      if (dh != nullptr)
        for (int64_t j = j0; j < j1; ++j) dh[o + j] = x[o + j] <= 0.0f ? 0.0f : dxr[o + j] * rm[j];
    }
  }
}

// Cross-entropy rows [q0, q1) of logits [E·b, C] with labels [E·b] (checked by the caller): loss[q] =
// log Σ_c exp(logit_c) − logit_y, and its gradient w (softmax − onehot(y)), w the weight of one row in
// the total loss. Shifted by the row's largest logit, as log_softmax shifts it.
BENCH_CPU_CLONES void cross_entropy_rows(const float* __restrict logits, const int64_t* __restrict labels,
                                         int64_t n_classes, float w, float* __restrict loss, float* __restrict grad,
                                         int64_t q0, int64_t q1) {
  for (int64_t q = q0; q < q1; ++q) {
    const float* zq = logits + q * n_classes;
    float* gq = grad + q * n_classes;
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t c = 0; c < n_classes; ++c) top = std::max(top, zq[c]);
    float sum = 0.0f;
    for (int64_t c = 0; c < n_classes; ++c) {
      gq[c] = std::exp(zq[c] - top);  // exp kept in the gradient's row, scaled below
      sum += gq[c];
    }
    const int64_t y = labels[q];
    loss[q] = std::log(sum) - (zq[y] - top);
    const float scale = w / sum;
    for (int64_t c = 0; c < n_classes; ++c) gq[c] *= scale;
    gq[y] -= w;
  }
}

}  // namespace fused

// loss_and_grad's (member losses [E], d loss / d logits [E, b, C]) through fused::cross_entropy_rows:
// logits [E, b, C] contiguous float32; labels [b] (shared) or [E, b]. A label outside [0, C) is an
// error, as nll_loss's.
std::tuple<Tensor, Tensor> fused_loss_and_grad(const Tensor& logits, const Tensor& labels, bool mean) {
  const int64_t n_members = logits.size(0), batch = logits.size(1), n_classes = logits.size(2);
  const Tensor lab = (labels.dim() == 1 ? labels.expand({n_members, batch}) : labels).to(at::kLong).contiguous();
  TORCH_CHECK(lab.dim() == 2 && lab.size(0) == n_members && lab.size(1) == batch,
              "cross-entropy: labels [b] or [E, b] for logits [E, b, C]");
  const int64_t* lp = lab.data_ptr<int64_t>();
  for (int64_t q = 0; q < n_members * batch; ++q)
    TORCH_CHECK_INDEX(lp[q] >= 0 && lp[q] < n_classes, "Target ", lp[q], " is out of bounds.");
  Tensor losses = at::empty({n_members, batch}, logits.options()), grad = at::empty_like(logits);
  const float w = static_cast<float>((mean ? 1.0 / static_cast<double>(n_members) : 1.0) / static_cast<double>(batch));
  const float* zp = logits.data_ptr<float>();
  float *lossp = losses.data_ptr<float>(), *gp = grad.data_ptr<float>();
  fused::by_rows(n_members * batch, n_classes, [&](int64_t q0, int64_t q1) {
    fused::cross_entropy_rows(zp, lp, n_classes, w, lossp, gp, q0, q1);
  });
  return {losses.mean(1), grad};
}

// Whether batchensemble_layers' fused path takes these operands: float32 CPU parameters, contiguous,
// at least one layer, each layer's weight [in, out], r [E, in], s and bias [E, out], each layer's in the
// last one's out, and h [E, b, in] float32 on the CPU with contiguous columns. The loops index by these
// shapes; any other operands go through ATen's operators, which refuse what does not fit.
bool fused_applies(const Tensor& h, at::TensorList params) {
  if (params.empty() || h.dim() != 3 || h.device().type() != at::kCPU || h.scalar_type() != at::kFloat ||
      h.stride(2) != 1)
    return false;
  int64_t width = h.size(2);
  for (size_t li = 0; li + 3 < params.size(); li += 4) {
    const Tensor &weight = params[li], &r = params[li + 1], &s = params[li + 2], &bias = params[li + 3];
    if (!cpu_float32_contiguous({&weight, &r, &s, &bias})) return false;
    if (weight.dim() != 2 || r.dim() != 2 || s.dim() != 2 || bias.dim() != 2 || weight.size(0) != width) return false;
    const int64_t n = weight.size(1);
    if (r.size(0) != h.size(0) || r.size(1) != width || s.size(0) != h.size(0) || s.size(1) != n ||
        bias.sizes() != s.sizes())
      return false;
    width = n;
  }
  return true;
}

// batchensemble_layers (below) with the element-wise work and the loss in the fused loops above.
std::tuple<Tensor, std::vector<Tensor>, c10::optional<Tensor>> batchensemble_layers_fused(
    const Tensor& h_in, const Tensor& labels, at::TensorList params, const c10::List<bool>& onednn, bool mean,
    bool relu_first, bool first_kernel) {
  const int64_t n_layers = static_cast<int64_t>(params.size()) / 4;
  const int64_t n_members = params[1].size(0), b = h_in.size(1), n_in = h_in.size(2);
  const auto options = params[0].options();
  std::vector<Tensor> inputs, scaled, products;  // per layer: its input x, x ∘ r, (x ∘ r) W
  {
    const Tensor inp = relu_first ? at::empty({n_members, b, n_in}, options) : h_in.contiguous();
    const Tensor xr = at::empty({n_members, b, n_in}, options);
    const float *hp = relu_first ? h_in.data_ptr<float>() : inp.data_ptr<float>(), *rp = params[1].data_ptr<float>();
    const int64_t stride_m = relu_first ? h_in.stride(0) : b * n_in, stride_k = relu_first ? h_in.stride(1) : n_in;
    float *ip = inp.data_ptr<float>(), *xp = xr.data_ptr<float>();
    fused::by_rows(n_members * b, n_in, [&](int64_t q0, int64_t q1) {
      fused::input_rows(hp, stride_m, stride_k, rp, b, n_in, relu_first, ip, xp, q0, q1);
    });
    inputs.push_back(inp);
    scaled.push_back(xr);
  }
  Tensor logits;
  for (int64_t li = 0; li < n_layers; ++li) {
    const Tensor &weight = params[4 * li], &s = params[4 * li + 2], &bias = params[4 * li + 3];
    const int64_t n = weight.size(1);
    const Tensor z = chunked_product(scaled[li].view({-1, weight.size(0)}), weight, c10::nullopt, onednn.get(li))
                         .contiguous()
                         .view({n_members, b, n});
    products.push_back(z);
    const bool last = li == n_layers - 1;
    const Tensor out = at::empty({n_members, b, n}, options), xr = last ? Tensor() : at::empty_like(out);
    const float *zp = z.data_ptr<float>(), *sp = s.data_ptr<float>(), *bp = bias.data_ptr<float>();
    const float* r_next = last ? nullptr : params[4 * li + 5].data_ptr<float>();
    float *op = out.data_ptr<float>(), *xp = last ? nullptr : xr.data_ptr<float>();
    fused::by_rows(n_members * b, n, [&](int64_t q0, int64_t q1) {
      fused::affine_rows(zp, sp, bp, r_next, b, n, op, xp, q0, q1);
    });
    if (last) {
      logits = out;
    } else {
      inputs.push_back(out);
      scaled.push_back(xr);
    }
  }
  auto [member_losses, grad] = fused_loss_and_grad(logits, labels, mean);
  std::vector<Tensor> grads(params.size());
  for (int64_t li = n_layers - 1; li >= 0; --li) {
    const Tensor &weight = params[4 * li], &r = params[4 * li + 1], &s = params[4 * li + 2];
    const Tensor& inp = inputs[li];
    const bool need_input = li > 0 || relu_first;
    const int64_t n = weight.size(1), width = weight.size(0);
    const Tensor grad_bias = at::empty({n_members, n}, options), grad_s = at::empty({n_members, n}, options);
    const Tensor dz = at::empty({n_members, b, n}, options);
    const float *gp = grad.data_ptr<float>(), *zp = products[li].data_ptr<float>(), *sp = s.data_ptr<float>();
    float *gbp = grad_bias.data_ptr<float>(), *gsp = grad_s.data_ptr<float>(), *dzp = dz.data_ptr<float>();
    fused::by_columns(n_members * b, n, [&](int64_t j0, int64_t j1) {
      fused::output_grads(gp, zp, sp, n_members, b, n, gbp, gsp, dzp, j0, j1);
    });
    grads[4 * li + 3] = grad_bias;
    grads[4 * li + 2] = grad_s;
    if (!need_input) {
      if (auto kernel = first_layer_kernel_grads(inp, dz, weight, r, first_kernel)) {
        std::tie(grads[4 * li], grads[4 * li + 1]) = *kernel;
        continue;
      }
    }
    const Tensor dz2 = dz.view({-1, n});
    grads[4 * li] = at::mm(scaled[li].view({-1, width}).t(), dz2);  // (in, out)
    const Tensor dxr = product(dz2, weight.t(), onednn.get(li)).contiguous();  // (E*b, in)
    const Tensor grad_r = at::empty({n_members, width}, options);
    const Tensor dh = need_input ? at::empty({n_members, b, width}, options) : Tensor();
    const float *dxp = dxr.data_ptr<float>(), *ip = inp.data_ptr<float>(), *rp = r.data_ptr<float>();
    float *grp = grad_r.data_ptr<float>(), *dhp = need_input ? dh.data_ptr<float>() : nullptr;
    fused::by_columns(n_members * b, width, [&](int64_t j0, int64_t j1) {
      fused::input_grads(dxp, ip, rp, n_members, b, width, grp, dhp, j0, j1);
    });
    grads[4 * li + 1] = grad_r;
    if (need_input) grad = dh;
  }
  c10::optional<Tensor> grad_h;
  if (relu_first) grad_h = grad;
  return {member_losses, grads, grad_h};
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
    bool relu_first, bool first_kernel, bool fused) {
  at::NoGradGuard no_grad;
  const int64_t n_layers = static_cast<int64_t>(params.size()) / 4;
  TORCH_CHECK(static_cast<int64_t>(params.size()) == 4 * n_layers && static_cast<int64_t>(onednn.size()) == n_layers,
              "batchensemble_layers: 4 parameters and one oneDNN flag per layer");
  if (fused && fused_applies(h_in, params))
    return batchensemble_layers_fused(h_in, labels, params, onednn, mean, relu_first, first_kernel);
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
    if (!need_input) {
      const Tensor grad_z3 = grad_z.view({r.size(0), -1, weight.size(1)});
      if (auto kernel = first_layer_kernel_grads(inp, grad_z3, weight, r, first_kernel)) {
        std::tie(grads[4 * li], grads[4 * li + 1]) = *kernel;
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

// Adam's state and settings for the classic ensemble's first-layer weight (vectorized_adam).
struct FirstLayerAdamArgs {
  Tensor exp_avg, exp_avg_sq, step;
  double lr, beta1, beta2, eps, weight_decay;
};

// manual._vectorized: the classic ensemble on a shared batch x [B, in]; weights[0] [in, E, out],
// later weights [E, in, out], biases [E, out]. Returns (member losses, weights' and biases' gradients).
// The first layer's product: oneDNN's (onednn), else torch's in the plain layout (mkl_plain, Intel CPUs)
// or the transposed one (onednn.mkl_plain_layout).
// With adam, the first layer's weight is stepped in place by first_layer_adam and its gradient is
// left out: the weights' gradients are those of layers 1 on.
std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>> vectorized_impl(
    const Tensor& x, const Tensor& labels, at::TensorList weights, at::TensorList biases, bool onednn, bool mkl_plain,
    bool mean, const FirstLayerAdamArgs* adam) {
  at::NoGradGuard no_grad;
  const int64_t n_layers = static_cast<int64_t>(weights.size());
  TORCH_CHECK(n_layers > 0 && static_cast<int64_t>(biases.size()) == n_layers, "vectorized: one bias per weight");
  const Tensor &w0 = weights[0], &b0 = biases[0];
  const int64_t n_in = w0.size(0), n_members = w0.size(1), n_out = w0.size(2), batch = x.size(0);
  const Tensor w = w0.view({n_in, -1});  // (in, E*out)
  Tensor h;  // models._members_product
  if (onednn) {
    h = onednn_matmul(x, w, b0.reshape({-1})).view({batch, n_members, n_out}).transpose(0, 1);
  } else if (mkl_plain) {
    h = chunked_product(x, w, b0.reshape({-1}), false).view({batch, n_members, n_out}).transpose(0, 1);
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
  grad_b[0] = grad.sum(1);
  if (adam == nullptr) {
    grad_w[0] = at::mm(x.t(), grad_z).view({n_in, n_members, n_out});
    return {member_losses, grad_w, grad_b};
  }
  static const auto op =  // dispatched: the profiler shows it
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("bench_core::first_layer_adam", "")
          .typed<void(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, double,
                      double, double, double, double)>();
  // Contiguous, as the kernel reads it: where the first layer's product took the transposed layout
  // (torch's, not oneDNN's, on a CPU other than Intel's), grad keeps relu(h)'s transposed strides and
  // the reshape above is a view.
  op.call(x, grad_z.contiguous(), w, adam->exp_avg.view({n_in, -1}), adam->exp_avg_sq.view({n_in, -1}), adam->step,
          adam->lr, adam->beta1, adam->beta2, adam->eps, adam->weight_decay);
  grad_w.erase(grad_w.begin());
  return {member_losses, grad_w, grad_b};
}

std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>> vectorized(
    const Tensor& x, const Tensor& labels, at::TensorList weights, at::TensorList biases, bool onednn, bool mkl_plain,
    bool mean) {
  return vectorized_impl(x, labels, weights, biases, onednn, mkl_plain, mean, nullptr);
}

// vectorized, with Adam's step on the first layer's weight made by first_layer_adam (AVX-512 CPUs):
// exp_avg, exp_avg_sq [in, E, out] and step are Adam's state for weights[0], stepped in place.
std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>> vectorized_adam(
    const Tensor& x, const Tensor& labels, at::TensorList weights, at::TensorList biases, bool onednn, bool mkl_plain,
    bool mean, const Tensor& exp_avg, const Tensor& exp_avg_sq, const Tensor& step, double lr, double beta1, double beta2,
    double eps, double weight_decay) {
  const FirstLayerAdamArgs adam{exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay};
  return vectorized_impl(x, labels, weights, biases, onednn, mkl_plain, mean, &adam);
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

// ---- Adam's step on the CPU (bench_core.optim's direct call) ------------------------------------
//
// torch.optim.Adam(fused=True).step() counts each parameter's step, torch._foreach_add_(steps, 1),
// then calls torch._fused_adam_. On the CPU _foreach_add_ adds to each one-element count on its own,
// the scalar made a tensor and copied for each: 12 counts took about 0.05 ms of a 2 ms split step
// here. This counts them in place (float and double counts, as Adam keeps them; any other through
// add_), then makes the same _fused_adam_ call: the same bits. Should that call throw, the counts are
// put back before the error goes on, so that Adam's own step counts the step once.
void count_step(const Tensor& step, int sign) {
  if (step.device().type() == at::kCPU && step.numel() == 1 && !step.requires_grad() && !step.is_inference() &&
      (step.scalar_type() == at::kFloat || step.scalar_type() == at::kDouble)) {
    if (step.scalar_type() == at::kFloat) {
      *step.data_ptr<float>() += static_cast<float>(sign);
    } else {
      *step.data_ptr<double>() += static_cast<double>(sign);
    }
    step.unsafeGetTensorImpl()->bump_version();
  } else {
    step.add_(sign);
  }
}

void adam_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
               at::TensorList steps, double lr, double beta1, double beta2, double weight_decay, double eps) {
  TORCH_CHECK(steps.size() == params.size(), "adam_step: one step count per parameter");
  size_t counted = 0;  // the counts added to so far: those are put back should anything throw
  try {
    for (; counted < steps.size(); ++counted) count_step(steps[counted], 1);
    at::_fused_adam_(params, grads, exp_avgs, exp_avg_sqs, {}, steps, lr, beta1, beta2, weight_decay, eps,
                     /*amsgrad=*/false, /*maximize=*/false);
  } catch (...) {
    for (size_t i = 0; i < counted; ++i) count_step(steps[i], -1);
    throw;
  }
}

// ---- A whole training step in one call (manual.one_call_step) -------------------------------------
//
// training._Step makes a step as a dozen Python calls around the operators above: the batch's two
// gathers, the model's checks, the parameter and Adam state lists built again, the gradients set,
// the direct Adam step (about 300 Python function calls, 0.15-0.2 ms of a 1.7 ms split step on an
// Intel Xeon). These make the same operator calls in the same order from one call, with lists built
// once per training (bit for bit the step through training._Step; tests): the batch gathered from
// the device-resident data by its indices, the forward and backward, each gradient set on its
// parameter (copied to its parameter's strides where they differ, as optim.laid_out_as_params does),
// and Adam's step through adam_step. The inner operators are called through the dispatcher, so that
// the profiler shows them by name (bench_core.bench.breakdown classifies by name).

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using AdamStepOp = void(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList, double, double,
                        double, double, double);

// Sets params[i].grad to grads[i] (laid out as its parameter), then Adam's step on params through
// adam_step: every one-call step ends so.
void set_grads_and_step(at::TensorList params, std::vector<Tensor> grads, at::TensorList exp_avgs,
                        at::TensorList exp_avg_sqs, at::TensorList steps, double lr, double beta1, double beta2,
                        double weight_decay, double eps) {
  TORCH_CHECK(params.size() == grads.size(), "one gradient per parameter");
  for (size_t i = 0; i < grads.size(); ++i) {
    const Tensor& p = params[i];
    if (!(grads[i].is_contiguous() && p.is_contiguous()) && grads[i].strides() != p.strides())
      grads[i] = at::empty_like(p).copy_(grads[i]);
    const_cast<Tensor&>(p).mutable_grad() = grads[i];
  }
  static const auto adam_op = find_op<AdamStepOp>("bench_core::adam_step");
  adam_op.call(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, weight_decay, eps);
}

// bench_core::batchensemble_layers, through the dispatcher.
const c10::TypedOperatorHandle<std::tuple<Tensor, std::vector<Tensor>, c10::optional<Tensor>>(
    const Tensor&, const Tensor&, at::TensorList, c10::List<bool>, bool, bool, bool, bool)>&
layers_op() {
  static const auto op = find_op<std::tuple<Tensor, std::vector<Tensor>, c10::optional<Tensor>>(
      const Tensor&, const Tensor&, at::TensorList, c10::List<bool>, bool, bool, bool, bool)>(
      "bench_core::batchensemble_layers");
  return op;
}

// manual._native_batchensemble with split batching, then Adam: x_all [N, in] and y_all [N] the
// training data, idx [E·b] the step's examples (member m gets the m-th b of them). params and
// onednn as batchensemble_layers; exp_avgs, exp_avg_sqs and steps Adam's state of params, in order.
Tensor batchensemble_split_step(const Tensor& x_all, const Tensor& y_all, const Tensor& idx, at::TensorList params,
                                c10::List<bool> onednn, bool mean, bool first_kernel, bool fused,
                                at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList steps, double lr,
                                double beta1, double beta2, double weight_decay, double eps) {
  at::NoGradGuard no_grad;
  TORCH_CHECK(params.size() >= 4 && params.size() % 4 == 0 && params[1].dim() == 2,
              "batchensemble_split_step: 4 parameters per layer");
  const int64_t n_members = params[1].size(0);
  const Tensor xb = x_all.index_select(0, idx).view({n_members, -1, x_all.size(1)});  // (E, b, in)
  const Tensor yb = y_all.index_select(0, idx).view({n_members, -1});  // (E, b)
  auto [member_losses, grads, grad_h] = layers_op().call(xb, yb, params, onednn, mean, false, first_kernel, fused);
  set_grads_and_step(params, std::move(grads), exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, weight_decay, eps);
  return member_losses;
}

// manual._native_batchensemble with repeat batching where the first-layer kernel runs (an AVX-512
// CPU, float32, first_kernel), then Adam: the first layer's forward on the shared batch
// (models.shared_input_batchensemble: W folded with r, every member's product in one, through oneDNN
// with first_onednn, else torch's in the plain layout with mkl_plain or the transposed one), the later
// layers through batchensemble_layers, the first layer's W and r gradients through first_layer_grads.
// params, onednn (the later layers' flags) and the rest as batchensemble_split_step.
Tensor batchensemble_repeat_step(const Tensor& x_all, const Tensor& y_all, const Tensor& idx, at::TensorList params,
                                 bool first_onednn, bool mkl_plain, c10::List<bool> onednn, bool mean, bool fused,
                                 at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList steps, double lr,
                                 double beta1, double beta2, double weight_decay, double eps) {
  at::NoGradGuard no_grad;
  TORCH_CHECK(params.size() >= 4 && params.size() % 4 == 0 && params[1].dim() == 2,
              "batchensemble_repeat_step: 4 parameters per layer");
  const Tensor &weight = params[0], &r = params[1], &s = params[2], &bias = params[3];
  const int64_t n_in = weight.size(0), n_out = weight.size(1), n_members = r.size(0);
  const Tensor xb = x_all.index_select(0, idx);  // (B, in)
  const Tensor yb = y_all.index_select(0, idx);  // (B,)
  const int64_t batch = xb.size(0);
  Tensor folded = at::empty({n_in, n_members, n_out}, weight.options());  // models._fold
  at::mul_out(folded, weight.unsqueeze(1), r.t().unsqueeze(2));
  const Tensor w = folded.view({n_in, -1});  // (in, E*out): models._members_product
  Tensor z;  // (E, B, out)
  if (first_onednn) {
    z = onednn_matmul(xb, w).view({batch, n_members, n_out}).transpose(0, 1);
  } else if (mkl_plain) {
    z = chunked_product(xb, w, c10::nullopt, false).view({batch, n_members, n_out}).transpose(0, 1);
  } else {
    z = at::matmul(w.t(), xb.t()).view({n_members, n_out, -1}).transpose(1, 2);
  }
  const Tensor h = at::addcmul(bias.unsqueeze(1), z, s.unsqueeze(1));
  static const auto grads_op = find_op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                   const Tensor&)>("bench_core::first_layer_grads");
  auto [member_losses, later, grad_h] = layers_op().call(h, yb, params.slice(4), onednn, mean, true, true, fused);
  TORCH_CHECK(grad_h.has_value(), "batchensemble_repeat_step: no gradient for the first layer's output");
  Tensor grad_z = at::empty_like(*grad_h, at::MemoryFormat::Contiguous);  // (E, B, out)
  at::mul_out(grad_z, *grad_h, s.unsqueeze(1));
  auto [grad_w, grad_r] = grads_op.call(xb.contiguous(), grad_z, weight, r);
  std::vector<Tensor> grads{grad_w, grad_r, (*grad_h * z).sum(1), grad_h->sum(1)};
  grads.insert(grads.end(), later.begin(), later.end());
  set_grads_and_step(params, std::move(grads), exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, weight_decay, eps);
  return member_losses;
}

// manual._plain, then Adam: one MLP of nn.Linear layers (a single MLP, or a member of the sequential
// classic ensemble); exp_avgs, exp_avg_sqs and steps are Adam's state of the weights, then the biases.
Tensor plain_step(const Tensor& x_all, const Tensor& y_all, const Tensor& idx, at::TensorList weights,
                  at::TensorList biases, bool mean, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                  at::TensorList steps, double lr, double beta1, double beta2, double weight_decay, double eps) {
  at::NoGradGuard no_grad;
  const Tensor xb = x_all.index_select(0, idx);  // (B, in)
  const Tensor yb = y_all.index_select(0, idx);  // (B,)
  static const auto plain_op =
      find_op<std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>>(
          const Tensor&, const Tensor&, at::TensorList, at::TensorList, bool)>("bench_core::plain");
  auto [member_losses, grad_w, grad_b] = plain_op.call(xb, yb, weights, biases, mean);
  std::vector<Tensor> params(weights.begin(), weights.end()), grads = std::move(grad_w);
  params.insert(params.end(), biases.begin(), biases.end());
  grads.insert(grads.end(), grad_b.begin(), grad_b.end());
  set_grads_and_step(params, std::move(grads), exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, weight_decay, eps);
  return member_losses;
}

// manual._native_step for the classic ensemble with its first-layer weight stepped in its gradient's
// kernel (vectorized_adam), then Adam on the rest: weights[1:] then biases, whose state is
// exp_avgs, exp_avg_sqs and steps in that order. x_all, y_all and idx as batchensemble_split_step.
Tensor vectorized_step(const Tensor& x_all, const Tensor& y_all, const Tensor& idx, at::TensorList weights,
                       at::TensorList biases, bool onednn, bool mkl_plain, bool mean, const Tensor& exp_avg,
                       const Tensor& exp_avg_sq, const Tensor& step, at::TensorList exp_avgs,
                       at::TensorList exp_avg_sqs, at::TensorList steps, double lr, double beta1, double beta2,
                       double weight_decay, double eps) {
  at::NoGradGuard no_grad;
  TORCH_CHECK(!weights.empty(), "vectorized_step: no weights");
  const Tensor xb = x_all.index_select(0, idx);  // (B, in)
  const Tensor yb = y_all.index_select(0, idx);  // (B,)
  static const auto vectorized_op =
      find_op<std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>>(
          const Tensor&, const Tensor&, at::TensorList, at::TensorList, bool, bool, bool, const Tensor&, const Tensor&,
          const Tensor&, double, double, double, double, double)>("bench_core::vectorized_adam");
  auto [member_losses, grad_w, grad_b] = vectorized_op.call(xb, yb, weights, biases, onednn, mkl_plain, mean, exp_avg,
                                                            exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay);
  std::vector<Tensor> rest(weights.begin() + 1, weights.end()), grads = std::move(grad_w);
  rest.insert(rest.end(), biases.begin(), biases.end());
  grads.insert(grads.end(), grad_b.begin(), grad_b.end());
  const_cast<Tensor&>(weights[0]).mutable_grad() = Tensor();  // stepped by the kernel: no gradient
  set_grads_and_step(rest, std::move(grads), exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, weight_decay, eps);
  return member_losses;
}

}  // namespace

TORCH_LIBRARY(bench_core, m) {
  m.def(
      "batchensemble_layers(Tensor h, Tensor labels, Tensor[] params, bool[] onednn, bool mean, bool relu_first,"
      " bool first_kernel, bool fused) -> (Tensor, Tensor[], Tensor?)");
  m.def("first_layer_grads(Tensor x, Tensor grad_z, Tensor weight, Tensor r) -> (Tensor, Tensor)");
  m.def("first_layer_fast() -> bool", &first_layer_fast);
  m.def("chunked_product(Tensor a, Tensor b, Tensor? bias) -> (Tensor, int)");
  m.def(
      "vectorized(Tensor x, Tensor labels, Tensor[] weights, Tensor[] biases, bool onednn, bool mkl_plain, bool mean)"
      " -> (Tensor, Tensor[], Tensor[])");
  m.def(
      "first_layer_adam(Tensor x, Tensor grad_z, Tensor(a!) weight, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq,"
      " Tensor(d!) step, float lr, float beta1, float beta2, float eps, float weight_decay) -> ()");
  m.def(
      "vectorized_adam(Tensor x, Tensor labels, Tensor(a!)[] weights, Tensor[] biases, bool onednn, bool mkl_plain,"
      " bool mean,"
      " Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor(d!) step, float lr, float beta1, float beta2, float eps,"
      " float weight_decay) -> (Tensor, Tensor[], Tensor[])");
  m.def("plain(Tensor x, Tensor labels, Tensor[] weights, Tensor[] biases, bool mean) -> (Tensor, Tensor[], Tensor[])");
  m.def(
      "adam_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs,"
      " Tensor(d!)[] steps, float lr, float beta1, float beta2, float weight_decay, float eps) -> ()");
  m.def(
      "batchensemble_split_step(Tensor x_all, Tensor y_all, Tensor idx, Tensor(a!)[] params, bool[] onednn, bool mean,"
      " bool first_kernel, bool fused, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] steps, float lr,"
      " float beta1, float beta2, float weight_decay, float eps) -> Tensor");
  m.def(
      "batchensemble_repeat_step(Tensor x_all, Tensor y_all, Tensor idx, Tensor(a!)[] params, bool first_onednn,"
      " bool mkl_plain, bool[] onednn, bool mean, bool fused, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs,"
      " Tensor(d!)[] steps, float lr, float beta1, float beta2, float weight_decay, float eps) -> Tensor");
  m.def(
      "plain_step(Tensor x_all, Tensor y_all, Tensor idx, Tensor(a!)[] weights, Tensor(b!)[] biases, bool mean,"
      " Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] steps, float lr, float beta1, float beta2,"
      " float weight_decay, float eps) -> Tensor");
  m.def(
      "vectorized_step(Tensor x_all, Tensor y_all, Tensor idx, Tensor(a!)[] weights, Tensor(b!)[] biases, bool onednn,"
      " bool mkl_plain, bool mean, Tensor(c!) exp_avg, Tensor(d!) exp_avg_sq, Tensor(e!) step, Tensor(f!)[] exp_avgs,"
      " Tensor(g!)[] exp_avg_sqs, Tensor(h!)[] steps, float lr, float beta1, float beta2, float weight_decay,"
      " float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(bench_core, CPU, m) {
  m.impl("batchensemble_layers", &batchensemble_layers);
  m.impl("first_layer_grads", &first_layer_grads);
  m.impl("chunked_product", &chunked_product_op);
  m.impl("vectorized", &vectorized);
  m.impl("first_layer_adam", &first_layer_adam);
  m.impl("vectorized_adam", &vectorized_adam);
  m.impl("plain", &plain);
  m.impl("adam_step", &adam_step);
  m.impl("batchensemble_split_step", &batchensemble_split_step);
  m.impl("batchensemble_repeat_step", &batchensemble_repeat_step);
  m.impl("plain_step", &plain_step);
  m.impl("vectorized_step", &vectorized_step);
}
