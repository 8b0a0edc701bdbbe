// Weight-only matmul with low-bit integer weight codes, dequantized in registers
// (AVX-512) and never written out as floats:
//
//   y[m, n] = sum_g s[g, n] (sum_{k in g} x[m, k] u[k, n] - (o + z[g, n]) sum_{k in g} x[m, k])
//
// which is sum_k x[m, k] (v[k, n] - z[g, n]) s[g, n] with grid values v = u - o.
// Codes follow jaxcomp.quant.QArray's matrix view: 2- to 4-bit codes are packed
// along the rows in 2- or 4-bit slots (`slot`), slot j of byte row r holding row
// r p + j (p = 8 / slot) as u = v + 2^(bits - 1), the offset o; 5- to 8-bit codes
// are int8 v (slot 8, o = 0). Each work item is 256 output columns
// (four panels of 64); x rows go four at a time so a byte row of codes is unpacked
// once for four tokens.

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kPanel = 64;         // output columns per accumulator set: four float vectors
constexpr int64_t kPanelsPerItem = 4;  // panels per work item
// byte rows between a read and its prefetch: each row of an item is its own page,
// which the hardware prefetcher does not follow
constexpr int64_t kAheadRows = 64;
constexpr int64_t kTokens = 4;  // rows of x per pass over a panel's codes

bool Avx512Ready() {
  static const bool ready = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  return ready;
}

// The 64 codes of slot `j` of one byte row, as floats u (or v for 8 bits).
template <int kSlot>
__attribute__((target("avx512f,avx512bw"), always_inline)) inline void Unpack(
    const __m512i (&bytes)[4], int j, __m512 (&w)[4]) {
  for (int q = 0; q < 4; ++q) {
    if constexpr (kSlot == 8) {
      w[q] = _mm512_cvtepi32_ps(bytes[q]);  // already sign-extended
    } else {
      const __m512i mask = _mm512_set1_epi32((1 << kSlot) - 1);
      w[q] = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(bytes[q], j * kSlot), mask));
    }
  }
}

// Columns [n0, n0 + 64 panels) of y (all valid) for rows [m0, m0 + tokens). Groups
// are the outer loop, so the panels' bytes of one group's rows are read back to
// back: a few cache lines per page visited, not one.
template <int kSlot, int kTokensNow>
__attribute__((target("avx512f,avx512bw"))) void PanelRows(
    const float* x, const uint8_t* codes, const float* scale, const int8_t* zero,
    const float* xsum, float offset, int64_t k, int64_t n, int64_t groups, int64_t m0, int64_t n0,
    int64_t panels, float* y) {
  constexpr int p = kSlot == 8 ? 1 : 8 / kSlot;
  const int64_t group_rows = k / groups;  // rows of x per scale group
  __m512 out[kPanelsPerItem][kTokensNow][4];
  for (int64_t c = 0; c < panels; ++c)
    for (int t = 0; t < kTokensNow; ++t)
      for (int q = 0; q < 4; ++q) out[c][t][q] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t c = 0; c < panels; ++c) {
      const int64_t col = n0 + c * kPanel;
      __m512 acc[kTokensNow][4];
      for (int t = 0; t < kTokensNow; ++t)
        for (int q = 0; q < 4; ++q) acc[t][q] = _mm512_setzero_ps();
      for (int64_t r = g * group_rows / p; r < (g + 1) * group_rows / p; ++r) {
        const uint8_t* row = codes + r * n + col;
        if (c == 0 && r + kAheadRows < k / p) {  // this item's bytes further down, from memory
          for (int64_t ahead = 0; ahead < panels; ++ahead) {
            _mm_prefetch(reinterpret_cast<const char*>(row + kAheadRows * n + ahead * kPanel),
                         _MM_HINT_T0);
          }
        }
        __m512i bytes[4];
        for (int q = 0; q < 4; ++q) {
          const __m128i b16 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16 * q));
          bytes[q] = kSlot == 8 ? _mm512_cvtepi8_epi32(b16) : _mm512_cvtepu8_epi32(b16);
        }
        for (int j = 0; j < p; ++j) {
          __m512 w[4];
          Unpack<kSlot>(bytes, j, w);
          for (int t = 0; t < kTokensNow; ++t) {
            const __m512 xv = _mm512_set1_ps(x[(m0 + t) * k + r * p + j]);
            for (int q = 0; q < 4; ++q) acc[t][q] = _mm512_fmadd_ps(xv, w[q], acc[t][q]);
          }
        }
      }
      for (int q = 0; q < 4; ++q) {
        const __m512 s = _mm512_loadu_ps(scale + g * n + col + 16 * q);
        __m512 o = _mm512_set1_ps(offset);
        if (zero != nullptr) {
          const auto* z16 = reinterpret_cast<const __m128i*>(zero + g * n + col + 16 * q);
          o = _mm512_add_ps(o, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(z16))));
        }
        for (int t = 0; t < kTokensNow; ++t) {
          const __m512 xs = _mm512_set1_ps(xsum[(m0 + t) * groups + g]);
          out[c][t][q] = _mm512_fmadd_ps(s, _mm512_fnmadd_ps(o, xs, acc[t][q]), out[c][t][q]);
        }
      }
    }
  }
  for (int64_t c = 0; c < panels; ++c)
    for (int t = 0; t < kTokensNow; ++t)
      for (int q = 0; q < 4; ++q)
        _mm512_storeu_ps(y + (m0 + t) * n + n0 + c * kPanel + 16 * q, out[c][t][q]);
}

// The same arithmetic, one element at a time: for the last columns of a ragged n.
template <int kSlot>
void ColumnsScalar(const float* x, const uint8_t* codes, const float* scale, const int8_t* zero,
                   const float* xsum, float offset, int64_t m, int64_t k, int64_t n,
                   int64_t groups, int64_t n0, int64_t n1, float* y) {
  constexpr int p = kSlot == 8 ? 1 : 8 / kSlot;
  const int64_t group_rows = k / groups;
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t c = n0; c < n1; ++c) {
      float total = 0.0f;
      for (int64_t g = 0; g < groups; ++g) {
        float acc = 0.0f;
        for (int64_t row = g * group_rows; row < (g + 1) * group_rows; ++row) {
          const uint8_t byte = codes[(row / p) * n + c];
          const float u = kSlot == 8 ? static_cast<float>(static_cast<int8_t>(byte))
                                     : static_cast<float>((byte >> ((row % p) * kSlot)) & ((1 << kSlot) - 1));
          acc += x[i * k + row] * u;
        }
        const float o = offset + (zero != nullptr ? zero[g * n + c] : 0);
        total += scale[g * n + c] * (acc - o * xsum[i * groups + g]);
      }
      y[i * n + c] = total;
    }
  }
}

template <int kSlot>
void Matmul(ffi::ThreadPool& pool, const float* x, const uint8_t* codes, const float* scale,
            const int8_t* zero, const float* xsum, float offset, int64_t m, int64_t k, int64_t n,
            int64_t groups, float* y) {
  const int64_t full = n / kPanel;  // whole 64-column panels; the rest goes one by one
  const int64_t items = (full + kPanelsPerItem - 1) / kPanelsPerItem;
  jaxcomp::ParallelFor(pool, items + (n % kPanel != 0), [&](int64_t item) {
    if (item == items) {
      ColumnsScalar<kSlot>(x, codes, scale, zero, xsum, offset, m, k, n, groups, full * kPanel, n,
                           y);
      return;
    }
    const int64_t n0 = item * kPanelsPerItem * kPanel;
    const int64_t panels = std::min(kPanelsPerItem, full - item * kPanelsPerItem);
    int64_t m0 = 0;
    for (; m0 + kTokens <= m; m0 += kTokens) {
      PanelRows<kSlot, kTokens>(x, codes, scale, zero, xsum, offset, k, n, groups, m0, n0, panels,
                                y);
    }
    for (; m0 < m; ++m0) {
      PanelRows<kSlot, 1>(x, codes, scale, zero, xsum, offset, k, n, groups, m0, n0, panels, y);
    }
  });
}

ffi::Error LowbitMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer codes,
                            ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::S8> zero,
                            ffi::ResultBuffer<ffi::F32> y, int64_t slot, double offset,
                            bool has_zero) {
  if (!Avx512Ready()) {
    return ffi::Error::Internal("jaxcomp_lowbit_matmul needs AVX-512, which this CPU lacks");
  }
  const auto xd = x.dimensions(), cd = codes.dimensions(), sd = scale.dimensions();
  if (slot != 2 && slot != 4 && slot != 8) {
    return ffi::Error::InvalidArgument("jaxcomp_lowbit_matmul: slot must be 2, 4 or 8 bits");
  }
  const int64_t p = 8 / slot;
  if (xd.size() != 2 || cd.size() != 2 || sd.size() != 2 || xd[1] != cd[0] * p ||
      sd[1] != cd[1] || sd[0] == 0 || xd[1] % (sd[0] * p) != 0 ||
      (has_zero && zero.element_count() != sd[0] * sd[1])) {
    return ffi::Error::InvalidArgument(
        "jaxcomp_lowbit_matmul expects x [M, K], codes [K / p, N], scale [G, N] with K a "
        "multiple of G p, and zero [G, N] when has_zero");
  }
  const int64_t m = xd[0], k = xd[1], n = cd[1], groups = sd[0];
  if (m == 0 || n == 0) return ffi::Error::Success();
  // sum of x over each group's rows, per token
  thread_local std::vector<float> xsum;
  xsum.assign(m * groups, 0.0f);
  const float* xs = x.typed_data();
  const int64_t group_rows = k / groups;
  for (int64_t i = 0; i < m; ++i)
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t row = g * group_rows; row < (g + 1) * group_rows; ++row)
        xsum[i * groups + g] += xs[i * k + row];
  const auto* c = static_cast<const uint8_t*>(codes.untyped_data());
  const int8_t* z = has_zero ? zero.typed_data() : nullptr;
  float* out = y->typed_data();
  const float* s = scale.typed_data();
  const float o = static_cast<float>(offset);
  if (slot == 2) Matmul<2>(pool, xs, c, s, z, xsum.data(), o, m, k, n, groups, out);
  if (slot == 4) Matmul<4>(pool, xs, c, s, z, xsum.data(), o, m, k, n, groups, out);
  if (slot == 8) Matmul<8>(pool, xs, c, s, z, xsum.data(), o, m, k, n, groups, out);
  return ffi::Error::Success();
}

}  // namespace

extern "C" int jaxcomp_avx512_ready() { return Avx512Ready() ? 1 : 0; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxcompLowbitMatmul, LowbitMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("slot")
                                  .Attr<double>("offset")
                                  .Attr<bool>("has_zero"));
