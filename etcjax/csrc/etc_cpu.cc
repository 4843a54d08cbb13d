// Copyright 2026 The etcjax Authors. Licensed under the Apache License, Version 2.0.
//
// XLA:CPU FFI kernel for the uint8 EtC transform (DESIGN.md, etcjax/etc.py):
//
//   out_block[i] = chperm_i(negpos_i(rotflip_i(in_block[perm[i]])))
//
// on images (..., H, W, 3) uint8 with block size B. etcjax/etc.py loads this library with
// ctypes and registers `EtcTransformU8` as the FFI target "etcjax_etc_transform_u8" on CPU.
//
// Every output block row is one shuffle of a contiguous 3B-byte source row (blocks that are
// not transposed) or of a source block column (transposed blocks: rotflip 1, 3, 5, 7):
//
// * x86-64 with AVX-512 VBMI (runtime check): a block row is one masked load, one `vpermb`
//   (channel permutation and column reversal together), an XOR (negpos) and a masked store
//   (B <= 21). Transposed blocks with B <= 16 are first transposed as 16x16 32-bit pixels
//   in registers, then compressed with the same kind of shuffle.
// * everywhere else, and for larger blocks: a portable scalar loop.
//
// Work is split into (image, block row) units spread over XLA's intra-op thread pool when
// the batch is large enough; the handler is asynchronous (returns an ffi::Future).

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>  // SSE2 (x86-64 baseline): non-temporal stores
#endif
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define ETCJAX_X86_SIMD 1
#endif

#include "ffi_util.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace etcjax {

using ffi_util::Dims;
using ffi_util::ErrorFuture;
using ffi_util::ReadyFuture;
using Field = ffi::Buffer<ffi::S32, 1>;  // one schedule array, int32 (n,)

namespace {

// itertools.permutations((0, 1, 2)): output channel c of a block with chperm k is input
// channel kPerms3[k][c].
constexpr uint8_t kPerms3[6][3] = {{0, 1, 2}, {0, 2, 1}, {1, 0, 2},
                                   {1, 2, 0}, {2, 0, 1}, {2, 1, 0}};
// rotflip code -> (transpose, reverse rows, reverse columns), applied in that order:
// out[y, x] = S[B-1-y if kRevY else y, B-1-x if kRevX else x], S = in.T if kTranspose.
constexpr bool kTranspose[8] = {false, true, false, true, false, true, false, true};
constexpr bool kRevY[8] = {false, true, true, false, false, true, true, false};
constexpr bool kRevX[8] = {false, false, true, true, true, true, false, false};

// Below this many output bytes per task the call runs on fewer threads.
constexpr int64_t kMinParallelBytes = int64_t{1} << 20;
// From this many output bytes on (about where a batch stops fitting in the caches), bands
// are staged in a buffer that stays in L1/L2 and written out with non-temporal stores,
// which saves reading every output cache line before overwriting it.
constexpr int64_t kStreamMinBytes = int64_t{8} << 20;
constexpr int64_t kStreamMaxBandBytes = int64_t{128} << 10;

struct Block {
  int64_t src;   // byte offset of the source block's top-left pixel within one image
  int64_t dst;   // byte offset of the output block's top-left pixel within its band
  uint8_t rotflip;
  uint8_t chperm;
  uint8_t mask;  // 0x00 or 0xFF (negpos)
};

// Everything one call needs, shared by the tasks on the thread pool.
struct Job {
  const uint8_t* in = nullptr;
  uint8_t* out = nullptr;
  int64_t images = 0;
  int64_t image_bytes = 0;  // H * W * 3
  int64_t stride = 0;       // W * 3: bytes between pixel rows
  int64_t b = 0;            // block size
  int64_t rows = 0;         // H / B
  int64_t cols = 0;         // W / B
  int64_t band_bytes = 0;   // B * W * 3: one block row of an image, contiguous in memory
  std::vector<Block> blocks;  // (rows * cols), output blocks in raster order
  bool simd = false;
  bool stream = false;  // stage each band in a small buffer, then non-temporal stores
  // vpermb indices: row_idx[rev_x][chperm] turns a 3B-byte source row into an output row;
  // col_idx[rev_x][chperm] does the same from 16 pixels held as 32-bit lanes; expand_idx
  // spreads a 3B-byte row into 32-bit lanes.
  alignas(64) uint8_t row_idx[2][6][64];
  alignas(64) uint8_t col_idx[2][6][64];
  alignas(64) uint8_t expand_idx[64];
};

// Source bytes to prefetch while a band is being written, spread over its blocks: the same
// share of the next image, so that its random block reads later find it in L2.
struct Prefetch {
  const uint8_t* begin = nullptr;
  const uint8_t* end = nullptr;
  int64_t per_block = 0;
};

inline void PrefetchShare(const Prefetch& pf, int64_t c) {
#if defined(__GNUC__) || defined(__clang__)
  const uint8_t* p = pf.begin + c * pf.per_block;
  const uint8_t* e = std::min(p + pf.per_block, pf.end);
  for (; p < e; p += 64) __builtin_prefetch(p, /*rw=*/0, /*locality=*/2);
#else
  (void)pf;
  (void)c;
#endif
}

// Writes one band (block row `r` of an image whose pixels start at `in`) to `band`.
using BandFn = void (*)(const Job&, const uint8_t* in, int64_t r, uint8_t* band,
                        const Prefetch& pf);

// ---------------------------------------------------------------------------------------
// Portable path.

void BlockScalar(const Job& job, const Block& blk, const uint8_t* src, uint8_t* dst) {
  const int64_t b = job.b;
  const int64_t stride = job.stride;
  const int rf = blk.rotflip;
  const uint8_t* p = kPerms3[blk.chperm];
  const uint8_t p0 = p[0], p1 = p[1], p2 = p[2], m = blk.mask;
  for (int64_t y = 0; y < b; ++y) {
    const int64_t sy = kRevY[rf] ? b - 1 - y : y;
    const uint8_t* s;
    ptrdiff_t step;
    if (!kTranspose[rf]) {  // source row sy, pixels along it
      s = src + sy * stride + (kRevX[rf] ? 3 * (b - 1) : 0);
      step = kRevX[rf] ? -3 : 3;
    } else {  // source column sy, pixels down it
      s = src + 3 * sy + (kRevX[rf] ? (b - 1) * stride : 0);
      step = kRevX[rf] ? -stride : stride;
    }
    uint8_t* d = dst + y * stride;
    for (int64_t x = 0; x < b; ++x, d += 3, s += step) {
      const uint8_t c0 = s[p0], c1 = s[p1], c2 = s[p2];
      d[0] = c0 ^ m;
      d[1] = c1 ^ m;
      d[2] = c2 ^ m;
    }
  }
}

void BandScalar(const Job& job, const uint8_t* in, int64_t r, uint8_t* band,
                const Prefetch& pf) {
  for (int64_t c = 0; c < job.cols; ++c) {
    PrefetchShare(pf, c);
    const Block& blk = job.blocks[r * job.cols + c];
    BlockScalar(job, blk, in + blk.src, band + blk.dst);
  }
}

// Copies a staged band to the output with non-temporal stores where possible (x86).
void StreamCopy(uint8_t* dst, const uint8_t* src, int64_t bytes) {
#if defined(__x86_64__) || defined(_M_X64)
  const int64_t head = std::min<int64_t>(bytes, (16 - reinterpret_cast<uintptr_t>(dst) % 16) % 16);
  std::memcpy(dst, src, head);
  int64_t i = head;
  for (; i + 16 <= bytes; i += 16) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
  }
  std::memcpy(dst + i, src + i, bytes - i);
#else
  std::memcpy(dst, src, bytes);
#endif
}

void StreamFence() {
#if defined(__x86_64__) || defined(_M_X64)
  _mm_sfence();  // non-temporal stores are weakly ordered: publish them before completing
#endif
}

// ---------------------------------------------------------------------------------------
// AVX-512 VBMI path.

#ifdef ETCJAX_X86_SIMD
#define ETCJAX_AVX512 __attribute__((target("avx512f,avx512bw,avx512vbmi")))
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12 warns about the deliberately undefined pass-through operand inside the intrinsics.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

// In-place transpose of a 16x16 matrix of 32-bit lanes: r[i] lane j <-> r[j] lane i.
ETCJAX_AVX512 inline void Transpose16x16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  // After the 64-bit unpacks, u[4i + k] 128-bit lane l holds column 4l + k of rows
  // 4i..4i+3.
  __m512i u[16];
  for (int i = 0; i < 4; ++i) {
    u[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  // Column 4l + k gathers lane l of u[k], u[4 + k], u[8 + k], u[12 + k]: a 4x4 transpose of
  // 128-bit lanes per k.
  for (int k = 0; k < 4; ++k) {
    const __m512i p0 = _mm512_shuffle_i32x4(u[k], u[4 + k], 0x44);
    const __m512i p1 = _mm512_shuffle_i32x4(u[k], u[4 + k], 0xEE);
    const __m512i p2 = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0x44);
    const __m512i p3 = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0xEE);
    r[k] = _mm512_shuffle_i32x4(p0, p2, 0x88);
    r[4 + k] = _mm512_shuffle_i32x4(p0, p2, 0xDD);
    r[8 + k] = _mm512_shuffle_i32x4(p1, p3, 0x88);
    r[12 + k] = _mm512_shuffle_i32x4(p1, p3, 0xDD);
  }
}

// One block, B <= 21 (a block row fits one 64-byte register); transposed blocks need
// B <= 16. kB is B when known at compile time (16), else 0.
template <int kB>
ETCJAX_AVX512 inline void BlockAvx512(const Job& job, const Block& blk, const uint8_t* src,
                                      uint8_t* dst) {
  const int64_t b = kB ? kB : job.b;
  const int64_t stride = job.stride;
  const __mmask64 lanes = (uint64_t{1} << (3 * b)) - 1;  // 3B <= 63 bytes
  const int rf = blk.rotflip;
  const __m512i mask = _mm512_set1_epi8(static_cast<char>(blk.mask));
  if (!kTranspose[rf]) {
    const __m512i idx = _mm512_load_si512(job.row_idx[kRevX[rf]][blk.chperm]);
    const uint8_t* s = src + (kRevY[rf] ? (b - 1) * stride : 0);
    const ptrdiff_t step = kRevY[rf] ? -stride : stride;
    for (int64_t y = 0; y < b; ++y, s += step, dst += stride) {
      __m512i v = _mm512_maskz_loadu_epi8(lanes, s);
      v = _mm512_xor_si512(_mm512_permutexvar_epi8(idx, v), mask);
      _mm512_mask_storeu_epi8(dst, lanes, v);
    }
    return;
  }
  // Transposed: r[k] lane j = source pixel (k, j) as 32 bits; after the transpose r[j]
  // lane k = source pixel (k, j), i.e. r[j] is source column j as a row.
  const __m512i expand = _mm512_load_si512(job.expand_idx);
  __m512i r[16];
  for (int64_t k = 0; k < 16; ++k) {
    r[k] = k < b ? _mm512_permutexvar_epi8(
                       expand, _mm512_maskz_loadu_epi8(lanes, src + k * stride))
                 : _mm512_setzero_si512();
  }
  Transpose16x16(r);
  const __m512i idx = _mm512_load_si512(job.col_idx[kRevX[rf]][blk.chperm]);
  for (int64_t y = 0; y < b; ++y, dst += stride) {
    const __m512i v = r[kRevY[rf] ? b - 1 - y : y];
    _mm512_mask_storeu_epi8(dst, lanes,
                            _mm512_xor_si512(_mm512_permutexvar_epi8(idx, v), mask));
  }
}

template <int kB>
ETCJAX_AVX512 void BandAvx512(const Job& job, const uint8_t* in, int64_t r, uint8_t* band,
                              const Prefetch& pf) {
  const bool transposes = kB ? true : job.b <= 16;
  for (int64_t c = 0; c < job.cols; ++c) {
    PrefetchShare(pf, c);
    const Block& blk = job.blocks[r * job.cols + c];
    if (transposes || !kTranspose[blk.rotflip]) {
      BlockAvx512<kB>(job, blk, in + blk.src, band + blk.dst);
    } else {
      BlockScalar(job, blk, in + blk.src, band + blk.dst);
    }
  }
}

bool CpuHasAvx512Vbmi() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vbmi");
}
#endif  // ETCJAX_X86_SIMD

// Whether this CPU runs the SIMD path (exported for etcjax.etc's diagnostics).
bool SimdAvailable() {
#ifdef ETCJAX_X86_SIMD
  static const bool has_vbmi = CpuHasAvx512Vbmi();
  return has_vbmi;
#else
  return false;
#endif
}

BandFn ChooseBand(const Job& job) {
#ifdef ETCJAX_X86_SIMD
  if (job.simd && SimdAvailable()) {
    if (job.b == 16) return BandAvx512<16>;
    if (3 * job.b <= 63) return BandAvx512<0>;
  }
#endif
  return BandScalar;
}

void FillTables(Job& job) {
  const int64_t b = job.b;
  for (int rev = 0; rev < 2; ++rev) {
    for (int k = 0; k < 6; ++k) {
      for (int64_t i = 0; i < 64; ++i) {
        const int64_t x = i / 3, ch = i % 3;
        const int64_t sx = rev ? b - 1 - x : x;
        const bool valid = x < b && sx >= 0 && sx < 16;
        job.row_idx[rev][k][i] =
            static_cast<uint8_t>(x < b ? 3 * sx + kPerms3[k][ch] : 0) & 63;
        job.col_idx[rev][k][i] =
            static_cast<uint8_t>(valid ? 4 * sx + kPerms3[k][ch] : 0) & 63;
      }
    }
  }
  for (int64_t i = 0; i < 64; ++i) {
    job.expand_idx[i] = static_cast<uint8_t>(3 * (i / 4) + std::min<int64_t>(i % 4, 2)) & 63;
  }
}

// Runs work units [first, last) of a job in order; unit u is band u % rows of image
// u / rows. While writing a band it prefetches the same share of the next image's source
// (when that image is in this range too).
void RunUnits(const Job& job, BandFn band_fn, int64_t first, int64_t last) {
  std::unique_ptr<uint8_t[]> staging;
  uint8_t* stage = nullptr;
  if (job.stream) {
    staging.reset(new uint8_t[job.band_bytes + 63]);
    stage = staging.get() + (64 - reinterpret_cast<uintptr_t>(staging.get()) % 64) % 64;
  }
  const int64_t share = (job.image_bytes / job.rows + 63) / 64 * 64;
  const int64_t per_block = (share / 64 + job.cols - 1) / job.cols * 64;
  for (int64_t u = first; u < last; ++u) {
    const int64_t image = u / job.rows, r = u % job.rows;
    Prefetch pf;
    if (u + job.rows < last) {
      pf.begin = job.in + (image + 1) * job.image_bytes + r * share;
      pf.end = std::min(pf.begin + share, job.in + (image + 2) * job.image_bytes);
      pf.per_block = per_block;
    }
    uint8_t* dst = job.out + image * job.image_bytes + r * job.band_bytes;
    band_fn(job, job.in + image * job.image_bytes, r, stage ? stage : dst, pf);
    if (stage) StreamCopy(dst, stage, job.band_bytes);
  }
  if (stage) StreamFence();
}

// Checks the call and builds the job; returns an error message, empty if all is well.
std::string Plan(ffi::AnyBuffer images, Field perm,
                 Field rotflip, Field negpos,
                 Field chperm, ffi::AnyBuffer out, int64_t block_size,
                 Job& job) {
  if (images.element_type() != ffi::U8 || out.element_type() != ffi::U8) {
    return "images must be uint8";
  }
  const auto dims = images.dimensions();
  const size_t rank = dims.size();
  if (rank < 3 || dims[rank - 1] != 3) {
    return "expected images of shape (..., H, W, 3), got " + Dims(dims);
  }
  const auto out_dims = out.dimensions();
  if (out_dims.size() != rank || !std::equal(dims.begin(), dims.end(), out_dims.begin())) {
    return "output shape " + Dims(out_dims) + " differs from the images' " + Dims(dims);
  }
  const int64_t h = dims[rank - 3], w = dims[rank - 2];
  if (block_size < 1) return "block size must be >= 1, got " + std::to_string(block_size);
  if (h % block_size || w % block_size) {
    return "image size " + std::to_string(h) + "x" + std::to_string(w) +
           " is not a multiple of the block size " + std::to_string(block_size);
  }
  job.b = block_size;
  job.rows = h / block_size;
  job.cols = w / block_size;
  const int64_t n = job.rows * job.cols;
  const Field* fields[4] = {&perm, &rotflip, &negpos, &chperm};
  const char* names[4] = {"perm", "rotflip", "negpos", "chperm"};
  const int64_t limits[4] = {n, 8, 2, 6};
  for (int f = 0; f < 4; ++f) {
    if (fields[f]->dimensions()[0] != n) {
      return std::string("schedule field ") + names[f] + " has " +
             std::to_string(fields[f]->dimensions()[0]) + " entries, expected " +
             std::to_string(n) + " for " + std::to_string(h) + "x" + std::to_string(w) +
             " images with block size " + std::to_string(block_size);
    }
    const int32_t* v = fields[f]->typed_data();
    for (int64_t i = 0; i < n; ++i) {
      if (v[i] < 0 || v[i] >= limits[f]) {
        return std::string("schedule field ") + names[f] + " has values outside 0.." +
               std::to_string(limits[f] - 1);
      }
    }
  }
  std::vector<bool> seen(static_cast<size_t>(n), false);
  const int32_t* p = perm.typed_data();
  for (int64_t i = 0; i < n; ++i) {
    if (seen[p[i]]) return "schedule field perm is not a permutation of 0..n-1";
    seen[p[i]] = true;
  }
  job.stride = 3 * w;
  job.image_bytes = h * job.stride;
  job.band_bytes = block_size * job.stride;
  job.images = job.image_bytes ? static_cast<int64_t>(images.size_bytes()) / job.image_bytes
                               : 0;
  job.in = static_cast<const uint8_t*>(images.untyped_data());
  job.out = static_cast<uint8_t*>(out.untyped_data());
  const int64_t bb = block_size;
  job.blocks.resize(static_cast<size_t>(n));
  const int32_t* rf = rotflip.typed_data();
  const int32_t* np_ = negpos.typed_data();
  const int32_t* cp = chperm.typed_data();
  for (int64_t i = 0; i < n; ++i) {
    Block& blk = job.blocks[i];
    blk.src = (p[i] / job.cols) * bb * job.stride + (p[i] % job.cols) * bb * 3;
    blk.dst = (i % job.cols) * bb * 3;
    blk.rotflip = static_cast<uint8_t>(rf[i]);
    blk.chperm = static_cast<uint8_t>(cp[i]);
    blk.mask = np_[i] ? 0xFF : 0x00;
  }
  return "";
}

ffi::Future TransformU8(ffi::ThreadPool pool, ffi::AnyBuffer images,
                        Field perm, Field rotflip,
                        Field negpos, Field chperm,
                        ffi::Result<ffi::AnyBuffer> out, int64_t block_size, int64_t threads,
                        bool simd) {
  auto job = std::make_shared<Job>();
  job->simd = simd;
  std::string error = Plan(images, perm, rotflip, negpos, chperm, *out, block_size, *job);
  if (!error.empty()) return ErrorFuture(ffi::Error::InvalidArgument("etcjax EtC: " + error));
  const int64_t units = job->images * job->rows;
  if (units == 0) return ReadyFuture();
  FillTables(*job);
  const BandFn band_fn = ChooseBand(*job);
  const int64_t total = job->images * job->image_bytes;
  job->stream = total >= kStreamMinBytes && job->band_bytes <= kStreamMaxBandBytes;

  // Tasks: one per pool thread (at most `threads` when > 0), one for small calls; each
  // takes a contiguous range of units (so that its prefetches serve itself).
  int64_t tasks = std::max<int64_t>(1, pool.num_threads());
  if (threads > 0) tasks = std::min(tasks, threads);
  tasks = std::min({tasks, std::max<int64_t>(1, total / kMinParallelBytes), units});
  return ffi_util::SplitOverPool(pool, units, tasks, [job, band_fn](int64_t first,
                                                                    int64_t last) {
    RunUnits(*job, band_fn, first, last);
  });
}

}  // namespace
}  // namespace etcjax

#if defined(_WIN32)
#define ETCJAX_EXPORT __declspec(dllexport)
#else
#define ETCJAX_EXPORT __attribute__((visibility("default")))
#endif

// images (..., H, W, 3) u8; perm, rotflip, negpos, chperm int32 (n,); attributes
// block_size (B), threads (0: the whole intra-op pool) and simd (false: portable loop only).
extern "C" ETCJAX_EXPORT XLA_FFI_Error* EtcTransformU8(XLA_FFI_CallFrame* call_frame);

// 1 when this CPU runs the AVX-512 VBMI path, 0 when only the portable loop.
extern "C" ETCJAX_EXPORT int EtcTransformU8Simd() { return etcjax::SimdAvailable() ? 1 : 0; }
XLA_FFI_DEFINE_HANDLER_SYMBOL(EtcTransformU8, etcjax::TransformU8,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<etcjax::Field>()
                                  .Arg<etcjax::Field>()
                                  .Arg<etcjax::Field>()
                                  .Arg<etcjax::Field>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("block_size")
                                  .Attr<int64_t>("threads")
                                  .Attr<bool>("simd"));
