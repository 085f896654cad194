// 2-D convolution kernels for the CPU, called by XLA through its FFI (one_jax/cpu/kernels.py).
//
//   forward:      out[n, oh, ow, o] = sum_{i, j, c} x[n, oh*s - ph + i, ow*s - pw + j, c] w[i, j, c, o]
//   weight grad:  dw[i, j, c, o]    = sum_{n, oh, ow} x[n, oh*s - ph + i, ow*s - pw + j, c] dy[n, oh, ow, o]
//
// x, out and dy are NHWC, w and dw HWIO, float32; taps that fall outside x read zeros.
//
// Why: XLA:CPU lowers the weight gradient as a convolution over x transposed to [C, H, W, N]
// and runs it at a third of the forward convolution's speed, and its forward convolution
// reaches about half of this machine's FMA throughput on CIFAR shapes (benchmarks/NOTES.md,
// entries 9 and 10). Read in place, x, dy and out are row-major [pixels, channels] matrices:
// both kernels keep a block of the result in vector registers (a few rows of pixels or
// channels by up to four vectors of output channels) and stream the operands past it with
// one broadcast and one fused multiply-add per element pair (conv_kernels_simd.inc, compiled
// for AVX-512 and for AVX2 + FMA, picked at run time). Work is split over images on XLA's
// intra-op thread pool.
//
// On a CPU with neither (or another architecture) the library still loads and reports that it
// cannot run; one_jax then keeps XLA's own convolutions.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define ONE_JAX_X86 1
#endif

namespace ffi = xla::ffi;

namespace {

struct Shape {
  int64_t h, w, ci;    // x: [n, h, w, ci]
  int64_t oh, ow, co;  // out / dy: [n, oh, ow, co]
  int64_t kh, kw;      // w / dw: [kh, kw, ci, co]
  int64_t stride, pad_h, pad_w;
};

// Block heights (rows of pixels or channels) a kernel tries, largest first, while
// rows * V <= kMaxAccumulators; a fixed menu, so each size is one template instance.
#define ONE_JAX_FOR_EACH_BLOCK(M) M(24) M(16) M(12) M(8) M(6) M(4) M(3) M(2) M(1)

#ifdef ONE_JAX_X86

#pragma GCC push_options
#pragma GCC target("avx512f")
namespace avx512 {
using Vec = __m512;
constexpr int kLanes = 16;
constexpr int kMaxAccumulators = 24;  // of 32 registers
inline Vec Load(const float* p) { return _mm512_loadu_ps(p); }
inline void Store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline Vec Set1(float f) { return _mm512_set1_ps(f); }
inline Vec Fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec Zero() { return _mm512_setzero_ps(); }
#include "conv_kernels_simd.inc"
}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
using Vec = __m256;
constexpr int kLanes = 8;
constexpr int kMaxAccumulators = 12;  // of 16 registers
inline Vec Load(const float* p) { return _mm256_loadu_ps(p); }
inline void Store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec Set1(float f) { return _mm256_set1_ps(f); }
inline Vec Fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec Zero() { return _mm256_setzero_ps(); }
#include "conv_kernels_simd.inc"
}  // namespace avx2
#pragma GCC pop_options

// At most this level is used (tests lower it to run the AVX2 code on an AVX-512 CPU).
std::atomic<int> max_simd_level{2};

// The widest instruction set this CPU runs: 2 = AVX-512, 1 = AVX2 with FMA, 0 = neither.
int SimdLevel() {
  int level = 0;
  if (__builtin_cpu_supports("avx512f"))
    level = 2;
  else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    level = 1;
  return std::min(level, max_simd_level.load(std::memory_order_relaxed));
}

void WeightGradImages(const float* x, const float* dy, float* dw, const Shape& s, int64_t n0,
                      int64_t n1) {
  if (SimdLevel() == 2)
    avx512::WeightGradImages(x, dy, dw, s, n0, n1);
  else
    avx2::WeightGradImages(x, dy, dw, s, n0, n1);
}

void ForwardImages(const float* x, const float* w, float* out, const Shape& s, float* padded,
                   int64_t wp, int64_t n0, int64_t n1) {
  if (SimdLevel() == 2)
    avx512::ForwardImages(x, w, out, s, padded, wp, n0, n1);
  else
    avx2::ForwardImages(x, w, out, s, padded, wp, n0, n1);
}


#else

void WeightGradImages(const float*, const float*, float*, const Shape&, int64_t, int64_t) {}
void ForwardImages(const float*, const float*, float*, const Shape&, float*, int64_t, int64_t,
                   int64_t) {}
std::atomic<int> max_simd_level{0};
int SimdLevel() { return 0; }

#endif

// ------------------------------------------------------------------------------ threading

// Runs fn(k) for k in [0, slices) on the calling thread and the pool. Whoever runs claims the
// next k, so the caller never waits on a task that has not started (it may be queued behind
// the caller itself); shared ownership keeps the state alive for tasks that start late.
void ParallelFor(ffi::ThreadPool& pool, int64_t slices, std::function<void(int64_t)> fn) {
  struct State {
    std::function<void(int64_t)> fn;
    int64_t slices;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    void Work() {
      for (;;) {
        const int64_t k = next.fetch_add(1, std::memory_order_relaxed);
        if (k >= slices) return;
        fn(k);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  auto state = std::make_shared<State>();
  state->fn = std::move(fn);
  state->slices = slices;
  for (int64_t t = 1; t < slices; ++t) pool.Schedule([state] { state->Work(); });
  state->Work();
  while (state->done.load(std::memory_order_acquire) < slices) std::this_thread::yield();
}

int64_t Slices(ffi::ThreadPool& pool, int64_t batch) {
  return std::max<int64_t>(1, std::min<int64_t>(batch, pool.num_threads()));
}

// Checks what both kernels need and returns the shape; x [n, h, w, ci], y [n, oh, ow, co],
// kernel [kh, kw, ci, co].
ffi::ErrorOr<Shape> CheckShapes(ffi::Span<const int64_t> xd, ffi::Span<const int64_t> yd,
                                ffi::Span<const int64_t> kd, int64_t stride, int64_t pad_h,
                                int64_t pad_w) {
  if (xd.size() != 4 || yd.size() != 4 || kd.size() != 4)
    return ffi::Unexpected(ffi::Error::InvalidArgument("one_jax conv: operands must be 4-D"));
  if (xd[0] != yd[0] || xd[3] != kd[2] || yd[3] != kd[3] || kd[3] % 16 != 0 || stride < 1 ||
      pad_h < 0 || pad_w < 0)
    return ffi::Unexpected(ffi::Error::InvalidArgument(
        "one_jax conv: shapes disagree (NHWC data, HWIO kernel, output channels % 16 == 0)"));
  if (SimdLevel() == 0)
    return ffi::Unexpected(ffi::Error::Internal("one_jax conv: this CPU has neither AVX-512 "
                                                "nor AVX2 with FMA"));
  return Shape{xd[1], xd[2], xd[3], yd[1], yd[2], yd[3], kd[0], kd[1], stride, pad_h, pad_w};
}

ffi::Error ConvWeightGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                          ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dw,
                          int64_t stride, int64_t pad_h, int64_t pad_w) {
  auto shape = CheckShapes(x.dimensions(), dy.dimensions(), dw->dimensions(), stride, pad_h,
                           pad_w);
  if (shape.has_error()) return shape.error();
  const Shape s = shape.value();
  const int64_t size = s.kh * s.kw * s.ci * s.co;
  const int64_t batch = x.dimensions()[0];
  const int64_t slices = Slices(pool, batch);
  // Slice 0 accumulates into dw, the others into their own buffers, summed at the end.
  float* out = dw->typed_data();
  std::memset(out, 0, size * sizeof(float));
  auto partials = std::make_shared<std::vector<float>>((slices - 1) * size, 0.0f);
  const float* xp = x.typed_data();
  const float* dyp = dy.typed_data();
  ParallelFor(pool, slices, [=](int64_t k) {
    float* target = k == 0 ? out : partials->data() + (k - 1) * size;
    WeightGradImages(xp, dyp, target, s, batch * k / slices, batch * (k + 1) / slices);
  });
  for (int64_t k = 1; k < slices; ++k) {
    const float* p = partials->data() + (k - 1) * size;
    for (int64_t e = 0; e < size; ++e) out[e] += p[e];
  }
  return ffi::Error::Success();
}

ffi::Error ConvForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::F32> out, int64_t stride, int64_t pad_h,
                       int64_t pad_w) {
  auto shape = CheckShapes(x.dimensions(), out->dimensions(), w.dimensions(), stride, pad_h,
                           pad_w);
  if (shape.has_error()) return shape.error();
  const Shape s = shape.value();
  const int64_t batch = x.dimensions()[0];
  const int64_t slices = Slices(pool, batch);
  // Each slice copies its images, one at a time, into a zero-bordered buffer large enough
  // for every tap of every output pixel.
  const int64_t hp = std::max(s.pad_h + s.h, (s.oh - 1) * s.stride + s.kh);
  const int64_t wp = std::max(s.pad_w + s.w, (s.ow - 1) * s.stride + s.kw);
  const int64_t image = hp * wp * s.ci;
  auto padded = std::make_shared<std::vector<float>>(slices * image, 0.0f);
  const float* xd = x.typed_data();
  const float* wd = w.typed_data();
  float* od = out->typed_data();
  ParallelFor(pool, slices, [=](int64_t k) {
    ForwardImages(xd, wd, od, s, padded->data() + k * image, wp, batch * k / slices,
                  batch * (k + 1) / slices);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(OneJaxConvWeightGrad, ConvWeightGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dw
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("pad_h")
                                  .Attr<int64_t>("pad_w"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(OneJaxConvForward, ConvForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("pad_h")
                                  .Attr<int64_t>("pad_w"));

// The instruction set the kernels use on this CPU: 2 = AVX-512, 1 = AVX2 with FMA, 0 = none
// (one_jax then uses XLA's convolutions).
extern "C" int OneJaxConvKernelsSimdLevel() { return SimdLevel(); }

// Caps the instruction set used from now on (2 = no cap); returns the level now in use.
extern "C" int OneJaxConvKernelsCapSimdLevel(int level) {
  max_simd_level.store(level, std::memory_order_relaxed);
  return SimdLevel();
}
