// Fused DyT on CPU: y = weight * tanh(alpha * x) + bias, optionally after s = x + residual.
//
// One pass forward (read x, write y), one pass backward (read x, dy, write dx) that keeps
// per-chunk partial column sums of dweight and dbias and a per-chunk dalpha, reduced at the end.
// Math runs in float for float / bfloat16 / half input, in double for double; the partials are
// summed in that type over at most 256 rows (256 vectors of T of a row for d alpha), then in double,
// and the chunks are set by the shape alone: the same bits on any thread count.
// Built by dyt/kernels/cpu_fused.py through torch.utils.cpp_extension, once per CPU capability
// (the flags select ATen's AVX2 / AVX-512 Vectorized): see that module for why.
//
// Inputs are 2-D (rows, channels) views whose last dim is contiguous (any row stride); outputs
// are contiguous. weight / bias / alpha arrive already in the compute dtype.

// Only what the file uses, not <torch/extension.h> (the whole C++ frontend): on the 2-core box it
// compiles in ~22 s instead of ~31 s (docs/performance.md, "The test suite and the first C++ builds").
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/generated/variable_factories.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__linux__) && (defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512))
#include <immintrin.h>
#include <sys/mman.h>
#include <unistd.h>
#define DYT_STREAMS_Y 1
#else
#define DYT_STREAMS_Y 0
#endif

// The step functions (and the helpers they share) are forced inline into their loops, which call them
// with `n` a constant for whole steps (no partial-load branch, and the lanes stay in registers), then
// for the whole vectors left over and a row's tail.
#if defined(__GNUC__)
#define DYT_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define DYT_ALWAYS_INLINE inline
#endif

namespace {

using at::vec::Vectorized;
using VF = Vectorized<float>;
using VD = Vectorized<double>;

// tanh of K float vectors in place, stage by stage: a rational minimax approximation, odd degree 13
// over even degree 6 (the form and coefficients of Eigen's ptanh_float), with y clamped to +-7.90531
// where it reaches +-1 in float (to 0.99999976: the backward's derivative_of_tanh takes that as
// saturated).
// 9 FMAs, 2 multiplies and one division per vector; measured 2x faster than an exp-based tanh and
// 7x faster than ATen's Sleef tanh on AVX-512 (docs/performance.md). Max abs error vs float64
// measured at 2.6e-7 to 2.8e-7 (float32 tanh's: 3e-8; dyt.selfcheck's float32 atol: 2e-6), relative
// error near 0 at 3e-7. NaN propagates: the clamp's max/min return their NaN operand.
template <int K>
DYT_ALWAYS_INLINE void fast_tanh(VF* v) {
  VF x2[K], p[K], q[K];
  for (int k = 0; k < K; ++k) v[k] = at::vec::clamp(v[k], VF(-7.90531110763549805f), VF(7.90531110763549805f));
  for (int k = 0; k < K; ++k) x2[k] = v[k] * v[k];
  for (int k = 0; k < K; ++k) p[k] = at::vec::fmadd(x2[k], VF(-2.76076847742355e-16f), VF(2.00018790482477e-13f));
  for (int k = 0; k < K; ++k) q[k] = at::vec::fmadd(x2[k], VF(1.19825839466702e-06f), VF(1.18534705686654e-04f));
  for (int k = 0; k < K; ++k) p[k] = at::vec::fmadd(p[k], x2[k], VF(-8.60467152213735e-11f));
  for (int k = 0; k < K; ++k) q[k] = at::vec::fmadd(q[k], x2[k], VF(2.26843463243900e-03f));
  for (int k = 0; k < K; ++k) p[k] = at::vec::fmadd(p[k], x2[k], VF(5.12229709037114e-08f));
  for (int k = 0; k < K; ++k) q[k] = at::vec::fmadd(q[k], x2[k], VF(4.89352518554385e-03f));
  for (int k = 0; k < K; ++k) p[k] = at::vec::fmadd(p[k], x2[k], VF(1.48572235717979e-05f));
  for (int k = 0; k < K; ++k) p[k] = at::vec::fmadd(p[k], x2[k], VF(6.37261928875436e-04f));
  for (int k = 0; k < K; ++k) p[k] = at::vec::fmadd(p[k], x2[k], VF(4.89352455891786e-03f));
  for (int k = 0; k < K; ++k) v[k] = p[k] * v[k] / q[k];
}

// double: ATen's (Sleef, 1 ulp) tanh; float64 callers want accuracy, not speed.
template <int K>
DYT_ALWAYS_INLINE void fast_tanh(VD* v) {
  for (int k = 0; k < K; ++k) v[k] = v[k].tanh();
}

// tanh's derivative 1 - t^2 from t = fast_tanh(y), 0 where t is saturated. The float tanh above stops
// at 0.99999976 (1 - t^2 = 4.8e-7; the threshold, 6e-7, also takes the float below it, 6.0e-7, and no
// lower one, 7.2e-7): left as it is, every saturated
// element would add 4.8e-7 dy w x to d alpha, growing with x (19.5 over 4096 elements at x = 1e4, where the
// gradient is 0). (Taking a constant off 1 - t^2 instead, one op less, biased d alpha by its sum over
// every element.) One compare and one blend per vector, in the backward only; a NaN stays NaN (its
// compare is false). Double: 1 - t^2 as is.
inline VF derivative_of_tanh(VF t) {
  const VF d = at::vec::fnmadd(t, t, VF(1.f));
  return VF::blendv(d, VF(0.f), d <= VF(6e-7f));
}
inline VD derivative_of_tanh(VD t) { return at::vec::fnmadd(t, t, VD(1.0)); }

// v, as the multiply that made it rounded it: an empty asm the compiler cannot see through, so it
// cannot contract that multiply and a following add into one FMA. Without it g++ (-ffp-contract=fast)
// fused weight * tanh + bias in the forward's whole steps but not in its tails: a column's bits
// depended on where in the row it fell. With it, y (and dx with ds) round the product, then the sum,
// wherever the column falls, as eager's float32 / float64 formula rounds them. The x86-64 baseline
// build (DEFAULT) has no FMA instruction to contract into.
#if defined(__GNUC__) && defined(CPU_CAPABILITY_AVX512)
DYT_ALWAYS_INLINE VF fma_barrier(VF v) { __m512 r = v; asm("" : "+v"(r)); return r; }
DYT_ALWAYS_INLINE VD fma_barrier(VD v) { __m512d r = v; asm("" : "+v"(r)); return r; }
#elif defined(__GNUC__) && defined(CPU_CAPABILITY_AVX2)
DYT_ALWAYS_INLINE VF fma_barrier(VF v) { __m256 r = v; asm("" : "+x"(r)); return r; }
DYT_ALWAYS_INLINE VD fma_barrier(VD v) { __m256d r = v; asm("" : "+x"(r)); return r; }
#else
template <typename V>
DYT_ALWAYS_INLINE V fma_barrier(V v) { return v; }
#endif

// Lanes<T>: moves `width` values of T to and from N vectors of the compute type.
template <typename T>
struct Lanes {  // float, double: compute in T itself
  using acc_t = T;
  using V = Vectorized<T>;
  static constexpr int N = 1;
  static constexpr int64_t width = V::size();
  static void load(const T* p, int64_t n, V* out) { out[0] = n == width ? V::loadu(p) : V::loadu(p, n); }
  static void store(T* p, int64_t n, const V* v) {
    if (n == width) v[0].store(p); else v[0].store(p, n);
  }
};

template <typename T>
struct ReducedLanes {  // bfloat16, half: two float vectors per vector of T
  using acc_t = float;
  using V = VF;
  static constexpr int N = 2;
  static constexpr int64_t width = Vectorized<T>::size();
  static void load(const T* p, int64_t n, V* out) {
    auto raw = n == width ? Vectorized<T>::loadu(p) : Vectorized<T>::loadu(p, n);
    std::tie(out[0], out[1]) = at::vec::convert_to_float<T>(raw);
  }
  static void store(T* p, int64_t n, const V* v) {
    auto raw = at::vec::convert_from_float<T>(v[0], v[1]);
    if (n == width) raw.store(p); else raw.store(p, n);
  }
};
template <> struct Lanes<at::BFloat16> : ReducedLanes<at::BFloat16> {};
template <> struct Lanes<at::Half> : ReducedLanes<at::Half> {};

// Loads and stores `n` (<= V::size()) values of the compute type (partial sums, parameters).
template <typename V, typename A>
inline V load_acc(const A* p, int64_t n) { return n == V::size() ? V::loadu(p) : V::loadu(p, n); }
template <typename V, typename A>
inline void store_acc(A* p, int64_t n, const V& v) { if (n == V::size()) v.store(p); else v.store(p, n); }

// An environment variable's value, lower case, without spaces ("" when unset).
std::string env_word(const char* name) {
  std::string word;
  if (const char* value = std::getenv(name))
    for (const char* c = value; *c; ++c)
      if (!std::isspace(static_cast<unsigned char>(*c))) word += static_cast<char>(std::tolower(static_cast<unsigned char>(*c)));
  return word;
}

// Whether libgomp's idle threads sleep as soon as a parallel region ends (spin count 0), from the
// environment as libgomp reads it: GOMP_SPINCOUNT when set to a count ("0", "10k", "infinite"),
// else OMP_WAIT_POLICY=PASSIVE.
bool idle_threads_sleep() {
  const std::string spin = env_word("GOMP_SPINCOUNT");
  if (spin.rfind("inf", 0) == 0) return false;
  if (!spin.empty() && std::isdigit(static_cast<unsigned char>(spin[0]))) return std::strtoull(spin.c_str(), nullptr, 10) == 0;
  return env_word("OMP_WAIT_POLICY") == "passive";
}

// Elements a parallel task must have before the kernels use another thread: ATen's grain (32K)
// where idle threads spin; 2^18 where they sleep, because waking a sleeping thread costs ~50 us a
// parallel region on the project's VM, more than a second thread saves below that size
// (docs/performance.md: chosen on 384- and 768-channel shapes, confirmed on others).
const int64_t g_task_elements = idle_threads_sleep() ? int64_t(1) << 18 : 32768;

// Rows per parallel task.
inline int64_t grain_rows(int64_t cols) { return std::max<int64_t>(1, g_task_elements / std::max<int64_t>(cols, 1)); }

// The backward's chunks of rows (each with its own partial sums): at least this many elements each,
// and at most this many chunks.
constexpr int64_t kChunkElements = 32768;
constexpr int64_t kMaxChunks = 64;

// How many vectors one step of the loops takes: forward, vectors of the compute type (a bfloat16 /
// half vector holds two); backward, vectors of T (four float vectors for bfloat16). Their dependency
// chains (the tanh alone is ~50 cycles deep) are interleaved stage by stage, so the core has
// independent work while one waits. Chosen on the AVX2 AMD EPYC (docs/performance.md, 2026-12-07
// night): the fp32 and bfloat16 backward gained at 2 vectors of T (fp32: none at 4), the forward at
// 4 compute vectors where rows stay in cache. float64 (whose tanh is a Sleef call) was not measured.
constexpr int kForwardStepComputeVectors = 4;
constexpr int kBackwardStepVectors = 2;

// Vectors of T per step for that many vectors of the compute type.
template <typename T>
constexpr int step_vectors(int compute_vectors) { return std::max(1, compute_vectors / Lanes<T>::N); }

// Vectors of T in one of the forward's steps.
template <typename T>
constexpr int kForwardStepVectors = step_vectors<T>(kForwardStepComputeVectors);

// The vectors of the compute type holding a step's first `n` columns (all of them in a whole step).
template <typename T>
constexpr int active_vectors(int64_t n) {
  using V = typename Lanes<T>::V;
  return static_cast<int>((n + V::size() - 1) / V::size());
}

// The first `n` values of T at p, to and from U * Lanes<T>::N vectors: n == U * Lanes<T>::width when
// U > 1 (a whole step), else n <= Lanes<T>::width.
template <typename T, int U>
DYT_ALWAYS_INLINE void load_step(const T* p, int64_t n, typename Lanes<T>::V* out) {
  using L = Lanes<T>;
  for (int u = 0; u < U; ++u) L::load(p + u * L::width, std::min(L::width, n - u * L::width), out + u * L::N);
}
template <typename T, int U>
DYT_ALWAYS_INLINE void store_step(T* p, int64_t n, const typename Lanes<T>::V* v) {
  using L = Lanes<T>;
  for (int u = 0; u < U; ++u) L::store(p + u * L::width, std::min(L::width, n - u * L::width), v + u * L::N);
}

// A float32 y of at least this many bytes, on pages already mapped, is written with streaming
// (non-temporal) stores: they skip the read of each line that a plain store makes first, and do not
// fill the cache with an output too large to stay there; a smaller y may still be in cache for the
// op that reads it next. Chosen on the AVX2 AMD EPYC (docs/performance.md, "2026-12-07 (late)").
// stream_min_bytes() sets it.
std::atomic<int64_t> g_stream_min_bytes{int64_t(16) << 20};
std::atomic<int64_t> g_streamed_forwards{0};  // forward calls that streamed y (tests)

// Whether the forward's whole steps of T can be streamed at all: float32 (the only dtype measured),
// AVX2 / AVX-512 on Linux.
template <typename T>
constexpr bool kStreamable = DYT_STREAMS_Y && std::is_same_v<T, float>;

// Whether forward_impl streams y: kStreamable, every row starting on a cache line (a step then writes
// whole lines, 64-byte aligned as the stores need), at least one whole step a row, at least
// g_stream_min_bytes, and a page in the middle of y already mapped (mincore). A fresh mapping, which
// glibc's defaults give every output above 32 MiB, has just been zeroed through the cache by its
// page fault; streaming over it lost on the Intel AVX-512 box and gained nothing on the AMD one.
template <typename T, int U>
bool streams_y(const at::Tensor& y) {
#if DYT_STREAMS_Y
  if constexpr (kStreamable<T>) {
    constexpr int64_t kLine = 64;
    const int64_t bytes = y.numel() * static_cast<int64_t>(sizeof(T));
    const auto address = reinterpret_cast<uintptr_t>(y.data_ptr());
    if (bytes == 0 || bytes < g_stream_min_bytes.load() || address % kLine != 0 ||
        (y.size(1) * static_cast<int64_t>(sizeof(T))) % kLine != 0 || y.size(1) < U * Lanes<T>::width)
      return false;
    const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
    unsigned char mapped = 0;
    void* middle = reinterpret_cast<void*>((address + bytes / 2) / page * page);
    return mincore(middle, page, &mapped) == 0 && (mapped & 1);
  }
#endif
  return false;
}

// Stores U float vectors at p (aligned to a vector) with streaming stores.
template <int U>
DYT_ALWAYS_INLINE void stream_step(float* p, const VF* v) {
#if DYT_STREAMS_Y && defined(CPU_CAPABILITY_AVX512)
  for (int u = 0; u < U; ++u) _mm512_stream_ps(p + u * VF::size(), v[u]);
#elif DYT_STREAMS_Y
  for (int u = 0; u < U; ++u) _mm256_stream_ps(p + u * VF::size(), v[u]);
#endif
}

// Orders a thread's streaming stores before what follows (they are weakly ordered).
inline void stream_fence() {
#if DYT_STREAMS_Y
  _mm_sfence();
#endif
}

// y = DyT(x [+ r]) for `n` columns (as load_step takes them); s = x + r is stored when r is given.
// With Stream (float32 whole steps only), y goes out through stream_step.
template <typename T, int U, bool Stream = false>
DYT_ALWAYS_INLINE void forward_step(const T* x, const T* r, T* s, T* y, const typename Lanes<T>::acc_t* w,
                                    const typename Lanes<T>::acc_t* b, typename Lanes<T>::V alpha, int64_t n) {
  static_assert(!Stream || (kStreamable<T> && U > 1), "streamed: whole steps of a streamable type");
  using L = Lanes<T>;
  using V = typename L::V;
  constexpr int K = U * L::N;
  V v[K];
  load_step<T, U>(x, n, v);
  if (r) {
    V rv[K];
    load_step<T, U>(r, n, rv);
    for (int k = 0; k < K; ++k) v[k] = v[k] + rv[k];
    store_step<T, U>(s, n, v);
    // y from s as stored (rounded to T), as eager's dyt(s) and the backward, which reads s back
    if (L::N > 1) load_step<T, U>(s, n, v);
  }
  const int active = active_vectors<T>(n);
  for (int k = 0; k < K; ++k) v[k] = alpha * v[k];
  fast_tanh<K>(v);
  for (int k = 0; k < active; ++k) {
    const int64_t off = k * V::size(), m = std::min<int64_t>(V::size(), n - off);
    v[k] = fma_barrier(v[k] * load_acc<V>(w + off, m));
    if (b) v[k] = v[k] + load_acc<V>(b + off, m);
  }
  if constexpr (Stream)
    stream_step<U>(y, v);
  else
    store_step<T, U>(y, n, v);
}

template <typename T>
void forward_impl(const at::Tensor& x, const c10::optional<at::Tensor>& residual, const at::Tensor& alpha_t,
                  const at::Tensor& weight, const c10::optional<at::Tensor>& bias, at::Tensor& y,
                  c10::optional<at::Tensor>& s) {
  using L = Lanes<T>;
  using A = typename L::acc_t;
  using V = typename L::V;
  constexpr int U = kForwardStepVectors<T>;
  const int64_t rows = x.size(0), cols = x.size(1);
  const int64_t sx = x.stride(0);
  const T* xp = x.const_data_ptr<T>();
  const T* rp = residual ? residual->const_data_ptr<T>() : nullptr;
  const int64_t sr = residual ? residual->stride(0) : 0;
  T* sp = s ? s->data_ptr<T>() : nullptr;
  T* yp = y.data_ptr<T>();
  const A* wp = weight.const_data_ptr<A>();
  const A* bp = bias ? bias->const_data_ptr<A>() : nullptr;
  const A alpha_value = *alpha_t.const_data_ptr<A>();
  const bool stream_y = streams_y<T, U>(y);
  if (stream_y) ++g_streamed_forwards;
  // Rows [begin, end), y streamed or not: a template argument, so no branch in the loop.
  auto forward_rows = [&](auto stream_tag, int64_t begin, int64_t end) {
    constexpr bool Stream = decltype(stream_tag)::value;
    // Local copies of what the loop reads: through the lambda's references the compiler would reload
    // them after every vector store (which may alias anything).
    const V alpha(alpha_value);
    const T* const x0 = xp;
    const T* const r0 = rp;
    T* const s0 = sp;
    T* const y0 = yp;
    const A* const w = wp;
    const A* const b = bp;
    const int64_t ncols = cols, x_stride = sx, r_stride = sr;
    for (int64_t row = begin; row < end; ++row) {
      const T* xrow = x0 + row * x_stride;
      const T* rrow = r0 ? r0 + row * r_stride : nullptr;
      T* srow = s0 ? s0 + row * ncols : nullptr;
      T* yrow = y0 + row * ncols;
      int64_t c = 0;
      for (; c + U * L::width <= ncols; c += U * L::width)
        forward_step<T, U, Stream>(xrow + c, rrow ? rrow + c : nullptr, srow ? srow + c : nullptr, yrow + c, w + c,
                                   b ? b + c : nullptr, alpha, U * L::width);
      for (; c < ncols; c += L::width)
        forward_step<T, 1>(xrow + c, rrow ? rrow + c : nullptr, srow ? srow + c : nullptr, yrow + c, w + c,
                           b ? b + c : nullptr, alpha, std::min(L::width, ncols - c));
    }
    if constexpr (Stream) stream_fence();
  };
  at::parallel_for(0, rows, grain_rows(cols), [&](int64_t begin, int64_t end) {
    if constexpr (kStreamable<T> && U > 1) {
      if (stream_y) return forward_rows(std::true_type{}, begin, end);
    }
    forward_rows(std::false_type{}, begin, end);
  });
}

// Rows summed in the compute type before their column sums go into the chunk's double partials, and
// vectors of T of one row (two float vectors each for bfloat16 / half) summed before they
// go into d alpha's double: float sums of more terms lose
// digits (a float sum of 20M ones stops at 2^24).
constexpr int64_t kFlushRows = 256;
constexpr int64_t kFlushVectors = 256;

// The backward of `n` columns of one row (as load_step takes them): dx = dy w tanh'(alpha x) alpha [+ ds]
// into dx; dy tanh(alpha x) added into dw, dy into db (when given), dy w tanh'(alpha x) x into da (in
// column order, as one vector at a time would).
template <typename T, int U>
DYT_ALWAYS_INLINE void backward_step(const T* x, const T* dy, const T* ds, T* dx, const typename Lanes<T>::acc_t* w,
                                     typename Lanes<T>::acc_t* dw, typename Lanes<T>::acc_t* db,
                                     typename Lanes<T>::V alpha, int64_t n, typename Lanes<T>::V& da) {
  using L = Lanes<T>;
  using V = typename L::V;
  constexpr int K = U * L::N;
  V v[K], d[K], t[K], g[K];
  load_step<T, U>(x, n, v);
  // tail lanes load as 0: they add nothing below
  load_step<T, U>(dy, n, d);
  const int active = active_vectors<T>(n);
  for (int k = 0; k < K; ++k) t[k] = alpha * v[k];
  fast_tanh<K>(t);
  for (int k = 0; k < active; ++k) {
    const int64_t off = k * V::size(), m = std::min<int64_t>(V::size(), n - off);
    store_acc(dw + off, m, at::vec::fmadd(d[k], t[k], load_acc<V>(dw + off, m)));
    if (db) store_acc(db + off, m, load_acc<V>(db + off, m) + d[k]);
    g[k] = d[k] * load_acc<V>(w + off, m) * derivative_of_tanh(t[k]);
  }
  for (int k = 0; k < active; ++k) da = at::vec::fmadd(g[k], v[k], da);
  for (int k = 0; k < active; ++k) g[k] = fma_barrier(g[k] * alpha);
  // A bfloat16 / half tail within one float vector: the other is read below (not stored), so defined.
  for (int k = active; k < K; ++k) g[k] = V(typename L::acc_t(0));
  if (ds) {
    load_step<T, U>(ds, n, d);
    for (int k = 0; k < K; ++k) g[k] = g[k] + d[k];
  }
  store_step<T, U>(dx, n, g);
}

template <typename T>
void backward_impl(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& alpha_t, const at::Tensor& weight,
                   bool has_bias, const c10::optional<at::Tensor>& ds, at::Tensor& dx, at::Tensor& dw_part,
                   at::Tensor& db_part, at::Tensor& da_part, int64_t rows_per_chunk) {
  using L = Lanes<T>;
  using A = typename L::acc_t;
  using V = typename L::V;
  constexpr int U = kBackwardStepVectors;
  static_assert(kFlushVectors % U == 0, "a d alpha span holds whole steps");
  const int64_t rows = x.size(0), cols = x.size(1);
  const int64_t chunks = dw_part.size(0);
  const T* xp = x.const_data_ptr<T>();
  const T* dyp = dy.const_data_ptr<T>();
  const T* dsp = ds ? ds->const_data_ptr<T>() : nullptr;
  const int64_t sx = x.stride(0), sdy = dy.stride(0), sds = ds ? ds->stride(0) : 0;
  T* dxp = dx.data_ptr<T>();
  const A* wp = weight.const_data_ptr<A>();
  double* dwp = dw_part.data_ptr<double>();
  double* dbp = db_part.data_ptr<double>();
  double* dap = da_part.data_ptr<double>();
  const A alpha_value = *alpha_t.const_data_ptr<A>();
  // Chunks of rows fixed by the shape alone (not by the thread count), partials indexed by chunk:
  // the sums do not depend on how many threads ran, nor on which ran which chunk. A task takes as
  // many chunks as make g_task_elements.
  const int64_t chunk_grain = std::max<int64_t>(1, g_task_elements / std::max<int64_t>(1, rows_per_chunk * cols));
  at::parallel_for(0, chunks, chunk_grain, [&](int64_t chunk_begin, int64_t chunk_end) {
    // Local copies, as in forward_impl.
    const V alpha(alpha_value);
    const T* const x0 = xp;
    const T* const dy0 = dyp;
    const T* const ds0 = dsp;
    T* const dx0 = dxp;
    const A* const w = wp;
    const int64_t ncols = cols, x_stride = sx, dy_stride = sdy, ds_stride = sds, chunk_rows = rows_per_chunk;
    std::vector<A> dw(ncols), db(has_bias ? ncols : 0);  // this block of rows' sums, in the compute type
    A* const dw0 = dw.data();
    A* const db0 = has_bias ? db.data() : nullptr;
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      double* dw_sum = dwp + chunk * ncols;
      double* db_sum = dbp + chunk * ncols;
      std::fill(dw_sum, dw_sum + ncols, 0.0);
      if (db0) std::fill(db_sum, db_sum + ncols, 0.0);
      double dalpha = 0;  // summed in V over spans of at most kFlushVectors vectors of T of a row, then in double
      const int64_t row_begin = chunk * chunk_rows, row_end = std::min(rows, (chunk + 1) * chunk_rows);
      for (int64_t block = row_begin; block < row_end; block += kFlushRows) {
        std::fill(dw.begin(), dw.end(), A(0));
        std::fill(db.begin(), db.end(), A(0));
        for (int64_t row = block; row < std::min(row_end, block + kFlushRows); ++row) {
          const T* xrow = x0 + row * x_stride;
          const T* dyrow = dy0 + row * dy_stride;
          const T* dsrow = ds0 ? ds0 + row * ds_stride : nullptr;
          T* dxrow = dx0 + row * ncols;
          for (int64_t span = 0; span < ncols; span += kFlushVectors * L::width) {
            const int64_t span_end = std::min(ncols, span + kFlushVectors * L::width);
            V da_row(A(0));
            int64_t c = span;
            for (; c + U * L::width <= span_end; c += U * L::width)
              backward_step<T, U>(xrow + c, dyrow + c, dsrow ? dsrow + c : nullptr, dxrow + c, w + c, dw0 + c,
                                  db0 ? db0 + c : nullptr, alpha, U * L::width, da_row);
            for (; c < span_end; c += L::width)
              backward_step<T, 1>(xrow + c, dyrow + c, dsrow ? dsrow + c : nullptr, dxrow + c, w + c, dw0 + c,
                                  db0 ? db0 + c : nullptr, alpha, std::min(L::width, span_end - c), da_row);
            dalpha += at::vec::vec_reduce_all<A>([](V a, V b) { return a + b; }, da_row);
          }
        }
        for (int64_t c = 0; c < ncols; ++c) dw_sum[c] += dw[c];
        if (db0)
          for (int64_t c = 0; c < ncols; ++c) db_sum[c] += db[c];
      }
      dap[chunk] = dalpha;
    }
  });
}

void check_rows(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 2 && t.sizes() == like.sizes(), name, " must be 2-D of shape ", like.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, name, "'s last dim must be contiguous");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " has dtype ", t.scalar_type(), ", x ", like.scalar_type());
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_param(const at::Tensor& p, const at::Tensor& x, int64_t numel, const char* name) {
  TORCH_CHECK(p.device().is_cpu() && p.is_contiguous() && p.numel() == numel, name, " must be a contiguous CPU tensor of ",
              numel, " elements");
  TORCH_CHECK(p.scalar_type() == acc_type(x.scalar_type()), name, " must have dtype ", acc_type(x.scalar_type()));
}

// Sum of a (chunks, cols) double partials tensor over chunks, in chunk order and in double, as
// ``dtype``: at most kMaxChunks rows, so a plain loop (no dispatch or threading overhead, which at
// small shapes cost more than the kernel's sums).
at::Tensor sum_chunks(const at::Tensor& part, at::IntArrayRef shape, at::ScalarType dtype) {
  at::Tensor out = at::empty(shape, part.options().dtype(dtype));
  const double* p = part.const_data_ptr<double>();
  const int64_t chunks = part.size(0), cols = part.size(1);
  AT_DISPATCH_FLOATING_TYPES(dtype, "dyt_cpu_sum_chunks", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    for (int64_t c = 0; c < cols; ++c) {
      double sum = 0;
      for (int64_t chunk = 0; chunk < chunks; ++chunk) sum += p[chunk * cols + c];
      o[c] = static_cast<scalar_t>(sum);
    }
  });
  return out;
}

#define DYT_DISPATCH(dtype, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, NAME, __VA_ARGS__)

// (y, s): s = x + residual when a residual is given (else undefined).
std::vector<at::Tensor> forward(const at::Tensor& x, const c10::optional<at::Tensor>& residual, const at::Tensor& alpha,
                                const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  check_rows(x, x, "x");
  if (residual) check_rows(*residual, x, "residual");
  check_param(alpha, x, 1, "alpha");
  check_param(weight, x, x.size(1), "weight");
  if (bias) check_param(*bias, x, x.size(1), "bias");
  at::Tensor y = at::empty(x.sizes(), x.options());
  c10::optional<at::Tensor> s;
  if (residual) s = at::empty(x.sizes(), x.options());
  DYT_DISPATCH(x.scalar_type(), "dyt_cpu_forward", [&] { forward_impl<scalar_t>(x, residual, alpha, weight, bias, y, s); });
  return {y, s ? *s : at::Tensor()};
}

// (dx, dalpha, dweight, dbias) in the compute dtype (dx in x's); dbias undefined without bias.
// With ds, dx also carries the gradient arriving at s = x + residual. dx is written into `into` when
// given (contiguous, x's shape and dtype; it may be dy or ds itself: each element of dy and ds is read
// before dx is written at the same place), else into a new tensor.
std::vector<at::Tensor> backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& alpha,
                                 const at::Tensor& weight, bool has_bias, const c10::optional<at::Tensor>& ds,
                                 const c10::optional<at::Tensor>& into = c10::nullopt) {
  check_rows(x, x, "x");
  check_rows(dy, x, "dy");
  if (ds) check_rows(*ds, x, "ds");
  if (into) {
    check_rows(*into, x, "into");
    TORCH_CHECK(into->is_contiguous(), "into must be contiguous");
  }
  check_param(alpha, x, 1, "alpha");
  check_param(weight, x, x.size(1), "weight");
  const int64_t rows = x.size(0), cols = x.size(1);
  // Chunks of at least kChunkElements elements, at most kMaxChunks of them: set by the shape alone, so
  // the parameter gradients are the same bits on any thread count (up to kMaxChunks threads share it).
  const int64_t min_rows = std::max<int64_t>(1, kChunkElements / std::max<int64_t>(cols, 1));
  const int64_t rows_per_chunk = std::max<int64_t>({int64_t(1), min_rows, (rows + kMaxChunks - 1) / kMaxChunks});
  const int64_t chunks = std::max<int64_t>(1, (rows + rows_per_chunk - 1) / rows_per_chunk);
  auto partials = x.options().dtype(at::kDouble);
  at::Tensor dx = into ? *into : at::empty(x.sizes(), x.options());
  at::Tensor dw_part = at::empty({chunks, cols}, partials);
  at::Tensor db_part = has_bias ? at::empty({chunks, cols}, partials) : dw_part;
  at::Tensor da_part = at::empty({chunks}, partials);
  if (rows > 0) {
    DYT_DISPATCH(x.scalar_type(), "dyt_cpu_backward", [&] {
      backward_impl<scalar_t>(dy, x, alpha, weight, has_bias, ds, dx, dw_part, db_part, da_part, rows_per_chunk);
    });
  } else {
    dw_part.zero_();
    db_part.zero_();
    da_part.zero_();
  }
  const at::ScalarType acc = acc_type(x.scalar_type());
  return {dx, sum_chunks(da_part.view({chunks, 1}), {1}, acc), sum_chunks(dw_part, {cols}, acc),
          has_bias ? sum_chunks(db_part, {cols}, acc) : at::Tensor()};
}

// ---- autograd: the backend's entry points, so a training step crosses into Python once per call
// (a Python autograd.Function and its dtype plumbing cost as much as the kernels at the tiny
// LLaMA's 1024 x 192; docs/performance.md).

// The dtype DyT math runs in: at least float, double if x or weight is double.
at::ScalarType compute_type(const at::Tensor& x, const at::Tensor& weight) {
  return at::promote_types(at::promote_types(x.scalar_type(), weight.scalar_type()), at::kFloat);
}

// The dtype the kernels read x in: x's own, unless the parameters ask for wider math (double weight
// beside float x); then x is read in the compute dtype.
at::ScalarType kernel_type(const at::Tensor& x, const at::Tensor& weight) {
  const at::ScalarType ct = compute_type(x, weight);
  return acc_type(x.scalar_type()) == ct ? x.scalar_type() : ct;
}

// The conversions below return their input untouched when it is already as the kernels read it. The
// dispatched no-ops they replace (to, detach, contiguous; with alpha's item() and the chunk sums'
// zeros above) took 8-13% of the extension's forward + backward at the tiny LLaMA's 1024 x 192
// (docs/performance.md). No autograd history is recorded either way: they run inside the autograd
// functions' forward and backward.
at::Tensor as_type(const at::Tensor& t, at::ScalarType dtype) { return t.scalar_type() == dtype ? t : t.to(dtype); }

at::Tensor as_rows(const at::Tensor& t, at::ScalarType dtype) {
  at::Tensor r = as_type(t, dtype);
  return r.size(1) <= 1 || r.stride(1) == 1 ? r : r.contiguous();
}

at::Tensor as_param(const at::Tensor& t, at::ScalarType dtype) { return as_type(t, dtype).contiguous(); }

// (y, s) in x's dtype for x [+ residual] of any float dtype and parameters of any float dtype.
std::vector<at::Tensor> forward_any(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& alpha,
                                    const at::Tensor& weight, const at::Tensor& bias) {
  const at::ScalarType kt = kernel_type(x, weight), ct = compute_type(x, weight);
  auto out = forward(as_rows(x, kt), residual.defined() ? c10::optional<at::Tensor>(as_rows(residual, kt)) : c10::nullopt,
                     as_param(alpha, ct), as_param(weight, ct),
                     bias.defined() ? c10::optional<at::Tensor>(as_param(bias, ct)) : c10::nullopt);
  out[0] = as_type(out[0], x.scalar_type());
  if (out[1].defined()) out[1] = as_type(out[1], x.scalar_type());
  return out;
}

// The buffer dx may be written into: the kernel-ready dy (else ds) when it is contiguous and either a
// copy made here or a gradient autograd handed over with no other reference (`*_owned`).
c10::optional<at::Tensor> dx_buffer(const at::Tensor& given, const at::Tensor& ready, bool owned) {
  if (!ready.defined() || !ready.is_contiguous()) return c10::nullopt;
  const bool copied = ready.unsafeGetTensorImpl() != given.unsafeGetTensorImpl();
  return copied || owned ? c10::optional<at::Tensor>(ready) : c10::nullopt;
}

// (dx, dalpha, dweight, dbias), each in its input's dtype; dbias undefined without bias.
std::vector<at::Tensor> backward_any(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& alpha,
                                     const at::Tensor& weight, bool has_bias, const at::Tensor& ds,
                                     bool dy_owned = false, bool ds_owned = false) {
  const at::ScalarType kt = kernel_type(x, weight), ct = compute_type(x, weight);
  const at::Tensor dyk = as_rows(dy, kt), dsk = ds.defined() ? as_rows(ds, kt) : at::Tensor();
  c10::optional<at::Tensor> into = dx_buffer(dy, dyk, dy_owned);
  if (!into) into = dx_buffer(ds, dsk, ds_owned);
  auto g = backward(dyk, as_rows(x, kt), as_param(alpha, ct), as_param(weight, ct), has_bias,
                    dsk.defined() ? c10::optional<at::Tensor>(dsk) : c10::nullopt, into);
  at::Tensor dalpha = g[1].sizes() == alpha.sizes() ? g[1] : g[1].reshape(alpha.sizes());
  return {as_type(g[0], x.scalar_type()), as_type(dalpha, alpha.scalar_type()), as_type(g[2], weight.scalar_type()),
          has_bias ? as_type(g[3], weight.scalar_type()) : at::Tensor()};
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Under create_graph (double backward: gradient penalties, Hessian-vector products) the gradients
// must themselves be differentiable, which the kernels' outputs are not (they would carry no history,
// and a second backward would silently leave DyT's part out): there backward runs the same formula in
// ATen ops, which autograd records. (dx, dalpha, dweight, dbias) like backward_any. The Triton
// backend's Python autograd functions run the same formula (dyt.kernels.differentiable_backward).
std::vector<at::Tensor> differentiable_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& alpha,
                                                const at::Tensor& weight, bool has_bias, const at::Tensor& ds) {
  const at::ScalarType ct = compute_type(x, weight);
  const at::Tensor xc = x.to(ct), dyc = dy.to(ct), a = alpha.to(ct), w = weight.to(ct);
  const at::Tensor t = at::tanh(a * xc);
  const at::Tensor g = dyc * w * (1 - t * t);
  at::Tensor dx = g * a;
  if (ds.defined()) dx = dx + ds.to(ct);
  const std::vector<int64_t> rows = {0};
  return {dx.to(x.scalar_type()), (g * xc).sum().reshape(alpha.sizes()).to(alpha.scalar_type()),
          (dyc * t).sum(rows).to(weight.scalar_type()), has_bias ? dyc.sum(rows).to(weight.scalar_type()) : at::Tensor()};
}

// ---- writing dx over the incoming gradient (what Liger-Kernel's in-place RMSNorm backward does, but
// only when nothing else can see that gradient). In a model the gradient reaching a norm is a
// temporary that no one else holds; writing dx into it saves allocating an activation-sized tensor
// per backward (and, above glibc's mmap threshold, faulting in its pages: docs/performance.md).
// Ownership is judged like autograd's AccumulateGrad judges whether it may keep a gradient: by the
// tensor's reference count and its storage's. The count an unshared gradient shows inside
// Function::backward depends on how the engine passes it, so it is measured once at import
// (`calibrate_owned_refs`); a held gradient (`y.backward(g)` with the caller keeping g), one kept by a
// hook or retained, one still waiting for another branch, a view of a larger buffer, and any
// gradient under create_graph are never written over.

std::atomic<int64_t> g_owned_refs{0};      // the reference count of an unshared gradient; 0: never reuse
std::atomic<bool> g_reuse_enabled{true};   // reuse_gradient_buffers(False) turns it off
std::atomic<int64_t> g_probe_refs{0};

bool owned_gradient(const at::Tensor& g) {
  const int64_t refs = g_owned_refs.load();
  if (!g.defined() || refs == 0 || !g_reuse_enabled.load() || at::GradMode::is_enabled() || !g.has_storage() ||
      g.is_inference() || g.use_count() > refs)
    return false;
  if (!g.is_view()) return g.storage().use_count() == 1;
  // A reshape of a model's (batch, tokens, channels) gradient to rows is a view that keeps its base
  // alive: owned when the view alone holds the base, and the base's storage is held by the two only.
  const at::TensorBase& base = g._base();
  return base.use_count() == 1 && g.storage().use_count() == 2 && g.numel() == base.numel();
}

// Records the reference count of the gradient its backward receives, from the same parameter
// position as DyTFunction's backward.
struct RefCountProbe : public torch::autograd::Function<RefCountProbe> {
  static at::Tensor forward(AutogradContext*, const at::Tensor& x) { return x * 2; }
  static variable_list backward(AutogradContext*, variable_list grads) {
    g_probe_refs = static_cast<int64_t>(grads[0].use_count());
    return {grads[0] * 2};
  }
};

int64_t probe_refs(bool caller_holds_gradient) {
  c10::InferenceMode not_inference(false);
  at::AutoGradMode grad_on(true);
  at::Tensor x = torch::zeros({2}, at::TensorOptions().requires_grad(true));
  at::Tensor y = RefCountProbe::apply(x);
  if (caller_holds_gradient) {
    at::Tensor g = torch::ones({2});
    torch::autograd::backward({y}, {g});
  } else {
    torch::autograd::backward({(y * 3).sum()});  // y's gradient: the product's, a temporary
  }
  return g_probe_refs.load();
}

// The count an unshared gradient shows, checked against one the caller also holds (which must show
// more); 0 (never reuse) when they do not differ or the probe fails.
int64_t calibrate_owned_refs() {
  try {
    const int64_t owned = probe_refs(false), held = probe_refs(true);
    return held > owned ? owned : 0;
  } catch (const std::exception&) {
    return 0;
  }
}

struct DyTFunction : public torch::autograd::Function<DyTFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& alpha, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias) {
    ctx->save_for_backward({x, alpha, weight});
    ctx->saved_data["has_bias"] = bias.has_value();
    return forward_any(x, at::Tensor(), alpha, weight, bias.value_or(at::Tensor()))[0];
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    auto g = at::GradMode::is_enabled()
                 ? differentiable_backward(grads[0], saved[0], saved[1], saved[2], has_bias, at::Tensor())
                 : backward_any(grads[0], saved[0], saved[1], saved[2], has_bias, at::Tensor(), owned_gradient(grads[0]));
    return {g[0], g[1], g[2], g[3]};
  }
};

// (s, y) = (x + residual, DyT(x + residual)); backward takes the gradients at s and y in one pass.
struct ResidualDyTFunction : public torch::autograd::Function<ResidualDyTFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& residual,
                               const at::Tensor& alpha, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias) {
    auto out = forward_any(x, residual, alpha, weight, bias.value_or(at::Tensor()));
    ctx->set_materialize_grads(false);  // an unused s or y arrives undefined, not as zeros to read
    ctx->save_for_backward({out[1], alpha, weight});
    ctx->saved_data["has_bias"] = bias.has_value();
    return {out[1], out[0]};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor &ds = grads[0], &dy = grads[1];
    if (!dy.defined()) return {ds, ds, at::Tensor(), at::Tensor(), at::Tensor()};
    const auto saved = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    auto g = at::GradMode::is_enabled()
                 ? differentiable_backward(dy, saved[0], saved[1], saved[2], has_bias, ds)
                 : backward_any(dy, saved[0], saved[1], saved[2], has_bias, ds, owned_gradient(dy), owned_gradient(ds));
    return {g[0], g[0], g[1], g[2], g[3]};
  }
};

at::Tensor dyt(const at::Tensor& x, const at::Tensor& alpha, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  return DyTFunction::apply(x, alpha, weight, bias);
}

variable_list residual_dyt(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& alpha,
                           const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  return ResidualDyTFunction::apply(x, residual, alpha, weight, bias);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused DyT forward / backward (and residual-add + DyT) for CPU tensors";
  m.def("forward", &forward, "(y, s) = (DyT(x [+ residual]), x + residual)", py::arg("x"), py::arg("residual"),
        py::arg("alpha"), py::arg("weight"), py::arg("bias"));
  m.def("backward", &backward, "(dx, dalpha, dweight, dbias); dx written into `into` when given", py::arg("dy"),
        py::arg("x"), py::arg("alpha"), py::arg("weight"), py::arg("has_bias"), py::arg("ds"),
        py::arg("into") = py::none());
  m.def("dyt", &dyt, "DyT(x) with autograd, any float dtypes", py::arg("x"), py::arg("alpha"), py::arg("weight"),
        py::arg("bias"));
  m.def("residual_dyt", &residual_dyt, "(x + residual, DyT(x + residual)) with autograd", py::arg("x"),
        py::arg("residual"), py::arg("alpha"), py::arg("weight"), py::arg("bias"));
  {
    py::gil_scoped_release no_gil;  // the autograd engine refuses to run while the GIL is held
    g_owned_refs = calibrate_owned_refs();
  }
  m.def(
      "reuse_gradient_buffers",
      [](c10::optional<bool> enabled) {
        if (enabled) g_reuse_enabled = *enabled;
        return g_reuse_enabled.load() && g_owned_refs.load() > 0;
      },
      "Whether backward writes dx over an unshared incoming gradient; sets it when given a bool",
      py::arg("enabled") = py::none());
  m.def(
      "stream_min_bytes",
      [](c10::optional<int64_t> bytes) {
        if (bytes) g_stream_min_bytes = *bytes;
        return g_stream_min_bytes.load();
      },
      "The size from which a float32 y on mapped pages is written with streaming stores; sets it when given",
      py::arg("bytes") = py::none());
  m.def("streamed_forwards", [] { return g_streamed_forwards.load(); },
        "How many forward calls in this process have written y with streaming stores");
  m.def(
      "streams_y",
      [](const at::Tensor& y) {
        TORCH_CHECK(y.dim() == 2, "y must be 2-D (rows, cols)");
        bool stream_y = false;
        DYT_DISPATCH(y.scalar_type(), "dyt_cpu_streams_y",
                     [&] { stream_y = streams_y<scalar_t, kForwardStepVectors<scalar_t>>(y); });
        return stream_y;
      },
      "Whether the forward would write this (rows, cols) tensor as y with streaming stores");
  m.def("task_elements", [] { return g_task_elements; },
        "Elements a parallel task needs before the kernels use another thread (2^18 where idle OpenMP "
        "threads sleep, else 32768)");
  m.def("owned_gradient_refs", [] { return g_owned_refs.load(); },
        "The reference count an unshared gradient shows in backward (measured at import; 0: never reused)");
}
