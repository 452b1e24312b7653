// Packed-weight matmul for CPUs: 16-bit integer activations x 4- or 8-bit weight codes, int32
// dot products (AVX512-VNNI `vpdpbusd` where the build machine has it, AVX2 `vpmaddubsw`
// where it has that, portable C++ elsewhere).
//
// Built at first use by compress.kernels.native with -march=native, and registered as the
// torch op compress_cpu::qlinear, so torch.compile sees one opaque call per Linear.
//
// Weight layout (prepared in native.py; `tiles` of 16 output rows, `blocks` of 32 input
// columns, both zero-padded):
//
//   weight  uint8 [tiles, blocks, CHUNKS, 16 rows, 4 bytes]       CHUNKS = 4 (4-bit), 8 (8-bit)
//     4-bit: byte j of row r in chunk c holds u[r, 8c + j] (low nibble) and u[r, 8c + 4 + j]
//            (high nibble), so one 64-byte load is 16 rows x 8 columns
//     8-bit: byte j of row r in chunk c holds u[r, 4c + j]
//     u = q + 2^(bits-1) >= 0: unsigned, as vpdpbusd wants its first operand
//   scales  fp16 or fp32 [tiles, groups, 16]
//   offsets uint8 [tiles, groups, 16] or none: 2^(bits-1) + zero point (none: symmetric)
//   block_group int32 [blocks]: the scale column of each block (groups are runs of blocks)
//
// `portable` runs the plain C++ loops even where VNNI is built (tests compare the two).
//
// Activations: each block of 32 is scaled to integers v in [-16256, 16256] (v = x / xs_b,
// xs_b = amax / 16256, rounded), and v is split into two int8 digits v = 128 * hi + lo
// (lo in [-64, 63]), because vpdpbusd multiplies bytes: two byte dot products give a
// 15-bit activation, ~3e-5 of the block's largest value, finer than bfloat16's 8 bits.
// (One int8 digit, llama.cpp's Q8_0, doubled the KL a W8 model loses on real text.)
//
// Per output row n and block b:
//   sum_k (q - z) * x = xs_b * (sum_k u * v - (2^(bits-1) + z) * sum_k v)
// and y[n] = sum_b scale[n, g(b)] * that. The integer sums are exact in int32.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define COMPRESS_HAVE_VNNI 1
#else
#define COMPRESS_HAVE_VNNI 0
#endif
// AVX2 without VNNI (most AMD before Zen 4, many laptops): the portable loops ran a
// decode step ~20x slower than this path on an AMD EPYC with AVX2 only.
#if !COMPRESS_HAVE_VNNI && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define COMPRESS_HAVE_AVX2 1
#else
#define COMPRESS_HAVE_AVX2 0
#endif

namespace {

constexpr int64_t kRows = 16;
constexpr int64_t kBlock = 32;
constexpr int64_t kMaxRowsTogether = 4;  // activation rows sharing one pass over a tile
constexpr int64_t kPrefetchBytes = 16384;  // measured best of 4-64 KiB
constexpr int64_t kMinWorkPerThread = 65536;  // weight bytes x rows

// The activations as integers, in buffers kept per calling thread: a decode step makes
// ~100 small calls, and allocating these each time was a measurable share of them.
struct Quantized {
  std::vector<int8_t> high;   // [M, K_pad]: v = 128 * high + low
  std::vector<int8_t> low;    // [M, K_pad]
  std::vector<float> scale;   // [M, blocks]
  std::vector<int32_t> sum;   // [M, blocks]: sum of v over each block

  void resize(int64_t m, int64_t k_pad) {
    high.resize(m * k_pad);
    low.resize(m * k_pad);
    scale.resize(m * k_pad / kBlock);
    sum.resize(m * k_pad / kBlock);
  }
};

constexpr float kLevels = 127.f * 128.f;  // |v| <= 16256 keeps `high` within int8

// One block of 32 values (already float) to integers; returns the sum of v.
inline int32_t quantize_block_scalar(const float* x, float inv, int8_t* high, int8_t* low) {
  int32_t total = 0;
  for (int64_t j = 0; j < kBlock; ++j) {
    const int32_t v = static_cast<int32_t>(std::nearbyint(x[j] * inv));
    const int32_t h = (v + 64) >> 7;  // arithmetic shift: floor((v + 64) / 128)
    high[j] = static_cast<int8_t>(h);
    low[j] = static_cast<int8_t>(v - 128 * h);
    total += v;
  }
  return total;
}

#if COMPRESS_HAVE_VNNI
inline int32_t quantize_block_vnni(const float* x, float inv, int8_t* high, int8_t* low) {
  __m512i sum = _mm512_setzero_si512();
  for (int half = 0; half < 2; ++half) {
    // cvtps rounds to nearest even, as nearbyint does in the default rounding mode
    const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + 16 * half),
                                                       _mm512_set1_ps(inv)));
    const __m512i h = _mm512_srai_epi32(_mm512_add_epi32(v, _mm512_set1_epi32(64)), 7);
    const __m512i l = _mm512_sub_epi32(v, _mm512_slli_epi32(h, 7));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(high + 16 * half), _mm512_cvtepi32_epi8(h));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(low + 16 * half), _mm512_cvtepi32_epi8(l));
    sum = _mm512_add_epi32(sum, v);
  }
  return _mm512_reduce_add_epi32(sum);
}
#endif

#if COMPRESS_HAVE_AVX2
inline int32_t quantize_block_avx2(const float* x, float inv, int8_t* high, int8_t* low) {
  __m256i sum = _mm256_setzero_si256();
  alignas(32) int32_t h32[kBlock], l32[kBlock];
  for (int part = 0; part < 4; ++part) {
    // cvtps rounds to nearest even, as nearbyint does in the default rounding mode
    const __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 8 * part),
                                                       _mm256_set1_ps(inv)));
    const __m256i h = _mm256_srai_epi32(_mm256_add_epi32(v, _mm256_set1_epi32(64)), 7);
    _mm256_store_si256(reinterpret_cast<__m256i*>(h32 + 8 * part), h);
    _mm256_store_si256(reinterpret_cast<__m256i*>(l32 + 8 * part),
                       _mm256_sub_epi32(v, _mm256_slli_epi32(h, 7)));
    sum = _mm256_add_epi32(sum, v);
  }
  for (int64_t j = 0; j < kBlock; ++j) {
    high[j] = static_cast<int8_t>(h32[j]);
    low[j] = static_cast<int8_t>(l32[j]);
  }
  alignas(32) int32_t s[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(s), sum);
  return s[0] + s[1] + s[2] + s[3] + s[4] + s[5] + s[6] + s[7];
}
#endif

template <typename T>
void quantize_activations(const at::Tensor& x, const int64_t* columns, int64_t k_pad,
                          bool portable, Quantized& out) {
  const int64_t m = x.size(0), k = x.size(1), blocks = k_pad / kBlock;
  out.resize(m, k_pad);
  const T* src = x.data_ptr<T>();
  alignas(64) float buf[kBlock];
  for (int64_t i = 0; i < m; ++i) {
    const T* row = src + i * k;
    for (int64_t b = 0; b < blocks; ++b) {
      float amax = 0.f;
      for (int64_t j = 0; j < kBlock; ++j) {
        const int64_t col = columns ? columns[b * kBlock + j] : b * kBlock + j;
        buf[j] = col < k ? static_cast<float>(row[col]) : 0.f;
        amax = std::max(amax, std::fabs(buf[j]));
      }
      const float inv = amax > 0.f ? kLevels / amax : 0.f;
      int8_t* high = out.high.data() + i * k_pad + b * kBlock;
      int8_t* low = out.low.data() + i * k_pad + b * kBlock;
      int32_t total;
#if COMPRESS_HAVE_VNNI
      if (!portable) total = quantize_block_vnni(buf, inv, high, low);
      else total = quantize_block_scalar(buf, inv, high, low);
#elif COMPRESS_HAVE_AVX2
      if (!portable) total = quantize_block_avx2(buf, inv, high, low);
      else total = quantize_block_scalar(buf, inv, high, low);
#else
      total = quantize_block_scalar(buf, inv, high, low);
#endif
      out.scale[i * blocks + b] = amax / kLevels;
      out.sum[i * blocks + b] = total;
    }
  }
}

template <typename S>
inline float scalar_scale(const S* p) { return static_cast<float>(*p); }

struct Problem {
  const uint8_t* weight;
  const void* scales;
  const uint8_t* offsets;  // null: symmetric
  const int32_t* block_group;
  const int8_t* high;
  const int8_t* low;
  const float* xscale;
  const int32_t* xsum;
  float* out;  // float [M, tiles * 16]
  int64_t m, blocks, groups, k_pad, n_pad;
  int bits;
};

template <typename S>
void tile_portable(const Problem& p, int64_t tile, int64_t row0, int64_t rows) {
  const int64_t chunks = p.bits == 4 ? 4 : 8;
  const int64_t block_bytes = chunks * 64;
  const S* scales = static_cast<const S*>(p.scales) + tile * p.groups * kRows;
  const uint8_t* offsets = p.offsets ? p.offsets + tile * p.groups * kRows : nullptr;
  const int32_t centre = 1 << (p.bits - 1);
  for (int64_t i = row0; i < row0 + rows; ++i) {
    float y[kRows] = {0.f};
    for (int64_t b = 0; b < p.blocks; ++b) {
      const uint8_t* w = p.weight + (tile * p.blocks + b) * block_bytes;
      const int8_t* hi = p.high + i * p.k_pad + b * kBlock;
      const int8_t* lo = p.low + i * p.k_pad + b * kBlock;
      int32_t acc[kRows] = {0};
      for (int64_t c = 0; c < chunks; ++c) {
        for (int64_t r = 0; r < kRows; ++r) {
          const uint8_t* wr = w + c * 64 + r * 4;
          int32_t s = 0;
          for (int j = 0; j < 4; ++j) {
            if (p.bits == 4) {
              const int at = 8 * c + j;
              s += (wr[j] & 15) * (128 * hi[at] + lo[at]) +
                   (wr[j] >> 4) * (128 * hi[at + 4] + lo[at + 4]);
            } else {
              const int at = 4 * c + j;
              s += wr[j] * (128 * hi[at] + lo[at]);
            }
          }
          acc[r] += s;
        }
      }
      const int64_t g = p.block_group[b];
      const int64_t at = i * p.blocks + b;
      for (int64_t r = 0; r < kRows; ++r) {
        const int32_t off = offsets ? offsets[g * kRows + r] : centre;
        y[r] += scalar_scale(scales + g * kRows + r) * p.xscale[at] *
                static_cast<float>(acc[r] - off * p.xsum[at]);
      }
    }
    std::memcpy(p.out + i * p.n_pad + tile * kRows, y, sizeof(y));
  }
}

#if COMPRESS_HAVE_VNNI
template <typename S>
inline __m512 load_scales(const S* p);
template <>
inline __m512 load_scales<float>(const float* p) { return _mm512_loadu_ps(p); }
template <>
inline __m512 load_scales<at::Half>(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

inline __m512i broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// R activation rows (1..4) against one tile of 16 output rows: the weight chunk is loaded
// and unpacked once per pass and multiplied into R pairs of accumulators (high, low digit).
template <typename S, int BITS, int R>
void tile_vnni(const Problem& p, int64_t tile, int64_t row0) {
  constexpr int64_t chunks = BITS == 4 ? 4 : 8;
  constexpr int64_t block_bytes = chunks * 64;
  const S* scales = static_cast<const S*>(p.scales) + tile * p.groups * kRows;
  const uint8_t* offsets = p.offsets ? p.offsets + tile * p.groups * kRows : nullptr;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 y[R];
  for (int r = 0; r < R; ++r) y[r] = _mm512_setzero_ps();
  const uint8_t* w = p.weight + tile * p.blocks * block_bytes;
  for (int64_t b = 0; b < p.blocks; ++b, w += block_bytes) {
    __m512i acc_hi[R], acc_lo[R];
    for (int r = 0; r < R; ++r) acc_hi[r] = acc_lo[r] = _mm512_setzero_si512();
    for (int64_t c = 0; c < chunks; ++c) {
      // Far ahead: a decode step streams ~50 MB through many small calls, and the
      // hardware prefetcher alone left it at ~23 GB/s here (31 GB/s with this).
      _mm_prefetch(reinterpret_cast<const char*>(w + c * 64 + kPrefetchBytes), _MM_HINT_T0);
      const __m512i v = _mm512_loadu_si512(w + c * 64);
      if constexpr (BITS == 4) {
        const __m512i first = _mm512_and_si512(v, low4);
        const __m512i second = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
        for (int r = 0; r < R; ++r) {
          const int64_t at = (row0 + r) * p.k_pad + b * kBlock + 8 * c;
          acc_hi[r] = _mm512_dpbusd_epi32(acc_hi[r], first, broadcast4(p.high + at));
          acc_hi[r] = _mm512_dpbusd_epi32(acc_hi[r], second, broadcast4(p.high + at + 4));
          acc_lo[r] = _mm512_dpbusd_epi32(acc_lo[r], first, broadcast4(p.low + at));
          acc_lo[r] = _mm512_dpbusd_epi32(acc_lo[r], second, broadcast4(p.low + at + 4));
        }
      } else {
        for (int r = 0; r < R; ++r) {
          const int64_t at = (row0 + r) * p.k_pad + b * kBlock + 4 * c;
          acc_hi[r] = _mm512_dpbusd_epi32(acc_hi[r], v, broadcast4(p.high + at));
          acc_lo[r] = _mm512_dpbusd_epi32(acc_lo[r], v, broadcast4(p.low + at));
        }
      }
    }
    const int64_t g = p.block_group[b];
    const __m512 s = load_scales<S>(scales + g * kRows);
    const __m512i off = offsets ? _mm512_cvtepu8_epi32(_mm_loadu_si128(
                                      reinterpret_cast<const __m128i*>(offsets + g * kRows)))
                                : _mm512_set1_epi32(1 << (BITS - 1));
    for (int r = 0; r < R; ++r) {
      const int64_t at = (row0 + r) * p.blocks + b;
      const __m512i sum = _mm512_add_epi32(_mm512_slli_epi32(acc_hi[r], 7), acc_lo[r]);
      const __m512i dot = _mm512_sub_epi32(
          sum, _mm512_mullo_epi32(off, _mm512_set1_epi32(p.xsum[at])));
      y[r] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot), s),
                             _mm512_set1_ps(p.xscale[at]), y[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(p.out + (row0 + r) * p.n_pad + tile * kRows, y[r]);
  }
}

template <typename S, int BITS>
void tile_rows_vnni(const Problem& p, int64_t tile, int64_t row0, int64_t rows) {
  switch (rows) {
    case 1: tile_vnni<S, BITS, 1>(p, tile, row0); break;
    case 2: tile_vnni<S, BITS, 2>(p, tile, row0); break;
    case 3: tile_vnni<S, BITS, 3>(p, tile, row0); break;
    default: tile_vnni<S, BITS, 4>(p, tile, row0); break;
  }
}
#endif

#if COMPRESS_HAVE_AVX2
// Eight output rows (one half of a tile) per 256-bit register, one int32 lane per row.
// `vpmaddubsw` multiplies the unsigned codes by the signed activation digits and adds
// neighbouring pairs into int16, saturating: the sums are kept in int16 only while they
// provably fit. A 4-bit pair is at most 2 * 15 * 127 = 3810, and a block adds 8 of them
// per accumulator (30480 < 32767). An 8-bit code is split into its two nibbles for the
// same bound; `vpmaddwd` then widens to int32, multiplying by the digit's (and the
// nibble's) weight on the way: 128 for the high digit, 16 for the high nibble.
template <typename S>
inline __m256 load_scales8(const S* p);
template <>
inline __m256 load_scales8<float>(const float* p) { return _mm256_loadu_ps(p); }
template <>
inline __m256 load_scales8<at::Half>(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

inline __m256i broadcast4_avx2(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

template <typename S, int BITS, int R>
void tile_avx2(const Problem& p, int64_t tile, int64_t row0) {
  constexpr int64_t chunks = BITS == 4 ? 4 : 8;
  constexpr int64_t block_bytes = chunks * 64;
  const S* scales = static_cast<const S*>(p.scales) + tile * p.groups * kRows;
  const uint8_t* offsets = p.offsets ? p.offsets + tile * p.groups * kRows : nullptr;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i one = _mm256_set1_epi16(1);
  const __m256i by16 = _mm256_set1_epi16(16);
  const __m256i by128 = _mm256_set1_epi16(128);
  const __m256i by2048 = _mm256_set1_epi16(2048);
  __m256 y[R][2];
  for (int r = 0; r < R; ++r) y[r][0] = y[r][1] = _mm256_setzero_ps();
  const uint8_t* w = p.weight + tile * p.blocks * block_bytes;
  for (int64_t b = 0; b < p.blocks; ++b, w += block_bytes) {
    __m256i acc[R][2];
    for (int half = 0; half < 2; ++half) {
      // int16 partial sums: [digit high/low][nibble first/second] (8-bit: nibble low/high)
      __m256i s16[R][2][2];
      for (int r = 0; r < R; ++r)
        for (int d = 0; d < 2; ++d) s16[r][d][0] = s16[r][d][1] = _mm256_setzero_si256();
      for (int64_t c = 0; c < chunks; ++c) {
        const uint8_t* src = w + c * 64 + half * 32;
        _mm_prefetch(reinterpret_cast<const char*>(src + kPrefetchBytes), _MM_HINT_T0);
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
        const __m256i first = _mm256_and_si256(v, low4);
        const __m256i second = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
        for (int r = 0; r < R; ++r) {
          if constexpr (BITS == 4) {
            // first nibbles hold columns 8c..8c+3, second nibbles 8c+4..8c+7
            const int64_t at = (row0 + r) * p.k_pad + b * kBlock + 8 * c;
            s16[r][0][0] = _mm256_add_epi16(
                s16[r][0][0], _mm256_maddubs_epi16(first, broadcast4_avx2(p.high + at)));
            s16[r][0][1] = _mm256_add_epi16(
                s16[r][0][1], _mm256_maddubs_epi16(second, broadcast4_avx2(p.high + at + 4)));
            s16[r][1][0] = _mm256_add_epi16(
                s16[r][1][0], _mm256_maddubs_epi16(first, broadcast4_avx2(p.low + at)));
            s16[r][1][1] = _mm256_add_epi16(
                s16[r][1][1], _mm256_maddubs_epi16(second, broadcast4_avx2(p.low + at + 4)));
          } else {
            const int64_t at = (row0 + r) * p.k_pad + b * kBlock + 4 * c;
            const __m256i hi = broadcast4_avx2(p.high + at);
            const __m256i lo = broadcast4_avx2(p.low + at);
            s16[r][0][0] = _mm256_add_epi16(s16[r][0][0], _mm256_maddubs_epi16(first, hi));
            s16[r][0][1] = _mm256_add_epi16(s16[r][0][1], _mm256_maddubs_epi16(second, hi));
            s16[r][1][0] = _mm256_add_epi16(s16[r][1][0], _mm256_maddubs_epi16(first, lo));
            s16[r][1][1] = _mm256_add_epi16(s16[r][1][1], _mm256_maddubs_epi16(second, lo));
          }
        }
      }
      for (int r = 0; r < R; ++r) {
        if constexpr (BITS == 4) {
          const __m256i hi = _mm256_madd_epi16(_mm256_add_epi16(s16[r][0][0], s16[r][0][1]),
                                               by128);
          const __m256i lo = _mm256_madd_epi16(_mm256_add_epi16(s16[r][1][0], s16[r][1][1]),
                                               one);
          acc[r][half] = _mm256_add_epi32(hi, lo);
        } else {
          acc[r][half] = _mm256_add_epi32(
              _mm256_add_epi32(_mm256_madd_epi16(s16[r][0][0], by128),
                               _mm256_madd_epi16(s16[r][0][1], by2048)),
              _mm256_add_epi32(_mm256_madd_epi16(s16[r][1][0], one),
                               _mm256_madd_epi16(s16[r][1][1], by16)));
        }
      }
    }
    const int64_t g = p.block_group[b];
    for (int half = 0; half < 2; ++half) {
      const __m256 s = load_scales8<S>(scales + g * kRows + 8 * half);
      const __m256i off =
          offsets ? _mm256_cvtepu8_epi32(_mm_loadl_epi64(
                        reinterpret_cast<const __m128i*>(offsets + g * kRows + 8 * half)))
                  : _mm256_set1_epi32(1 << (BITS - 1));
      for (int r = 0; r < R; ++r) {
        const int64_t at = (row0 + r) * p.blocks + b;
        const __m256i dot = _mm256_sub_epi32(
            acc[r][half], _mm256_mullo_epi32(off, _mm256_set1_epi32(p.xsum[at])));
        y[r][half] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(dot), s),
                                     _mm256_set1_ps(p.xscale[at]), y[r][half]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    float* out = p.out + (row0 + r) * p.n_pad + tile * kRows;
    _mm256_storeu_ps(out, y[r][0]);
    _mm256_storeu_ps(out + 8, y[r][1]);
  }
}

template <typename S, int BITS>
void tile_rows_avx2(const Problem& p, int64_t tile, int64_t row0, int64_t rows) {
  switch (rows) {
    case 1: tile_avx2<S, BITS, 1>(p, tile, row0); break;
    case 2: tile_avx2<S, BITS, 2>(p, tile, row0); break;
    case 3: tile_avx2<S, BITS, 3>(p, tile, row0); break;
    default: tile_avx2<S, BITS, 4>(p, tile, row0); break;
  }
}
#endif

template <typename S>
void run_tiles(const Problem& p, bool portable) {
  const int64_t tiles = p.n_pad / kRows;
  // Split the tiles between threads, rows within a thread: every weight byte is read from
  // memory once per call whatever M is. A thread gets at least kMinWorkPerThread bytes x
  // rows: below that, waking a second thread costs more than it saves (k/v at M = 1).
  const int64_t tile_work = p.blocks * (p.bits == 4 ? 4 : 8) * 64 * p.m;
  const int64_t grain = std::max<int64_t>(1, kMinWorkPerThread / std::max<int64_t>(1, tile_work));
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t i = 0; i < p.m; i += kMaxRowsTogether) {
        const int64_t rows = std::min(kMaxRowsTogether, p.m - i);
#if COMPRESS_HAVE_VNNI
        if (!portable) {
          if (p.bits == 4) tile_rows_vnni<S, 4>(p, t, i, rows);
          else tile_rows_vnni<S, 8>(p, t, i, rows);
          continue;
        }
#elif COMPRESS_HAVE_AVX2
        if (!portable) {
          if (p.bits == 4) tile_rows_avx2<S, 4>(p, t, i, rows);
          else tile_rows_avx2<S, 8>(p, t, i, rows);
          continue;
        }
#endif
        tile_portable<S>(p, t, i, rows);
      }
    }
  });
}

at::Tensor qlinear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales,
                   const std::optional<at::Tensor>& offsets, const at::Tensor& block_group,
                   const std::optional<at::Tensor>& columns, int64_t bits,
                   int64_t out_features, bool portable, bool poison) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "qlinear: x must be a contiguous [M, K]");
  TORCH_CHECK(bits == 4 || bits == 8, "qlinear: bits must be 4 or 8");
  TORCH_CHECK(weight.scalar_type() == at::kByte && weight.is_contiguous(),
              "qlinear: weight must be contiguous uint8");
  TORCH_CHECK(scales.dim() == 3 && scales.size(2) == kRows && scales.is_contiguous(),
              "qlinear: scales must be contiguous [tiles, groups, 16]");
  TORCH_CHECK(scales.scalar_type() == at::kFloat || scales.scalar_type() == at::kHalf,
              "qlinear: scales must be float32 or float16");
  TORCH_CHECK(block_group.scalar_type() == at::kInt && block_group.is_contiguous(),
              "qlinear: block_group must be contiguous int32");
  const int64_t tiles = scales.size(0), groups = scales.size(1);
  const int64_t blocks = block_group.numel(), k_pad = blocks * kBlock;
  const int64_t chunks = bits == 4 ? 4 : 8;
  TORCH_CHECK(weight.numel() == tiles * blocks * chunks * 64, "qlinear: weight size mismatch");
  TORCH_CHECK(out_features <= tiles * kRows, "qlinear: out_features exceeds the tiles");
  const int64_t* cols = nullptr;
  if (columns.has_value()) {
    TORCH_CHECK(columns->scalar_type() == at::kLong && columns->numel() == k_pad &&
                    columns->is_contiguous(),
                "qlinear: columns must be contiguous int64 [blocks * 32]");
    cols = columns->data_ptr<int64_t>();
  } else {
    TORCH_CHECK(x.size(1) == k_pad, "qlinear: x has ", x.size(1), " columns, expected ",
                k_pad);
  }
  if (offsets.has_value()) {
    TORCH_CHECK(offsets->scalar_type() == at::kByte && offsets->is_contiguous() &&
                    offsets->numel() == tiles * groups * kRows,
                "qlinear: offsets must be contiguous uint8 [tiles, groups, 16]");
  }
  const int32_t* bg = block_group.data_ptr<int32_t>();
  for (int64_t b = 0; b < blocks; ++b) {
    TORCH_CHECK(bg[b] >= 0 && bg[b] < groups, "qlinear: block_group out of range");
  }

  thread_local Quantized q;
  switch (x.scalar_type()) {
    case at::kFloat: quantize_activations<float>(x, cols, k_pad, portable, q); break;
    case at::kBFloat16:
      quantize_activations<at::BFloat16>(x, cols, k_pad, portable, q);
      break;
    case at::kHalf: quantize_activations<at::Half>(x, cols, k_pad, portable, q); break;
    default: TORCH_CHECK(false, "qlinear: x must be float32, bfloat16 or float16");
  }
  const int64_t m = x.size(0), n_pad = tiles * kRows;
  // `poison` (tests) fills the output with NaN first, so any element the tiles miss shows.
  at::Tensor out = poison ? at::full({m, n_pad}, NAN, at::kFloat)
                          : at::empty({m, n_pad}, at::kFloat);
  Problem p{weight.data_ptr<uint8_t>(), scales.data_ptr(),
            offsets.has_value() ? offsets->data_ptr<uint8_t>() : nullptr, bg,
            q.high.data(), q.low.data(), q.scale.data(), q.sum.data(),
            out.data_ptr<float>(), m, blocks, groups, k_pad, n_pad, static_cast<int>(bits)};
  if (m > 0) {
    if (scales.scalar_type() == at::kHalf) run_tiles<at::Half>(p, portable);
    else run_tiles<float>(p, portable);
  }
  at::Tensor y = n_pad == out_features ? out : out.narrow(1, 0, out_features);
  return y.to(x.scalar_type()).contiguous();
}

bool has_vnni() { return COMPRESS_HAVE_VNNI; }

// The vector instructions this build's fast path uses ("portable": none).
std::string isa() {
  return COMPRESS_HAVE_VNNI ? "avx512-vnni" : COMPRESS_HAVE_AVX2 ? "avx2" : "portable";
}

}  // namespace

TORCH_LIBRARY(compress_cpu, m) {
  m.def(
      "qlinear(Tensor x, Tensor weight, Tensor scales, Tensor? offsets, Tensor block_group, "
      "Tensor? columns, int bits, int out_features, bool portable=False, bool poison=False) "
      "-> Tensor");
  m.def("has_vnni() -> bool", &has_vnni);
  m.def("isa() -> str", &isa);
}

TORCH_LIBRARY_IMPL(compress_cpu, CPU, m) { m.impl("qlinear", &qlinear); }
