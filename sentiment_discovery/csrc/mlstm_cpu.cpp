// Element-wise work of one fused mLSTM step on CPU, forward and backward, in one pass each.
//
// The Python loop in mlstm_kernels.py runs the two matrix products of a step through oneDNN/MKL;
// everything between them (gate non-linearities, cell update, their derivatives) is ~12 separate
// PyTorch calls per step, each a pass over [B, H] or [B, 4H] memory. These kernels do that work in
// one pass, rows split over torch's intra-op threads. Float32 only; gate order i, f, g, o.
// tanh(x) is 2 * sigmoid(2x) - 1, as in the Python path (equal to torch.tanh within ~1e-7).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace {

// exp(x), branch-free so that the loops calling it vectorize: Cephes' expf polynomial after range
// reduction by powers of 2 (relative error ~1e-7). NaN stays NaN; x is clamped to float's range.
inline float exp_approx(float x) {
  x = x > 88.0f ? 88.0f : x;
  x = x < -87.0f ? -87.0f : x;
  const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

inline float sigmoid(float x) { return 1.0f / (1.0f + exp_approx(-x)); }
inline float tanh_(float x) { return 2.0f * sigmoid(2.0f * x) - 1.0f; }

void check_rows(const at::Tensor& t, int64_t rows, int64_t cols, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name, ": a float32 CPU tensor");
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols && t.stride(1) == 1, name,
              ": expected [", rows, ", ", cols, "] with contiguous rows, got ", t.sizes(), " strides ", t.strides());
}

// Rows per task: enough work per thread to pay for the split.
int64_t grain(int64_t hidden) { return std::max<int64_t>(1, 16384 / (4 * hidden)); }

// One step forward. z: the pre-activations [B, 4H] (rows may be strided). Writes c_out = f * c_prev + i * tanh(g), h_out = o * tanh(c_out); with
// `training`, also the activated gates (i, f, tanh(g), o) into z and tanh(c_out) into tanh_c_out.
// c_out may be c_prev (in place).
template <bool kTraining>
void forward_rows(int64_t begin, int64_t end, int64_t H, float* z, int64_t sz, const float* cp, int64_t scp, float* co, int64_t sco, float* tco, int64_t stco, float* ho,
                  int64_t sho) {
  for (int64_t b = begin; b < end; ++b) {
    float* zr = z + b * sz;
    const float* cpr = cp + b * scp;
    float* cor = co + b * sco;
    float* hor = ho + b * sho;
    float* tcor = kTraining ? tco + b * stco : nullptr;
#pragma GCC ivdep
    for (int64_t j = 0; j < H; ++j) {
      const float i = sigmoid(zr[j]);
      const float f = sigmoid(zr[H + j]);
      const float g = tanh_(zr[2 * H + j]);
      const float o = sigmoid(zr[3 * H + j]);
      const float c = f * cpr[j] + i * g;
      const float tc = tanh_(c);
      cor[j] = c;
      hor[j] = o * tc;
      if (kTraining) {
        zr[j] = i;
        zr[H + j] = f;
        zr[2 * H + j] = g;
        zr[3 * H + j] = o;
        tcor[j] = tc;
      }
    }
  }
}

void forward_step(at::Tensor z, const at::Tensor& c_prev, at::Tensor c_out,
                  const c10::optional<at::Tensor>& tanh_c_out, at::Tensor h_out) {
  const int64_t B = z.size(0), H = z.size(1) / 4;
  check_rows(z, B, 4 * H, "z");
  check_rows(c_prev, B, H, "c_prev");
  check_rows(c_out, B, H, "c_out");
  check_rows(h_out, B, H, "h_out");
  float* zp = z.data_ptr<float>();
  const float* cpp = c_prev.data_ptr<float>();
  float* cop = c_out.data_ptr<float>();
  float* hop = h_out.data_ptr<float>();
  const int64_t sz = z.stride(0), scp = c_prev.stride(0), sco = c_out.stride(0),
                sho = h_out.stride(0);
  if (tanh_c_out.has_value()) {
    const at::Tensor& tc = *tanh_c_out;
    check_rows(tc, B, H, "tanh_c_out");
    float* tcp = tc.data_ptr<float>();
    const int64_t stc = tc.stride(0);
    at::parallel_for(0, B, grain(H), [&](int64_t begin, int64_t end) {
      forward_rows<true>(begin, end, H, zp, sz, cpp, scp, cop, sco, tcp, stc, hop, sho);
    });
  } else {
    at::parallel_for(0, B, grain(H), [&](int64_t begin, int64_t end) {
      forward_rows<false>(begin, end, H, zp, sz, cpp, scp, cop, sco, nullptr, 0, hop, sho);
    });
  }
}

// One step backward, before its products. gates: activated (i, f, tanh(g), o) [B, 4H]; dh: gradient
// of h from the step after (plus d_out, if given); dc: of c from the step after, replaced by the
// gradient reaching c_prev (dc * f). Writes dz [B, 4H], the gradient of the pre-activations.
template <bool kOut, bool kCell>
void backward_rows(int64_t begin, int64_t end, int64_t H, const float* gates, int64_t sg, const float* dh,
                   int64_t sdh, const float* d_out, int64_t sdo, const float* d_cell, int64_t sdcl, float* dc,
                   int64_t sdc, const float* cp, int64_t scp, const float* tc, int64_t stc, float* dz, int64_t sdz) {
  for (int64_t b = begin; b < end; ++b) {
    const float* gr = gates + b * sg;
    const float* dhr = dh + b * sdh;
    const float* dor = kOut ? d_out + b * sdo : nullptr;
    const float* dclr = kCell ? d_cell + b * sdcl : nullptr;
    float* dcr = dc + b * sdc;
    const float* cpr = cp + b * scp;
    const float* tcr = tc + b * stc;
    float* dzr = dz + b * sdz;
#pragma GCC ivdep
    for (int64_t j = 0; j < H; ++j) {
      const float i = gr[j], f = gr[H + j], g = gr[2 * H + j], o = gr[3 * H + j], t = tcr[j];
      const float h_grad = kOut ? dhr[j] + dor[j] : dhr[j];
      float c_grad = dcr[j] + h_grad * o * (1.0f - t * t);
      if (kCell) c_grad += dclr[j];
      dzr[j] = c_grad * g * i * (1.0f - i);
      dzr[H + j] = c_grad * cpr[j] * f * (1.0f - f);
      dzr[2 * H + j] = c_grad * i * (1.0f - g * g);
      dzr[3 * H + j] = h_grad * t * o * (1.0f - o);
      dcr[j] = c_grad * f;
    }
  }
}

void backward_step(const at::Tensor& gates, const at::Tensor& dh, const c10::optional<at::Tensor>& d_out,
                   const c10::optional<at::Tensor>& d_cell, at::Tensor dc, const at::Tensor& c_prev,
                   const at::Tensor& tanh_c, at::Tensor dz) {
  const int64_t B = gates.size(0), H = gates.size(1) / 4;
  check_rows(gates, B, 4 * H, "gates");
  check_rows(dh, B, H, "dh");
  check_rows(dc, B, H, "dc");
  check_rows(c_prev, B, H, "c_prev");
  check_rows(tanh_c, B, H, "tanh_c");
  check_rows(dz, B, 4 * H, "dz");
  const float* do_p = nullptr;
  const float* dcl_p = nullptr;
  int64_t sdo = 0, sdcl = 0;
  if (d_out.has_value()) {
    check_rows(*d_out, B, H, "d_out");
    do_p = d_out->data_ptr<float>();
    sdo = d_out->stride(0);
  }
  if (d_cell.has_value()) {
    check_rows(*d_cell, B, H, "d_cell");
    dcl_p = d_cell->data_ptr<float>();
    sdcl = d_cell->stride(0);
  }
  const float* gp = gates.data_ptr<float>();
  const float* dhp = dh.data_ptr<float>();
  float* dcp = dc.data_ptr<float>();
  const float* cpp = c_prev.data_ptr<float>();
  const float* tcp = tanh_c.data_ptr<float>();
  float* dzp = dz.data_ptr<float>();
  const int64_t sg = gates.stride(0), sdh = dh.stride(0), sdc = dc.stride(0), scp = c_prev.stride(0),
                stc = tanh_c.stride(0), sdz = dz.stride(0);
  at::parallel_for(0, B, grain(H), [&](int64_t begin, int64_t end) {
#define SD_BACKWARD_ROWS(OUT, CELL)                                                                      \
  backward_rows<OUT, CELL>(begin, end, H, gp, sg, dhp, sdh, do_p, sdo, dcl_p, sdcl, dcp, sdc, cpp, scp, tcp, \
                           stc, dzp, sdz)
    if (do_p && dcl_p) SD_BACKWARD_ROWS(true, true);
    else if (do_p) SD_BACKWARD_ROWS(true, false);
    else if (dcl_p) SD_BACKWARD_ROWS(false, true);
    else SD_BACKWARD_ROWS(false, false);
#undef SD_BACKWARD_ROWS
  });
}

}  // namespace

TORCH_LIBRARY(sentiment_discovery, m) {
  m.def("mlstm_forward_step(Tensor(a!) z, Tensor c_prev, Tensor(b!) c_out, "
        "Tensor(c!)? tanh_c_out, Tensor(d!) h_out) -> ()");
  m.def("mlstm_backward_step(Tensor gates, Tensor dh, Tensor? d_out, Tensor? d_cell, Tensor(a!) dc, "
        "Tensor c_prev, Tensor tanh_c, Tensor(b!) dz) -> ()");
}

TORCH_LIBRARY_IMPL(sentiment_discovery, CPU, m) {
  m.impl("mlstm_forward_step", forward_step);
  m.impl("mlstm_backward_step", backward_step);
}
