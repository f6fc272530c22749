// The hand-written training steps of bench_core/manual.py, in C++: the same ATen operators in the
// same order and layouts, so losses and gradients are bit for bit the Python ones (and autograd's);
// what goes is the Python interpreter between the operators (about 95 calls in a split step).
// Built and loaded by bench_core/native.py; the operators are torch.ops.bench_core.*.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;

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
// with relu_first the gradient of h).
std::tuple<Tensor, std::vector<Tensor>, c10::optional<Tensor>> batchensemble_layers(
    const Tensor& h_in, const Tensor& labels, at::TensorList params, c10::List<bool> onednn, bool mean,
    bool relu_first) {
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
    grads[4 * li] = at::mm(scaled[li].t(), grad_z);                            // (in, out)
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
      "batchensemble_layers(Tensor h, Tensor labels, Tensor[] params, bool[] onednn, bool mean, bool relu_first)"
      " -> (Tensor, Tensor[], Tensor?)");
  m.def(
      "vectorized(Tensor x, Tensor labels, Tensor[] weights, Tensor[] biases, bool onednn, bool mean)"
      " -> (Tensor, Tensor[], Tensor[])");
  m.def("plain(Tensor x, Tensor labels, Tensor[] weights, Tensor[] biases, bool mean) -> (Tensor, Tensor[], Tensor[])");
}

TORCH_LIBRARY_IMPL(bench_core, CPU, m) {
  m.impl("batchensemble_layers", &batchensemble_layers);
  m.impl("vectorized", &vectorized);
  m.impl("plain", &plain);
}
