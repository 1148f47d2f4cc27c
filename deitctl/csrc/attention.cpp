// Self-attention for short sequences on the CPU (run.attention = "cpp"), fp32.
//
// One task per (image, head): S = scale * Q K^T, P = softmax(S) row by row, O = P V, with
// the tiles read straight out of the qkv projection (B x N x 3HD) and O written straight
// into the heads-side-by-side layout (B x N x HD). The backward recomputes nothing:
// dV = P^T dO, dP = dO V^T, dS = scale * P (dP - rowsum(P dP)), dQ = dS K, dK = dS^T Q,
// written into one buffer laid out as qkv. The tasks run on ATen's threads; each calls
// single-threaded BLAS (sgemm_, MKL's in PyTorch's x86 wheels) on its tiles, which stay in
// cache between the products.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/cpu/vec/functional.h>

#include <limits>
#include <vector>

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);
// MKL's per-thread thread count, where BLAS is MKL (weak: absent elsewhere).
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace {

using Vec = at::vec::Vectorized<float>;

// Row-major C (m x n) = alpha op(A) op(B), as column-major BLAS sees it: C^T = op(B)^T op(A)^T.
void gemm(bool trans_a, bool trans_b, int m, int n, int k, float alpha, const float* a, int lda,
          const float* b, int ldb, float* c, int ldc) {
  const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
  const float beta = 0.f;
  sgemm_(&ta, &tb, &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc);
}

float reduce_sum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, v);
}

void softmax_row(float* x, int64_t n) {
  float top = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
  Vec vtop(top);
  for (; i + Vec::size() <= n; i += Vec::size()) vtop = at::vec::maximum(vtop, Vec::loadu(x + i));
  top = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vtop);
  for (; i < n; ++i) top = std::max(top, x[i]);
  Vec vsum(0.f), shift(top);
  for (i = 0; i + Vec::size() <= n; i += Vec::size()) {
    Vec e = (Vec::loadu(x + i) - shift).exp_u20();
    e.store(x + i);
    vsum = vsum + e;
  }
  float sum = reduce_sum(vsum);
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] - top);
    sum += x[i];
  }
  const float inv = 1.f / sum;
  for (i = 0; i + Vec::size() <= n; i += Vec::size()) (Vec::loadu(x + i) * Vec(inv)).store(x + i);
  for (; i < n; ++i) x[i] *= inv;
}

// dS = scale * P (dP - rowsum(P dP)), in place over dP.
void softmax_backward_row(const float* p, float* dp, int64_t n, float scale) {
  int64_t i = 0;
  Vec acc(0.f);
  for (; i + Vec::size() <= n; i += Vec::size()) acc = acc + Vec::loadu(p + i) * Vec::loadu(dp + i);
  float dot = reduce_sum(acc);
  for (; i < n; ++i) dot += p[i] * dp[i];
  const Vec vdot(dot), vscale(scale);
  for (i = 0; i + Vec::size() <= n; i += Vec::size())
    (Vec::loadu(p + i) * (Vec::loadu(dp + i) - vdot) * vscale).store(dp + i);
  for (; i < n; ++i) dp[i] = p[i] * (dp[i] - dot) * scale;
}

// Runs fn(task) for every (image, head) on ATen's threads, each with single-threaded BLAS.
template <typename F>
void for_each_head(int64_t tasks, const F& fn) {
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    const int previous = MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0;
    for (int64_t t = begin; t < end; ++t) fn(t);
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous);
  });
}

void check(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), name,
              ": expected a contiguous fp32 CPU tensor");
}

}  // namespace

// qkv: B x N x 3HD -> (out: B x N x HD, probs: BH x N x N)
std::vector<at::Tensor> attention_forward(const at::Tensor& qkv, int64_t heads, double scale) {
  check(qkv, "qkv");
  const int64_t B = qkv.size(0), N = qkv.size(1), W = qkv.size(2), HD = W / 3, D = HD / heads;
  TORCH_CHECK(W == 3 * heads * D, "qkv: width not divisible into 3 x heads");
  auto out = at::empty({B, N, HD}, qkv.options());
  auto probs = at::empty({B * heads, N, N}, qkv.options());
  const float* src = qkv.data_ptr<float>();
  float* o = out.data_ptr<float>();
  float* p = probs.data_ptr<float>();
  const int n = N, d = D, w = W, hd = HD;
  for_each_head(B * heads, [&](int64_t t) {
    const int64_t b = t / heads, h = t % heads;
    const float* q = src + b * N * W + h * D;
    float* s = p + t * N * N;
    gemm(false, true, n, n, d, (float)scale, q, w, q + HD, w, s, n);  // S = scale Q K^T
    for (int64_t r = 0; r < N; ++r) softmax_row(s + r * N, N);
    gemm(false, false, n, d, n, 1.f, s, n, q + 2 * HD, w, o + b * N * HD + h * D, hd);  // O = P V
  });
  return {out, probs};
}

// grad: B x N x HD -> dqkv: B x N x 3HD
at::Tensor attention_backward(const at::Tensor& grad, const at::Tensor& qkv, const at::Tensor& probs,
                              int64_t heads, double scale) {
  check(grad, "grad");
  check(qkv, "qkv");
  check(probs, "probs");
  const int64_t B = qkv.size(0), N = qkv.size(1), W = qkv.size(2), HD = W / 3, D = HD / heads;
  auto dqkv = at::empty_like(qkv);
  const float* src = qkv.data_ptr<float>();
  const float* g = grad.data_ptr<float>();
  const float* p = probs.data_ptr<float>();
  float* dst = dqkv.data_ptr<float>();
  const int n = N, d = D, w = W, hd = HD;
  std::vector<float> scratch(at::get_num_threads() * N * N);
  for_each_head(B * heads, [&](int64_t t) {
    const int64_t b = t / heads, h = t % heads;
    const float* q = src + b * N * W + h * D;
    const float* k = q + HD;
    const float* v = q + 2 * HD;
    float* dq = dst + b * N * W + h * D;
    const float* s = p + t * N * N;
    const float* go = g + b * N * HD + h * D;
    float* ds = scratch.data() + at::get_thread_num() * N * N;
    gemm(true, false, n, d, n, 1.f, s, n, go, hd, dq + 2 * HD, w);  // dV = P^T dO
    gemm(false, true, n, n, d, 1.f, go, hd, v, w, ds, n);           // dP = dO V^T
    for (int64_t r = 0; r < N; ++r) softmax_backward_row(s + r * N, ds + r * N, N, (float)scale);
    gemm(false, false, n, d, n, 1.f, ds, n, k, w, dq, w);       // dQ = dS K
    gemm(true, false, n, d, n, 1.f, ds, n, q, w, dq + HD, w);   // dK = dS^T Q
  });
  return dqkv;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &attention_forward, "softmax(scale q k^T) v over a qkv projection");
  m.def("backward", &attention_backward, "gradient of forward with respect to qkv");
}
