// 2-D convolution kernels for XLA:CPU as XLA FFI custom calls: the forward pass and the weight gradient of an
// ungrouped, undilated float32 convolution with an NHWC input, an HWIO kernel and an NHWC output.
//
//   forward:      y[n, oh, ow, co] = sum over ky, kx, ci of x[n, oh*sh - ph + ky, ow*sw - pw + kx, ci] * w[ky, kx, ci, co]
//   weight_grad:  dw[ky, kx, ci, co] = sum over n, oh, ow of x[n, oh*sh - ph + ky, ow*sw - pw + kx, ci] * dy[n, oh, ow, co]
//
// (x outside its bounds is the zero padding; the bottom/right padding follows from the output's size.)
//
// Why: on a 2-core CPU, XLA computes a weight gradient by transposing x and dy to batch-minor layouts and running
// an Eigen convolution over an im2col buffer, 2-5x slower than these direct loops at CIFAR ResNet sizes, and its
// forward convolutions are ~1.5x slower (bench/results_cpu.md). Both loops keep a block of results in vector
// registers: the forward pass a block of output pixels x output channels while input channels stream through,
// the weight gradient a block of input x output channels of one kernel offset while pixels stream through.
// Work is shared over XLA's intra-op thread pool in chunks that depend on the shapes only; the weight gradient
// sums each chunk into its own buffer and adds the buffers in chunk order, so both results are the same bits
// whatever the thread count or timing. Compiled on the machine that runs it (transferlab/kernels/build.py).

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Geometry {
  int64_t n, h, w, ci, ho, wo, co, kh, kw, sh, sw, ph, pw;
};

typedef float Vec16 __attribute__((vector_size(64)));
typedef float Vec8 __attribute__((vector_size(32)));
typedef float Vec4 __attribute__((vector_size(16)));
typedef float Vec1 __attribute__((vector_size(4)));
template <int V> struct VecOf;
template <> struct VecOf<16> { typedef Vec16 type; };
template <> struct VecOf<8> { typedef Vec8 type; };
template <> struct VecOf<4> { typedef Vec4 type; };
template <> struct VecOf<1> { typedef Vec1 type; };
template <int V>
using Vec = typename VecOf<V>::type;

// Register blocks. With AVX-512 (32 zmm registers of 16 floats) the forward pass holds 16 pixels x 16 output
// channels or 8 x 32, the weight gradient 16 input x 16 output channels. With AVX2 (16 ymm registers of 8
// floats) 12 pixels x 8 channels or 6 x 16, and 8 x 8. Blocks larger than the register file spill to memory on
// every multiply-add (AVX-512's blocks built for AVX2 were 5-70x slower than XLA: bench/results_cpu.md).
#if defined(__AVX512F__)
constexpr int kLanes = 16, kMaxCiBlock = 16;
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int kLanes = 8, kMaxCiBlock = 8;
#else
#error "conv2d.cc needs AVX-512 or AVX2 with FMA (transferlab/kernels/build.py builds it only where the CPU has them)"
#endif

template <int V>
inline Vec<V> Load(const float* p) {
  Vec<V> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <int V>
inline void Store(float* p, const Vec<V>& v) {
  std::memcpy(p, &v, sizeof(v));
}

// Runs work(c) for c in [0, chunks) on the calling thread and the pool's threads, returning when all are
// done. A task that starts after every chunk is claimed finds none (shared state keeps it valid).
template <typename Work>
void ParallelFor(ffi::ThreadPool& pool, int64_t chunks, Work work) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  auto run = [state, chunks, work]() {
    int64_t c;
    while ((c = state->next.fetch_add(1)) < chunks) {
      work(c);
      if (state->done.fetch_add(1) + 1 == chunks) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->cv.notify_all();
      }
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), chunks) - 1;
  for (int64_t i = 0; i < helpers; ++i) {
    auto task = run;
    pool.Schedule(std::move(task));
  }
  run();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == chunks; });
}

// The convolution's sizes from its input (NHWC), kernel (HWIO) and output (NHWC) dimensions, checked.
template <typename Dims>
ffi::Error ReadGeometry(const char* op, const Dims& xd, const Dims& wd, const Dims& yd, int64_t stride_h,
                        int64_t stride_w, int64_t pad_h, int64_t pad_w, Geometry* g) {
  if (xd.size() != 4 || wd.size() != 4 || yd.size() != 4 || yd[0] != xd[0] || wd[2] != xd[3] || wd[3] != yd[3])
    return ffi::Error::InvalidArgument(std::string(op) + ": NHWC input and output, HWIO kernel of matching sizes");
  *g = Geometry{xd[0], xd[1], xd[2], xd[3], yd[1], yd[2], yd[3], wd[0], wd[1], stride_h, stride_w, pad_h, pad_w};
  if (g->sh < 1 || g->sw < 1 || g->ph < 0 || g->pw < 0 || g->kh < 1 || g->kw < 1)
    return ffi::Error::InvalidArgument(std::string(op) + ": strides and kernel sizes must be >= 1, padding >= 0");
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------------------
// Forward pass.

// out[ow0:ow0+P, co0:co0+NV*V] of one output row, from `rows` (per kernel row, the input row zero-padded left
// and right; nullptr where the kernel row falls in the vertical padding): P x NV accumulators.
template <int P, int NV, int V, int PS>
inline void ForwardPixels(const Geometry& g, const float* const* rows, const float* w, float* out, int64_t ow0,
                          int64_t co0) {
  Vec<V> acc[P][NV];
  for (int j = 0; j < P; ++j)
    for (int v = 0; v < NV; ++v) acc[j][v] = Vec<V>{};
  const int64_t pixel_step = PS > 0 ? PS : g.sw * g.ci;  // a constant: immediate address offsets
  for (int64_t ky = 0; ky < g.kh; ++ky) {
    if (rows[ky] == nullptr) continue;
    for (int64_t kx = 0; kx < g.kw; ++kx) {
      const float* xr = rows[ky] + (ow0 * g.sw + kx) * g.ci;
      const float* wr = w + (ky * g.kw + kx) * g.ci * g.co + co0;
      for (int64_t c = 0; c < g.ci; ++c) {
        Vec<V> wv[NV];
        for (int v = 0; v < NV; ++v) wv[v] = Load<V>(wr + c * g.co + v * V);
        for (int j = 0; j < P; ++j) {
          const float xv = xr[j * pixel_step + c];
          for (int v = 0; v < NV; ++v) acc[j][v] += xv * wv[v];
        }
      }
    }
  }
  for (int j = 0; j < P; ++j)
    for (int v = 0; v < NV; ++v) Store<V>(out + (ow0 + j) * g.co + co0 + v * V, acc[j][v]);
}

// Output pixels [ow, wo) of one row in blocks of P, P/2, ..., 1.
template <int P, int NV, int V, int PS>
inline void ForwardRun(const Geometry& g, const float* const* rows, const float* w, float* out, int64_t ow,
                       int64_t co0) {
  for (; ow + P <= g.wo; ow += P) ForwardPixels<P, NV, V, PS>(g, rows, w, out, ow, co0);
  if constexpr (P > 1) ForwardRun<P / 2, NV, V, PS>(g, rows, w, out, ow, co0);
}

// The same, with the input pixel step (stride x input channels) a compile-time constant where common.
template <int P, int NV, int V>
inline void ForwardRow(const Geometry& g, const float* const* rows, const float* w, float* out, int64_t ow,
                       int64_t co0) {
  switch (g.sw * g.ci) {
    case 16: ForwardRun<P, NV, V, 16>(g, rows, w, out, ow, co0); break;
    case 32: ForwardRun<P, NV, V, 32>(g, rows, w, out, ow, co0); break;
    case 64: ForwardRun<P, NV, V, 64>(g, rows, w, out, ow, co0); break;
    default: ForwardRun<P, NV, V, 0>(g, rows, w, out, ow, co0);
  }
}

// Output rows [r0, r1) of the flattened (image, row) index, every output channel. The input rows they read
// are copied once per image into a buffer with zero padding columns left and right.
void ForwardRows(const Geometry& g, const float* x, const float* w, float* y, int64_t r0, int64_t r1) {
  const int64_t padded_w = std::max(g.w + g.pw, (g.wo - 1) * g.sw + g.kw);
  const int64_t row_floats = padded_w * g.ci;
  const int64_t max_rows = std::min(g.h, (std::min(r1 - r0, g.ho) - 1) * g.sh + g.kh);
  std::unique_ptr<float[]> buffer(new float[std::max<int64_t>(1, max_rows) * row_floats]);
  std::vector<const float*> rows(g.kh);
  for (int64_t r = r0; r < r1;) {
    const int64_t n = r / g.ho, oh0 = r % g.ho, oh1 = std::min(g.ho, oh0 + (r1 - r));
    const int64_t ih0 = std::max<int64_t>(0, oh0 * g.sh - g.ph);
    const int64_t ih1 = std::min(g.h, (oh1 - 1) * g.sh - g.ph + g.kh);
    for (int64_t ih = ih0; ih < ih1; ++ih) {
      float* row = buffer.get() + (ih - ih0) * row_floats;
      std::fill(row, row + g.pw * g.ci, 0.0f);
      std::memcpy(row + g.pw * g.ci, x + (n * g.h + ih) * g.w * g.ci, g.w * g.ci * sizeof(float));
      std::fill(row + (g.pw + g.w) * g.ci, row + row_floats, 0.0f);
    }
    for (int64_t oh = oh0; oh < oh1; ++oh) {
      for (int64_t ky = 0; ky < g.kh; ++ky) {
        const int64_t ih = oh * g.sh - g.ph + ky;
        rows[ky] = (ih < 0 || ih >= g.h) ? nullptr : buffer.get() + (ih - ih0) * row_floats;
      }
      float* out = y + (n * g.ho + oh) * g.wo * g.co;
      int64_t co0 = 0;
      while (co0 < g.co) {
        const int64_t left = g.co - co0;
        if constexpr (kLanes == 16) {
          if (left >= 32) { ForwardRow<8, 2, 16>(g, rows.data(), w, out, 0, co0); co0 += 32; continue; }
          if (left >= 16) { ForwardRow<16, 1, 16>(g, rows.data(), w, out, 0, co0); co0 += 16; continue; }
        } else {
          if (left >= 16) { ForwardRow<6, 2, 8>(g, rows.data(), w, out, 0, co0); co0 += 16; continue; }
        }
        if (left >= 8) { ForwardRow<12, 1, 8>(g, rows.data(), w, out, 0, co0); co0 += 8; }
        else if (left >= 4) { ForwardRow<12, 1, 4>(g, rows.data(), w, out, 0, co0); co0 += 4; }
        else { ForwardRow<12, 1, 1>(g, rows.data(), w, out, 0, co0); co0 += 1; }
      }
    }
    r += oh1 - oh0;
  }
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::F32> y, int64_t stride_h, int64_t stride_w, int64_t pad_h,
                       int64_t pad_w) {
  Geometry g;
  if (ffi::Error error = ReadGeometry("conv2d forward", x.dimensions(), w.dimensions(), y->dimensions(), stride_h,
                                      stride_w, pad_h, pad_w, &g);
      error.failure())
    return error;
  const int64_t rows = g.n * g.ho;
  if (rows == 0 || g.wo == 0 || g.co == 0) return ffi::Error::Success();
  const int64_t per_chunk = std::max<int64_t>(1, rows / 64);
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  ParallelFor(pool, (rows + per_chunk - 1) / per_chunk, [&g, xp, wp, yp, per_chunk, rows](int64_t c) {
    ForwardRows(g, xp, wp, yp, c * per_chunk, std::min(rows, (c + 1) * per_chunk));
  });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------------------
// Weight gradient.

// Output rows/cols [lo, hi) whose input index o*s - p + k lies in [0, size).
inline void ValidRange(int64_t out, int64_t size, int64_t s, int64_t p, int64_t k, int64_t* lo, int64_t* hi) {
  const int64_t first = p - k;
  *lo = first <= 0 ? 0 : (first + s - 1) / s;
  const int64_t last = size - 1 + p - k;
  *hi = last < 0 ? 0 : std::min(out, last / s + 1);
  if (*hi < *lo) *hi = *lo;
}

// dw[ky, kx, ci0:ci0+CB, co0:co0+V] += the sum over images [n0, n1) and their pixels: CB accumulators.
template <int CB, int V>
void WeightGradBlock(const Geometry& g, const float* x, const float* dy, int64_t n0, int64_t n1, int64_t ky,
                     int64_t kx, int64_t ci0, int64_t co0, float* dw) {
  Vec<V> acc[CB];
  for (int c = 0; c < CB; ++c) acc[c] = Vec<V>{};
  int64_t oh_lo, oh_hi, ow_lo, ow_hi;
  ValidRange(g.ho, g.h, g.sh, g.ph, ky, &oh_lo, &oh_hi);
  ValidRange(g.wo, g.w, g.sw, g.pw, kx, &ow_lo, &ow_hi);
  const int64_t pixel_step = g.sw * g.ci;
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t oh = oh_lo; oh < oh_hi; ++oh) {
      const int64_t ih = oh * g.sh - g.ph + ky;
      const float* xr = x + ((n * g.h + ih) * g.w + (ow_lo * g.sw - g.pw + kx)) * g.ci + ci0;
      const float* gr = dy + ((n * g.ho + oh) * g.wo + ow_lo) * g.co + co0;
      for (int64_t ow = ow_lo; ow < ow_hi; ++ow) {
        const Vec<V> gv = Load<V>(gr);
        for (int c = 0; c < CB; ++c) acc[c] += xr[c] * gv;
        xr += pixel_step;
        gr += g.co;
      }
    }
  }
  for (int c = 0; c < CB; ++c) {
    float* o = dw + ((ky * g.kw + kx) * g.ci + ci0 + c) * g.co + co0;
    Store<V>(o, Load<V>(o) + acc[c]);
  }
}

// Every input channel for output channels [co0, co0 + V), in register blocks of 16, 8, 4, 2 or 1.
template <int V>
void WeightGradChannels(const Geometry& g, const float* x, const float* dy, int64_t n0, int64_t n1, int64_t ky,
                        int64_t kx, int64_t co0, float* dw) {
  int64_t ci0 = 0;
  while (ci0 < g.ci) {
    const int64_t left = g.ci - ci0;
    if (left >= kMaxCiBlock) { WeightGradBlock<kMaxCiBlock, V>(g, x, dy, n0, n1, ky, kx, ci0, co0, dw); ci0 += kMaxCiBlock; }
    else if (kMaxCiBlock > 8 && left >= 8) { WeightGradBlock<8, V>(g, x, dy, n0, n1, ky, kx, ci0, co0, dw); ci0 += 8; }
    else if (left >= 4) { WeightGradBlock<4, V>(g, x, dy, n0, n1, ky, kx, ci0, co0, dw); ci0 += 4; }
    else if (left >= 2) { WeightGradBlock<2, V>(g, x, dy, n0, n1, ky, kx, ci0, co0, dw); ci0 += 2; }
    else { WeightGradBlock<1, V>(g, x, dy, n0, n1, ky, kx, ci0, co0, dw); ci0 += 1; }
  }
}

// The weight gradient of images [n0, n1), added into dw; output channels in vectors of 16, 8, 4 or 1.
void WeightGradImages(const Geometry& g, const float* x, const float* dy, int64_t n0, int64_t n1, float* dw) {
  for (int64_t ky = 0; ky < g.kh; ++ky)
    for (int64_t kx = 0; kx < g.kw; ++kx) {
      int64_t co0 = 0;
      while (co0 < g.co) {
        const int64_t left = g.co - co0;
        if (kLanes == 16 && left >= 16) { WeightGradChannels<16>(g, x, dy, n0, n1, ky, kx, co0, dw); co0 += 16; }
        else if (left >= 8) { WeightGradChannels<8>(g, x, dy, n0, n1, ky, kx, co0, dw); co0 += 8; }
        else if (left >= 4) { WeightGradChannels<4>(g, x, dy, n0, n1, ky, kx, co0, dw); co0 += 4; }
        else { WeightGradChannels<1>(g, x, dy, n0, n1, ky, kx, co0, dw); co0 += 1; }
      }
    }
}

ffi::Error WeightGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                          ffi::ResultBuffer<ffi::F32> dw, int64_t stride_h, int64_t stride_w, int64_t pad_h,
                          int64_t pad_w) {
  Geometry g;
  if (ffi::Error error = ReadGeometry("conv2d weight_grad", x.dimensions(), dw->dimensions(), dy.dimensions(),
                                      stride_h, stride_w, pad_h, pad_w, &g);
      error.failure())
    return error;
  float* out = dw->typed_data();
  const int64_t size = g.kh * g.kw * g.ci * g.co;
  std::fill(out, out + size, 0.0f);
  if (g.n == 0 || size == 0) return ffi::Error::Success();
  // Chunks of images whose input and output gradient fit ~256 KB (the pixels stream through L2 once per
  // register block), at least 8 chunks where the batch allows (work for every thread).
  const int64_t image_bytes = (g.h * g.w * g.ci + g.ho * g.wo * g.co) * static_cast<int64_t>(sizeof(float));
  int64_t per_chunk = std::max<int64_t>(1, (256 * 1024) / std::max<int64_t>(1, image_bytes));
  per_chunk = std::min(per_chunk, std::max<int64_t>(1, (g.n + 7) / 8));
  const int64_t chunks = (g.n + per_chunk - 1) / per_chunk;
  std::vector<float> partial(chunks * size, 0.0f);
  const float* xp = x.typed_data();
  const float* yp = dy.typed_data();
  float* pp = partial.data();
  ParallelFor(pool, chunks, [&g, xp, yp, pp, per_chunk, size](int64_t c) {
    WeightGradImages(g, xp, yp, c * per_chunk, std::min(g.n, (c + 1) * per_chunk), pp + c * size);
  });
  for (int64_t c = 0; c < chunks; ++c) {
    const float* p = pp + c * size;
    for (int64_t i = 0; i < size; ++i) out[i] += p[i];
  }
  return ffi::Error::Success();
}

// Both handlers take (x, second operand), return one buffer and read the same attributes: forward (x, w) -> y,
// weight_grad (x, dy) -> dw.
auto Binding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Attr<int64_t>("stride_h")
      .Attr<int64_t>("stride_w")
      .Attr<int64_t>("pad_h")
      .Attr<int64_t>("pad_w");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TransferlabConv2dForward, ForwardImpl, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(TransferlabConv2dWeightGrad, WeightGradImpl, Binding());
