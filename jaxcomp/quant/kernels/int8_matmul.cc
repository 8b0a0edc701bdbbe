// W8A8 matmul on Intel AMX with dynamic per-token activation scales:
//
//   sa[m] = max_k |x[m, k]| / 127 (1 for an all-zero row),
//   a[m, k] = round_half_even(clip(x[m, k] / sa[m], -127, 127)),
//   y[m, n] = float(sum_k a[m, k] b[k, n]) * (sa[m] * sw[n])
//
// for float32 x [M, K], int8 weight codes b [K, N] and float32 weight scales sw [N],
// the formula of jaxcomp.quant.w8a8_dot_general's XLA path, with x / sa a true
// division (XLA multiplies by the reciprocal; now and then a code differs
// by one). The int32 accumulator is exact.
//
// x is quantized straight into tile order (each 16 x 64 tile one contiguous,
// 64-byte aligned KiB). Each work item is then a panel of 256 output columns: its
// slice of b (256 bytes of each row, so four cache lines per page visited) is
// repacked into AMX's VNNI layout (four consecutive k of a column side by side)
// while it is in cache, and every 32-row block of a runs against each 32-column
// slice with a 2x2 block of 16x16 int32 accumulator tiles (TDPBSSD), k in passes
// of 512 so a pass's b tiles stay in L1. The scales are applied as the
// accumulators leave the tiles.
//
// Reference: Intel 64 and IA-32 Architectures Optimization Reference Manual,
// chapter "Intel Advanced Matrix Extensions".
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kTileK = 64;     // int8 values of k per tile row
constexpr int64_t kTileRows = 16;  // rows of every tile
constexpr int64_t kTileBytes = kTileRows * kTileK;
constexpr int64_t kPanel = 256;  // output columns per item: four cache lines per b row visited
constexpr int64_t kSlice = 64;   // columns packed per step: one cache line of each b row
constexpr int64_t kHalf = 32;    // output columns per accumulator block (two b tiles)
constexpr int64_t kBlockM = 32;  // rows of a per accumulator block (two a tiles)
constexpr int64_t kBlockK = 512;  // k per pass: the half panel's tiles of a pass (16 KiB) stay in L1
constexpr float kInt8Max = 127.0f;

// True once the CPU has AMX-INT8 and Linux has granted this process the tile state.
bool AmxReady() {
  static const bool ready = [] {
    unsigned eax, ebx, ecx, edx;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    const bool tile = (edx >> 24) & 1, int8 = (edx >> 25) & 1;
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return tile && int8 && syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ready;
}

// A 64-byte aligned scratch array that only grows. Tile rows that straddle two
// cache lines load several times slower than aligned ones.
template <typename T>
class AlignedBuffer {
 public:
  T* get(int64_t count) {
    if (count > capacity_) {
      std::free(data_);
      data_ = static_cast<T*>(std::aligned_alloc(64, (count * sizeof(T) + 63) / 64 * 64));
      capacity_ = count;
    }
    return data_;
  }
  ~AlignedBuffer() { std::free(data_); }

 private:
  T* data_ = nullptr;
  int64_t capacity_ = 0;
};

struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-3: int32 accumulators; 4-5: rows of a; 6-7: packed columns of b.
__attribute__((target("amx-tile"))) void ConfigureTiles() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.colsb[t] = kTileK;
    config.rows[t] = kTileRows;
  }
  _tile_loadconfig(&config);
}

// Quantizes rows [16 block, 16 block + 16) of x into tile order
// ([mp / 16][kp / 64][16][64], zero padded) and writes their scales.
__attribute__((target("avx512f,avx512bw"))) void QuantizeRowBlock(const float* x, int64_t m,
                                                                   int64_t k, int64_t kp,
                                                                   int64_t block, int8_t* a,
                                                                   float* sa) {
  int8_t* tiles = a + block * kTileRows * kp;
  std::memset(tiles, 0, kTileRows * kp);
  for (int64_t i = block * kTileRows; i < std::min(m, (block + 1) * kTileRows); ++i) {
    const float* row = x + i * k;
    __m512 amax16 = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= k; j += 16) amax16 = _mm512_max_ps(amax16, _mm512_abs_ps(_mm512_loadu_ps(row + j)));
    float amax = _mm512_reduce_max_ps(amax16);
    for (; j < k; ++j) amax = std::max(amax, std::fabs(row[j]));
    const float scale = amax > 0.0f ? amax / kInt8Max : 1.0f;
    sa[i] = scale;
    const __m512i top = _mm512_set1_epi32(127), bottom = _mm512_set1_epi32(-127);
    const __m512 s = _mm512_set1_ps(scale);
    int8_t* dst = tiles + (i % kTileRows) * kTileK;
    for (j = 0; j + 16 <= k; j += 16) {  // division and round-half-even, as XLA does
      const __m512i q = _mm512_cvtps_epi32(_mm512_div_ps(_mm512_loadu_ps(row + j), s));
      const __m512i c = _mm512_max_epi32(_mm512_min_epi32(q, top), bottom);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (j / kTileK) * kTileBytes + j % kTileK),
                       _mm512_cvtepi32_epi8(c));
    }
    for (; j < k; ++j) {
      const float v = std::min(std::max(row[j] / scale, -kInt8Max), kInt8Max);
      dst[(j / kTileK) * kTileBytes + j % kTileK] = static_cast<int8_t>(std::nearbyint(v));
    }
  }
}

// Packs columns [n0, n0 + 256) of b as eight 32-column slices, [slice][kp / 64][2 tiles],
// each contiguous: row r of tile t (of k-block kb) holds columns 16t + c (c < 16)
// as four bytes b[64 kb + 4r + i][.] (i < 4). Rows past k, columns past n are zero.
__attribute__((target("avx512f,avx512bw"))) void PackPanel(const int8_t* b, int64_t k, int64_t n,
                                                            int64_t n0, int64_t kp, int8_t* out) {
  const int64_t half_bytes = kp * kHalf;
  for (int64_t kb = 0; kb < kp / kTileK; ++kb) {
    for (int64_t r = 0; r < kTileRows; ++r) {
      const int64_t k0 = kb * kTileK + 4 * r;
      for (int64_t s = 0; s < kPanel / kSlice; ++s) {
        const int64_t c0 = n0 + s * kSlice;  // tile t of this 64-column step: + (t / 2) half_bytes
        int8_t* row = out + 2 * s * half_bytes + kb * 2 * kTileBytes + r * kTileK;
        if (c0 + kSlice <= n && k0 + 4 <= k) {
          const int8_t* src = b + k0 * n + c0;
          const __m512i r0 = _mm512_loadu_si512(src), r1 = _mm512_loadu_si512(src + n);
          const __m512i r2 = _mm512_loadu_si512(src + 2 * n), r3 = _mm512_loadu_si512(src + 3 * n);
          // per 128-bit lane L (columns 16L to 16L + 15): interleave the four rows bytewise
          const __m512i lo01 = _mm512_unpacklo_epi8(r0, r1), hi01 = _mm512_unpackhi_epi8(r0, r1);
          const __m512i lo23 = _mm512_unpacklo_epi8(r2, r3), hi23 = _mm512_unpackhi_epi8(r2, r3);
          const __m512i q0 = _mm512_unpacklo_epi16(lo01, lo23);  // columns 0-3 of each lane
          const __m512i q1 = _mm512_unpackhi_epi16(lo01, lo23);  // 4-7
          const __m512i q2 = _mm512_unpacklo_epi16(hi01, hi23);  // 8-11
          const __m512i q3 = _mm512_unpackhi_epi16(hi01, hi23);  // 12-15
          // transpose the 4x4 grid of lanes: row r of tile L is lane L of q0, q1, q2, q3
          const __m512i t01 = _mm512_shuffle_i64x2(q0, q1, 0x44);
          const __m512i t23 = _mm512_shuffle_i64x2(q2, q3, 0x44);
          const __m512i u01 = _mm512_shuffle_i64x2(q0, q1, 0xEE);
          const __m512i u23 = _mm512_shuffle_i64x2(q2, q3, 0xEE);
          _mm512_store_si512(row, _mm512_shuffle_i64x2(t01, t23, 0x88));
          _mm512_store_si512(row + kTileBytes, _mm512_shuffle_i64x2(t01, t23, 0xDD));
          _mm512_store_si512(row + half_bytes, _mm512_shuffle_i64x2(u01, u23, 0x88));
          _mm512_store_si512(row + half_bytes + kTileBytes, _mm512_shuffle_i64x2(u01, u23, 0xDD));
          continue;
        }
        for (int64_t c = 0; c < kSlice; ++c) {
          const int64_t t = c / 16;
          int8_t* dst = row + (t / 2) * half_bytes + (t % 2) * kTileBytes + 4 * (c % 16);
          for (int64_t i = 0; i < 4; ++i) {
            const bool inside = k0 + i < k && c0 + c < n;
            dst[i] = inside ? b[(k0 + i) * n + c0 + c] : 0;
          }
        }
      }
    }
  }
}

// acc[:, 32 h : 32 h + 32] of acc [mp][256] = a (tile order) times the packed 32-column
// slice h ([kp / 64][2 tiles]). k runs in passes of kBlockK; the int32 partial
// sums wait in acc between passes.
__attribute__((target("amx-tile,amx-int8"))) void SliceProduct(const int8_t* a, int64_t mp,
                                                                int64_t kp, const int8_t* slice,
                                                                int32_t* acc) {
  constexpr int64_t stride = kPanel * sizeof(int32_t);
  for (int64_t kc = 0; kc < kp; kc += kBlockK) {
    const int64_t kb_end = std::min(kc + kBlockK, kp) / kTileK;
    for (int64_t m0 = 0; m0 < mp; m0 += kBlockM) {
      int32_t* c = acc + m0 * kPanel;
      if (kc == 0) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
      } else {
        _tile_loadd(0, c, stride);
        _tile_loadd(1, c + 16, stride);
        _tile_loadd(2, c + 16 * kPanel, stride);
        _tile_loadd(3, c + 16 * kPanel + 16, stride);
      }
      const int8_t* a0 = a + m0 * kp;
      const int8_t* a1 = a0 + kTileRows * kp;
      for (int64_t kb = kc / kTileK; kb < kb_end; ++kb) {
        const int8_t* b0 = slice + kb * 2 * kTileBytes;
        _tile_loadd(4, a0 + kb * kTileBytes, kTileK);
        _tile_loadd(5, a1 + kb * kTileBytes, kTileK);
        _tile_loadd(6, b0, kTileK);
        _tile_loadd(7, b0 + kTileBytes, kTileK);
        _tile_dpbssd(0, 4, 6);
        _tile_dpbssd(1, 4, 7);
        _tile_dpbssd(2, 5, 6);
        _tile_dpbssd(3, 5, 7);
      }
      _tile_stored(0, c, stride);
      _tile_stored(1, c + 16, stride);
      _tile_stored(2, c + 16 * kPanel, stride);
      _tile_stored(3, c + 16 * kPanel + 16, stride);
    }
  }
}

// y[i, n0 + j] = float(acc[i, j]) * (sa[i] * sw[n0 + j]) for the valid rows and the
// `cols` valid columns of the panel. Whole rows of a full panel (1 KiB) go out with
// streaming stores: y is not read again here.
__attribute__((target("avx512f"))) void Rescale(const int32_t* acc, const float* sa,
                                                const float* sw, int64_t m, int64_t n,
                                                int64_t n0, int64_t cols, float* y) {
  const bool aligned = (reinterpret_cast<uintptr_t>(y) % 64 == 0) && (n % 16 == 0);
  if (cols == kPanel && aligned) {
    for (int64_t i = 0; i < m; ++i) {
      const __m512 s = _mm512_set1_ps(sa[i]);
      for (int64_t j = 0; j < kPanel; j += 16) {
        const __m512 v = _mm512_cvtepi32_ps(_mm512_load_si512(acc + i * kPanel + j));
        const __m512 w = _mm512_mul_ps(s, _mm512_loadu_ps(sw + n0 + j));
        _mm512_stream_ps(y + i * n + n0 + j, _mm512_mul_ps(v, w));
      }
    }
    _mm_sfence();
    return;
  }
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < cols; ++j) {
      y[i * n + n0 + j] = static_cast<float>(acc[i * kPanel + j]) * (sa[i] * sw[n0 + j]);
    }
  }
}

// b is [K, N], or with `prepacked` already in tile order: [ceil(N / 32)][kp / 64][2 tiles],
// the layout PackPanel makes (jaxcomp.quant._layout.to_amx), read in place.
ffi::Error W8A8MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> b,
                          ffi::Buffer<ffi::F32> sw, ffi::ResultBuffer<ffi::F32> y,
                          bool prepacked) {
  if (!AmxReady()) {
    return ffi::Error::Internal("jaxcomp_w8a8_matmul needs AMX-INT8, which this CPU lacks");
  }
  const auto xd = x.dimensions(), bd = b.dimensions();
  if (xd.size() != 2 || bd.size() != 2) {
    return ffi::Error::InvalidArgument("jaxcomp_w8a8_matmul expects x [M, K] and 2-D b");
  }
  const int64_t m = xd[0], k = xd[1], n = sw.element_count();
  const int64_t mp = (m + kBlockM - 1) / kBlockM * kBlockM;
  const int64_t kp = std::max<int64_t>((k + kTileK - 1) / kTileK * kTileK, kTileK);
  const int64_t slices = (n + kHalf - 1) / kHalf;
  const bool shapes_ok = prepacked ? (bd[0] == slices && bd[1] == kp * kHalf)
                                   : (bd[0] == k && bd[1] == n);
  if (!shapes_ok) {
    return ffi::Error::InvalidArgument(
        "jaxcomp_w8a8_matmul expects x [M, K], sw [N] and b [K, N] (or, prepacked, "
        "[ceil(N / 32), ceil(K / 64) * 2048])");
  }
  if (m == 0 || n == 0) return ffi::Error::Success();
  thread_local AlignedBuffer<int8_t> a_buffer;
  thread_local AlignedBuffer<float> sa_buffer;
  int8_t* a = a_buffer.get(mp * kp);
  float* sa = sa_buffer.get(m);
  const float* x_data = x.typed_data();
  jaxcomp::ParallelFor(pool, mp / kTileRows, [&](int64_t block) {
    QuantizeRowBlock(x_data, m, k, kp, block, a, sa);
  });
  const int8_t* b_data = b.typed_data();
  const float* sw_data = sw.typed_data();
  float* y_data = y->typed_data();
  jaxcomp::ParallelFor(pool, (n + kPanel - 1) / kPanel, [&](int64_t panel) {
    thread_local AlignedBuffer<int8_t> packed_buffer;
    thread_local AlignedBuffer<int32_t> acc_buffer;
    int8_t* packed = packed_buffer.get(kp * kPanel);
    int32_t* acc = acc_buffer.get(mp * kPanel);
    ConfigureTiles();
    const int64_t n0 = panel * kPanel;
    const int8_t* slices_of_panel = b_data + n0 * kp;  // prepacked: slice n0 / 32 onwards
    if (!prepacked) {
      PackPanel(b_data, k, n, n0, kp, packed);
      slices_of_panel = packed;
    }
    const int64_t cols = std::min(kPanel, n - n0);
    for (int64_t h = 0; h * kHalf < cols; ++h) {
      SliceProduct(a, mp, kp, slices_of_panel + h * kp * kHalf, acc + h * kHalf);
    }
    Rescale(acc, sa, sw_data, m, n, n0, cols, y_data);
  });
  return ffi::Error::Success();
}

}  // namespace

extern "C" int jaxcomp_amx_ready() { return AmxReady() ? 1 : 0; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxcompW8A8Matmul, W8A8MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("prepacked"));
