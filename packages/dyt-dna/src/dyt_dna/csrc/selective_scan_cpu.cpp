// Mamba's selective scan on CPU, forward and backward, one sequential pass per (batch, channel) row.
//
//   h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t,   y_t = C_t . h_t + D x_t
//
// Layouts (all contiguous, one dtype: float, or double for float64 callers):
//   x, dt, y: (b, d, l);  A: (d, n);  B, C: (b, l, n) (the caller transposes from (b, n, l));  D: (d).
// Rows (b, d) run in parallel (at::parallel_for); the state dimension n is the vector dimension
// (ATen Vectorized, AVX-512 / AVX2 per the build). The backward recomputes the row's states forward
// (kept in a per-row buffer of l * n values), then runs the recurrence of the state gradient backward.
// Gradients of B and C (summed over d), A (summed over b) and D go to per-thread partial buffers,
// summed at the end, so no two threads write one value.
// Built by dyt_dna/scan_cpu.py through dyt.kernels.cpp_build.

// ATen and pybind11's tensor casters only, not <torch/extension.h> (the whole C++ frontend): built
// and loaded in ~20 s instead of ~27 s on the 2-core box (docs/performance.md).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <vector>

namespace {

using at::vec::Vectorized;

template <typename T>
inline Vectorized<T> load(const T* p, int64_t count) {
  return count == Vectorized<T>::size() ? Vectorized<T>::loadu(p) : Vectorized<T>::loadu(p, count);
}

template <typename T>
inline void store(const Vectorized<T>& v, T* p, int64_t count) {
  if (count == Vectorized<T>::size()) v.store(p); else v.store(p, count);
}

template <typename T>
inline T lane_sum(const Vectorized<T>& v) {
  T lanes[Vectorized<T>::size()];
  v.store(lanes);
  T total = 0;
  for (int64_t i = 0; i < Vectorized<T>::size(); ++i) total += lanes[i];
  return total;
}

// The states of one row, h_0..h_{l-1}, into hs (l * n); decay factors exp(dt_t A) into as (l * n)
// when given. Writes y for the row when y is given.
template <typename T>
void row_forward(const T* x, const T* dt, const T* A, const T* B, const T* C, T D, int64_t l, int64_t n,
                 T* h, T* hs, T* as, T* y) {
  using V = Vectorized<T>;
  std::fill(h, h + n, T(0));
  for (int64_t t = 0; t < l; ++t) {
    const T dtv = dt[t], dx = dtv * x[t];
    const T* Bt = B + t * n;
    const T* Ct = C + t * n;
    V acc(T(0));
    for (int64_t k = 0; k < n; k += V::size()) {
      const int64_t m = std::min<int64_t>(V::size(), n - k);
      const V a = (load(A + k, m) * V(dtv)).exp();
      const V hk = a * load(h + k, m) + V(dx) * load(Bt + k, m);
      store(hk, h + k, m);
      if (hs) store(hk, hs + t * n + k, m);
      if (as) store(a, as + t * n + k, m);
      if (y) acc = acc + hk * load(Ct + k, m);  // lanes past m load as zero
    }
    if (y) y[t] = lane_sum(acc) + D * x[t];
  }
}

template <typename T>
at::Tensor forward_impl(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A,
                        const at::Tensor& B, const at::Tensor& C, const at::Tensor& D) {
  const int64_t b = x.size(0), d = x.size(1), l = x.size(2), n = A.size(1);
  auto y = at::empty_like(x);
  const T *xp = x.data_ptr<T>(), *dtp = dt.data_ptr<T>(), *Ap = A.data_ptr<T>(), *Bp = B.data_ptr<T>(),
          *Cp = C.data_ptr<T>(), *Dp = D.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  at::parallel_for(0, b * d, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> h(n);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t bi = row / d, di = row % d;
      row_forward<T>(xp + row * l, dtp + row * l, Ap + di * n, Bp + bi * l * n, Cp + bi * l * n, Dp[di], l, n,
                     h.data(), nullptr, nullptr, yp + row * l);
    }
  });
  return y;
}

template <typename T>
std::vector<at::Tensor> backward_impl(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A,
                                      const at::Tensor& B, const at::Tensor& C, const at::Tensor& D,
                                      const at::Tensor& gy) {
  using V = Vectorized<T>;
  const int64_t b = x.size(0), d = x.size(1), l = x.size(2), n = A.size(1);
  const int64_t threads = at::get_num_threads();
  auto gx = at::empty_like(x), gdt = at::empty_like(x);
  auto opts = x.options();
  auto gB_part = at::zeros({threads, b, l, n}, opts), gC_part = at::zeros({threads, b, l, n}, opts);
  auto gA_part = at::zeros({threads, d, n}, opts), gD_part = at::zeros({threads, d}, opts);
  const T *xp = x.data_ptr<T>(), *dtp = dt.data_ptr<T>(), *Ap = A.data_ptr<T>(), *Bp = B.data_ptr<T>(),
          *Cp = C.data_ptr<T>(), *Dp = D.data_ptr<T>(), *gyp = gy.data_ptr<T>();
  T *gxp = gx.data_ptr<T>(), *gdtp = gdt.data_ptr<T>(), *gBp = gB_part.data_ptr<T>(), *gCp = gC_part.data_ptr<T>(),
    *gAp = gA_part.data_ptr<T>(), *gDp = gD_part.data_ptr<T>();
  at::parallel_for(0, b * d, 1, [&](int64_t begin, int64_t end) {
    const int64_t thread = at::get_thread_num();
    TORCH_CHECK(thread < threads, "selective_scan_cpu: thread ", thread, " of ", threads);
    std::vector<T> h(n), hs(l * n), as(l * n), carry(n), gA_row(n);
    const std::vector<T> zeros(n, T(0));
    for (int64_t row = begin; row < end; ++row) {
      const int64_t bi = row / d, di = row % d;
      const T *xr = xp + row * l, *dtr = dtp + row * l, *gyr = gyp + row * l, *Ad = Ap + di * n;
      const T *Bb = Bp + bi * l * n, *Cb = Cp + bi * l * n;
      T* gBb = gBp + (thread * b + bi) * l * n;
      T* gCb = gCp + (thread * b + bi) * l * n;
      row_forward<T>(xr, dtr, Ad, Bb, Cb, Dp[di], l, n, h.data(), hs.data(), as.data(), nullptr);
      std::fill(carry.begin(), carry.end(), T(0));  // exp(dt_{t+1} A) * dL/dh_{t+1}
      std::fill(gA_row.begin(), gA_row.end(), T(0));
      T gD_row = 0;
      for (int64_t t = l - 1; t >= 0; --t) {
        const T gyv = gyr[t], dtv = dtr[t], xv = xr[t];
        const T* h_prev = t > 0 ? hs.data() + (t - 1) * n : zeros.data();
        V d_dt(T(0)), d_x(T(0));
        for (int64_t k = 0; k < n; k += V::size()) {
          const int64_t m = std::min<int64_t>(V::size(), n - k);
          const V Bt = load(Bb + t * n + k, m), a = load(as.data() + t * n + k, m);
          const V gh = load(carry.data() + k, m) + V(gyv) * load(Cb + t * n + k, m);  // dL/dh_t
          store(load(gCb + t * n + k, m) + V(gyv) * load(hs.data() + t * n + k, m), gCb + t * n + k, m);
          store(load(gBb + t * n + k, m) + gh * V(dtv * xv), gBb + t * n + k, m);
          const V ga = gh * load(h_prev + k, m) * a;  // dL/d(dt_t A), through the decay
          const V Ak = load(Ad + k, m);
          d_dt = d_dt + ga * Ak + gh * Bt * V(xv);
          d_x = d_x + gh * Bt;
          store(load(gA_row.data() + k, m) + ga * V(dtv), gA_row.data() + k, m);
          store(a * gh, carry.data() + k, m);
        }
        gdtp[row * l + t] = lane_sum(d_dt);
        gxp[row * l + t] = dtv * lane_sum(d_x) + Dp[di] * gyv;
        gD_row += gyv * xv;
      }
      T* gAd = gAp + (thread * d + di) * n;
      for (int64_t k = 0; k < n; ++k) gAd[k] += gA_row[k];
      gDp[thread * d + di] += gD_row;
    }
  });
  return {gx, gdt, gA_part.sum(0), gB_part.sum(0), gC_part.sum(0), gD_part.sum(0)};
}

void check(const std::vector<at::Tensor>& tensors) {
  for (const auto& t : tensors) {
    TORCH_CHECK(t.device().is_cpu(), "selective_scan_cpu: CPU tensors only");
    TORCH_CHECK(t.is_contiguous(), "selective_scan_cpu: contiguous tensors only");
    TORCH_CHECK(t.scalar_type() == tensors[0].scalar_type(), "selective_scan_cpu: one dtype for all inputs");
  }
  TORCH_CHECK(tensors[0].scalar_type() == at::kFloat || tensors[0].scalar_type() == at::kDouble,
              "selective_scan_cpu: float32 or float64");
}

at::Tensor forward(at::Tensor x, at::Tensor dt, at::Tensor A, at::Tensor B, at::Tensor C, at::Tensor D) {
  check({x, dt, A, B, C, D});
  if (x.scalar_type() == at::kDouble) return forward_impl<double>(x, dt, A, B, C, D);
  return forward_impl<float>(x, dt, A, B, C, D);
}

std::vector<at::Tensor> backward(at::Tensor x, at::Tensor dt, at::Tensor A, at::Tensor B, at::Tensor C,
                                 at::Tensor D, at::Tensor gy) {
  check({x, dt, A, B, C, D, gy});
  if (x.scalar_type() == at::kDouble) return backward_impl<double>(x, dt, A, B, C, D, gy);
  return backward_impl<float>(x, dt, A, B, C, D, gy);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "selective scan forward: y (b, d, l)");
  m.def("backward", &backward, "selective scan backward: (dx, ddt, dA, dB, dC, dD), dB/dC as (b, l, n)");
}
