// Copyright 2026 The etcjax Authors. Licensed under the Apache License, Version 2.0.
//
// XLA:CPU FFI kernels for ConvMixer's depthwise k x k convolution in the channel-major
// layout of etcjax/models/convmixer.py ("CNHW"), float32. Every (channel, image) pair is
// an independent H x W plane filtered with its channel's k x k taps:
//
//   etcjax_depthwise_conv_f32     x (C, N, H, W), taps (C, k, k)  ->  (C, N, H, W)
//       out[c, n, h, w] = sum_ij xpad[c, n, h + i, w + j] * taps[c, i, j]
//   etcjax_depthwise_tapgrad_f32  x (C, N, H, W), g (C, N, H, W)  ->  (C, N, k, k)
//       out[c, n, i, j] = sum_hw xpad[c, n, h + i, w + j] * g[c, n, h, w]
//
// where xpad has `pad` zero rows / columns before and k - 1 - pad after. The forward pass
// is the conv with pad = (k - 1) / 2; the input gradient is the same conv of the output
// gradient with the taps rotated by 180 degrees and pad = k - 1 - (k - 1) / 2; the kernel
// gradient is the tap gradient summed over n (left to XLA, so that a batch-sharded program
// reduces across devices as usual).
//
// Why a kernel: XLA:CPU runs the grouped convolution ~25x slower than PyTorch, and its best
// fused formulation (shifted multiply-adds) at ~25 GFLOP/s on a 2-core AVX-512 machine,
// ~2.5 s of a 4.7 s ConvMixer-256/8 training step. Here each plane is copied into a
// zero-padded scratch tile that stays in L1, and blocks of R output rows x NV vectors
// (conv) or of J taps x NV vectors (tap gradient) accumulate in registers, one load per
// fused multiply-add.
//
// Vector code uses GCC / Clang vector extensions; on x86-64 it is compiled for AVX-512,
// AVX2 + FMA and the SSE2 baseline and picked at run time (attribute `isa`: -1 for the
// best this CPU runs, or 0 / 1 / 2 to force one, for tests). Other CPUs get the 4-lane
// version (NEON on ARM64). Planes are split over XLA's intra-op thread pool.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <string>

#include "ffi_util.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace etcjax {
namespace {

#if defined(__GNUC__) && !defined(__clang__)
// The 32- and 64-byte vector types only cross function boundaries inside always-inlined
// code compiled for the matching target; the ABI note does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define ETCJAX_X86_DISPATCH 1
#endif

#define ETCJAX_INLINE inline __attribute__((always_inline))

typedef float V4 __attribute__((vector_size(16)));
typedef float V8 __attribute__((vector_size(32)));
typedef float V16 __attribute__((vector_size(64)));

template <typename V>
constexpr int kLanes = static_cast<int>(sizeof(V) / sizeof(float));

template <typename V>
ETCJAX_INLINE V Load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));  // an unaligned vector load
  return v;
}

template <typename V>
ETCJAX_INLINE void Store(float* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

template <typename V>
ETCJAX_INLINE float Sum(const V& v) {
  float s = 0.0f;
  for (int l = 0; l < kLanes<V>; ++l) s += v[l];
  return s;
}

constexpr int64_t RoundUp(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// One call: the planes and their geometry.
struct Job {
  const float* x = nullptr;
  const float* other = nullptr;  // conv: taps (C, k, k); tap gradient: g (C, N, H, W)
  float* out = nullptr;
  int64_t c = 0, n = 0, h = 0, w = 0, k = 0, pad = 0;
  int64_t planes() const { return c * n; }
};

// A zeroed float buffer aligned to 64 bytes (whole cache lines, aligned vector loads).
class AlignedFloats {
 public:
  explicit AlignedFloats(int64_t n)
      : data_(new (std::align_val_t(64)) float[static_cast<size_t>(std::max<int64_t>(n, 1))]()) {}
  float* data() { return data_.get(); }

 private:
  struct Free {
    void operator()(float* p) const { ::operator delete[](p, std::align_val_t(64)); }
  };
  std::unique_ptr<float[], Free> data_;
};

// A zero-padded copy of one plane: `rows` rows of `stride` floats, the plane's rows at
// (pad + r) * stride + pad. Nothing else is ever written, so the border stays zero.
class Tile {
 public:
  Tile(const Job& job, int64_t rows, int64_t stride)
      : job_(job), stride_(stride), buf_(rows * stride) {}

  const float* Fill(const float* plane) {
    float* dst = buf_.data() + job_.pad * stride_ + job_.pad;
    for (int64_t r = 0; r < job_.h; ++r) {
      std::memcpy(dst + r * stride_, plane + r * job_.w, job_.w * sizeof(float));
    }
    return buf_.data();
  }

 private:
  const Job& job_;
  int64_t stride_;
  AlignedFloats buf_;
};

// ---------------------------------------------------------------------------------- conv

// R output rows x NV vectors of one plane:
//   out[q][v] = sum_ij in[(q + i) * stride + j + v * L] * taps[i * k + j].
// Each input vector is loaded once and used for every output row it reaches (input row r
// meets output row q through tap row i = r - q), so there are ~R times fewer of the
// unaligned loads, most of which straddle two cache lines.
template <typename V, int R, int NV>
ETCJAX_INLINE void ConvBlock(const float* in, int64_t stride, const float* taps, int64_t k,
                             float* out, int64_t out_stride) {
  constexpr int L = kLanes<V>;
  V acc[R][NV];
  for (int q = 0; q < R; ++q) {
    for (int v = 0; v < NV; ++v) acc[q][v] = V{};
  }
  for (int64_t r = 0; r < R + k - 1; ++r) {
    const float* row = in + r * stride;
    for (int64_t j = 0; j < k; ++j) {
      V x[NV];
      for (int v = 0; v < NV; ++v) x[v] = Load<V>(row + j + v * L);
#pragma GCC unroll 16
      for (int q = 0; q < R; ++q) {
        const int64_t i = r - q;
        if (i < 0 || i >= k) continue;
        const float tap = taps[i * k + j];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[q][v] += x[v] * tap;
      }
    }
  }
  for (int q = 0; q < R; ++q) {
    for (int v = 0; v < NV; ++v) Store(out + q * out_stride + v * L, acc[q][v]);
  }
}

template <typename V, int R, int NV>
ETCJAX_INLINE void ConvPlanes(const Job& job, int64_t first, int64_t last) {
  constexpr int64_t kCols = kLanes<V> * NV;
  const int64_t h = job.h, w = job.w, k = job.k;
  const int64_t hv = RoundUp(h, R), wv = RoundUp(w, kCols);
  const int64_t stride = RoundUp(wv + k, kLanes<V>);
  Tile tile(job, hv + k - 1, stride);
  // Results go straight to the output when its rows are whole blocks; else via `staged`.
  const bool direct = hv == h && wv == w;
  AlignedFloats staged(direct ? 0 : hv * wv);
  for (int64_t p = first; p < last; ++p) {
    const float* in = tile.Fill(job.x + p * h * w);
    const float* taps = job.other + (p / job.n) * k * k;
    float* dst = job.out + p * h * w;
    float* res = direct ? dst : staged.data();
    for (int64_t r0 = 0; r0 < hv; r0 += R) {
      for (int64_t c0 = 0; c0 < wv; c0 += kCols) {
        ConvBlock<V, R, NV>(in + r0 * stride + c0, stride, taps, k, res + r0 * wv + c0, wv);
      }
    }
    if (!direct) {
      for (int64_t r = 0; r < h; ++r) {
        std::memcpy(dst + r * w, res + r * wv, w * sizeof(float));
      }
    }
  }
}

// -------------------------------------------------------------------------- tap gradient

// Taps (i0 .. i0 + I - 1, j) of one plane, in I x NV vector sums:
//   out[ii] = sum_{row, col} in[(row + i0 + ii) * stride + col + j] * g[row * g_stride + col].
// Looping over input rows, each (unaligned, usually cache-line-straddling) input vector is
// loaded once for all I tap rows it meets; the g vectors it pairs with are aligned.
template <typename V, int I, int NV>
ETCJAX_INLINE void TapGradBlock(const float* in, int64_t stride, const float* g,
                                int64_t g_stride, int64_t rows, int64_t cols, int64_t i0,
                                int64_t valid, int64_t j, float* out, int64_t out_stride) {
  constexpr int L = kLanes<V>;
  V acc[I][NV];
  for (int ii = 0; ii < I; ++ii) {
    for (int v = 0; v < NV; ++v) acc[ii][v] = V{};
  }
  for (int64_t c0 = 0; c0 < cols; c0 += L * NV) {
    // Input row r meets g row r - i0 - ii.
    for (int64_t r = i0; r < i0 + valid - 1 + rows; ++r) {
      const float* xr = in + r * stride + c0 + j;
      V x[NV];
      for (int v = 0; v < NV; ++v) x[v] = Load<V>(xr + v * L);
#pragma GCC unroll 16
      for (int ii = 0; ii < I; ++ii) {
        const int64_t row = r - i0 - ii;
        if (row < 0 || row >= rows) continue;
        const float* gr = g + row * g_stride + c0;
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[ii][v] += x[v] * Load<V>(gr + v * L);
      }
    }
  }
  for (int ii = 0; ii < valid; ++ii) {
    V s = acc[ii][0];
    for (int v = 1; v < NV; ++v) s += acc[ii][v];
    out[(i0 + ii) * out_stride + j] = Sum(s);
  }
}

template <typename V, int I, int NV>
ETCJAX_INLINE void TapGradPlanes(const Job& job, int64_t first, int64_t last) {
  constexpr int64_t kCols = kLanes<V> * NV;
  const int64_t h = job.h, w = job.w, k = job.k;
  const int64_t wv = RoundUp(w, kCols);
  // Reads reach column wv - 1 + k - 1.
  const int64_t stride = RoundUp(wv + k, kLanes<V>);
  Tile tile(job, h + k - 1, stride);
  // g with zero columns up to wv, so that the padded columns add nothing; aligned rows.
  AlignedFloats g_tile(h * wv);
  for (int64_t p = first; p < last; ++p) {
    const float* in = tile.Fill(job.x + p * h * w);
    const float* g = job.other + p * h * w;
    if (wv != w) {
      for (int64_t r = 0; r < h; ++r) {
        std::memcpy(g_tile.data() + r * wv, g + r * w, w * sizeof(float));
      }
      g = g_tile.data();
    }
    float* out = job.out + p * k * k;
    for (int64_t j = 0; j < k; ++j) {
      for (int64_t i0 = 0; i0 < k; i0 += I) {
        TapGradBlock<V, I, NV>(in, stride, g, wv, h, wv, i0, std::min<int64_t>(I, k - i0), j,
                               out, k);
      }
    }
  }
}

// I tap rows per block: as many as the registers hold (I x NV accumulators), in as few
// blocks as possible, so that k = 9 is one block of 9 rather than 8 + 1.
template <typename V, int kMaxJ, int NV>
ETCJAX_INLINE void TapGradDispatch(const Job& job, int64_t first, int64_t last) {
  const int64_t blocks = (job.k + kMaxJ - 1) / kMaxJ;
  const int64_t j = (job.k + blocks - 1) / blocks;
  static_assert(kMaxJ <= 10, "extend the switch");
  switch (j) {
#define ETCJAX_CASE(J) \
  case J:              \
    if constexpr (J <= kMaxJ) return TapGradPlanes<V, J, NV>(job, first, last);
    ETCJAX_CASE(1)
    ETCJAX_CASE(2)
    ETCJAX_CASE(3)
    ETCJAX_CASE(4)
    ETCJAX_CASE(5)
    ETCJAX_CASE(6)
    ETCJAX_CASE(7)
    ETCJAX_CASE(8)
    ETCJAX_CASE(9)
    ETCJAX_CASE(10)
#undef ETCJAX_CASE
    default:
      break;
  }
}

// ------------------------------------------------------------------- per-ISA entry points

using PlanesFn = void (*)(const Job&, int64_t, int64_t);

void ConvBase(const Job& job, int64_t first, int64_t last) {
  ConvPlanes<V4, 4, 2>(job, first, last);
}
void TapGradBase(const Job& job, int64_t first, int64_t last) {
  TapGradDispatch<V4, 5, 2>(job, first, last);
}

#ifdef ETCJAX_X86_DISPATCH
// 16 vector registers: 8 conv accumulators, up to 10 tap-gradient ones.
__attribute__((target("avx2,fma"))) void ConvAvx2(const Job& job, int64_t first,
                                                  int64_t last) {
  ConvPlanes<V8, 4, 2>(job, first, last);
}
__attribute__((target("avx2,fma"))) void TapGradAvx2(const Job& job, int64_t first,
                                                     int64_t last) {
  TapGradDispatch<V8, 5, 2>(job, first, last);
}
// 32 vector registers: up to 20 tap-gradient accumulators.
__attribute__((target("avx512f"))) void ConvAvx512(const Job& job, int64_t first,
                                                   int64_t last) {
  ConvPlanes<V16, 4, 2>(job, first, last);
}
__attribute__((target("avx512f"))) void TapGradAvx512(const Job& job, int64_t first,
                                                      int64_t last) {
  TapGradDispatch<V16, 10, 2>(job, first, last);
}
#endif

// 2: AVX-512, 1: AVX2 + FMA, 0: baseline.
int BestIsa() {
#ifdef ETCJAX_X86_DISPATCH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return 2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
#endif
  return 0;
}

int CachedBestIsa() {
  static const int isa = BestIsa();
  return isa;
}

PlanesFn Choose(bool conv, int isa) {
#ifdef ETCJAX_X86_DISPATCH
  if (isa == 2) return conv ? ConvAvx512 : TapGradAvx512;
  if (isa == 1) return conv ? ConvAvx2 : TapGradAvx2;
#endif
  return conv ? ConvBase : TapGradBase;
}

// -------------------------------------------------------------------------- FFI handlers

using ffi_util::Dims;
using ffi_util::ReadyFuture;

ffi::Future ErrorFuture(const std::string& message) {
  return ffi_util::ErrorFuture(ffi::Error::InvalidArgument("etcjax depthwise: " + message));
}

// Checks x (C, N, H, W) and the attributes; returns an error message, empty if all is well.
std::string PlanPlanes(ffi::AnyBuffer x, int64_t k, int64_t pad, int64_t isa, Job& job) {
  if (x.element_type() != ffi::F32) return "x must be float32";
  const auto dims = x.dimensions();
  if (dims.size() != 4) return "expected x of shape (C, N, H, W), got " + Dims(dims);
  if (k < 1) return "kernel size must be >= 1, got " + std::to_string(k);
  if (pad < 0 || pad >= k) {
    return "padding " + std::to_string(pad) + " outside 0.." + std::to_string(k - 1);
  }
  if (isa < -1 || isa > CachedBestIsa()) {
    return "isa " + std::to_string(isa) + " not available on this CPU (best: " +
           std::to_string(CachedBestIsa()) + ")";
  }
  job.c = dims[0];
  job.n = dims[1];
  job.h = dims[2];
  job.w = dims[3];
  job.k = k;
  job.pad = pad;
  job.x = x.typed_data<float>();
  return "";
}

bool SameDims(ffi::Span<const int64_t> a, std::initializer_list<int64_t> b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin());
}

// Splits the planes into one contiguous range per pool thread (fewer for small calls).
ffi::Future RunPlanes(ffi::ThreadPool pool, std::shared_ptr<Job> job, PlanesFn fn) {
  const int64_t planes = job->planes();
  if (planes == 0 || job->h == 0 || job->w == 0) return ReadyFuture();
  // ~64k multiply-adds per plane at the smallest useful size: keep a task >= ~0.5M.
  constexpr int64_t kMinTaskMacs = int64_t{1} << 19;
  const int64_t macs = planes * job->h * job->w * job->k * job->k;
  int64_t tasks = std::max<int64_t>(1, pool.num_threads());
  tasks = std::min({tasks, std::max<int64_t>(1, macs / kMinTaskMacs), planes});
  return ffi_util::SplitOverPool(pool, planes, tasks, [job, fn](int64_t first, int64_t last) {
    fn(*job, first, last);
  });
}

ffi::Future Conv(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer taps,
                 ffi::Result<ffi::AnyBuffer> out, int64_t pad, int64_t isa) {
  auto job = std::make_shared<Job>();
  const auto tdims = taps.dimensions();
  const int64_t k = tdims.size() == 3 ? tdims[1] : 0;
  std::string error = PlanPlanes(x, k, pad, isa, *job);
  if (!error.empty()) return ErrorFuture(error);
  if (taps.element_type() != ffi::F32 || !SameDims(tdims, {job->c, k, k})) {
    return ErrorFuture("expected float32 taps of shape (C, k, k) with C = " +
                       std::to_string(job->c) + ", got " + Dims(tdims));
  }
  if (out->element_type() != ffi::F32 || !SameDims(out->dimensions(), {job->c, job->n,
                                                                       job->h, job->w})) {
    return ErrorFuture("output must be float32 of x's shape, got " +
                       Dims(out->dimensions()));
  }
  job->other = taps.typed_data<float>();
  job->out = out->typed_data<float>();
  return RunPlanes(pool, job, Choose(true, isa < 0 ? CachedBestIsa() : isa));
}

ffi::Future TapGrad(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer g,
                    ffi::Result<ffi::AnyBuffer> out, int64_t kernel_size, int64_t pad,
                    int64_t isa) {
  auto job = std::make_shared<Job>();
  std::string error = PlanPlanes(x, kernel_size, pad, isa, *job);
  if (!error.empty()) return ErrorFuture(error);
  if (g.element_type() != ffi::F32 || !SameDims(g.dimensions(), {job->c, job->n, job->h,
                                                                 job->w})) {
    return ErrorFuture("g must be float32 of x's shape " + Dims(x.dimensions()) + ", got " +
                       Dims(g.dimensions()));
  }
  const int64_t k = kernel_size;
  if (out->element_type() != ffi::F32 || !SameDims(out->dimensions(), {job->c, job->n, k,
                                                                       k})) {
    return ErrorFuture("output must be float32 (C, N, k, k), got " +
                       Dims(out->dimensions()));
  }
  job->other = g.typed_data<float>();
  job->out = out->typed_data<float>();
  if (job->h == 0 || job->w == 0) {  // empty planes: every tap gradient is 0
    std::fill(job->out, job->out + job->planes() * k * k, 0.0f);
    return ReadyFuture();
  }
  return RunPlanes(pool, job, Choose(false, isa < 0 ? CachedBestIsa() : isa));
}

}  // namespace
}  // namespace etcjax

#define ETCJAX_EXPORT __attribute__((visibility("default")))

// x (C, N, H, W) f32, taps (C, k, k) f32 -> (C, N, H, W) f32; attributes pad, isa.
extern "C" ETCJAX_EXPORT XLA_FFI_Error* DepthwiseConvF32(XLA_FFI_CallFrame* call_frame);
// x, g (C, N, H, W) f32 -> (C, N, k, k) f32; attributes kernel_size, pad, isa.
extern "C" ETCJAX_EXPORT XLA_FFI_Error* DepthwiseTapGradF32(XLA_FFI_CallFrame* call_frame);
// The best code path this CPU runs: 2 AVX-512, 1 AVX2 + FMA, 0 baseline vectors.
extern "C" ETCJAX_EXPORT int DepthwiseBestIsa() { return etcjax::CachedBestIsa(); }

XLA_FFI_DEFINE_HANDLER_SYMBOL(DepthwiseConvF32, etcjax::Conv,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("pad")
                                  .Attr<int64_t>("isa"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DepthwiseTapGradF32, etcjax::TapGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("kernel_size")
                                  .Attr<int64_t>("pad")
                                  .Attr<int64_t>("isa"));
