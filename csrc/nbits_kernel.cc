// Compute core of ai.tardis::MatMulNBits and ai.tardis::DequantizeMatMul: the int4 predictor's and the int8
// fold's products with int8 activations.
//
// Why our own: ONNX Runtime's MatMulNBits is as fast as this at one token but, from a few tokens on, runs
// at about the speed of a float32 GEMM (it dequantizes), several times slower than the int8 predictor at
// 128 tokens (csrc/README.md has the measurements). Here the weights are repacked once per node into
// tiles of 16 neurons whose 4- or 8-bit levels sit where a 32-bit lane of a dot-product instruction wants
// them, so every loaded byte feeds the multiply-adds as it is (8 bits) or after one mask or shift (4 bits):
// VPDPBUSD (AVX-512 VNNI) or VPMADDUBSW + VPMADDWD (AVX2). Per tile, the tokens go past in groups (kMr,
// kMr8, kMrAvx2) with their accumulators in registers, and a tile (a few KB for the whole K) stays in L1
// while they do. Threads take ranges of tiles. The activations are quantized once per call, 16 blocks of a
// row at a time (QuantizeRowVnni).

#include "nbits_kernel.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <memory>
#include <utility>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define TARDIS_X86 1
#define TARDIS_NB_AVX2 __attribute__((target("avx2,fma")))
#define TARDIS_NB_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
#else
#define TARDIS_X86 0
#endif

namespace tardis {
namespace {

constexpr int kMr = 8;                    // tokens per register group (AVX-512: 32 zmm registers)
constexpr int kMr8 = 12;                  // the same at 8 bits (one accumulator per token, TileVnni8)
constexpr int kMrAvx2 = 4;                // AVX2: 16 ymm registers, 2 accumulators and 2 sums per token
// Multiply-adds per work item, at least: at 4 bits 1 M (one 384 x 1536 token: 1 item); at 8 bits, the fold
// right after a fallback node whose worker threads still spin, 64 K (a 384 x 384 token: 2 items; 8 blocks
// of 384 x 1536 at 1 token with 2 threads ran 2-15% faster than with the fold on one thread).
constexpr int64_t kUnit = int64_t{1} << 20, kUnit8 = int64_t{1} << 16;
// The tiles are read once, in order, from L3 or memory at decode: each 64-byte load also prefetches the
// line this far ahead (about one tile at K = 384), which the hardware streamer alone did not keep up with
// (1 token, 8 nodes of 384 x 1536: 16.1 -> 14.6 us per node; 2,048-8,192 bytes measured alike).
constexpr int64_t kPrefetchBytes = 4096;

// A NaN activation counts as 0, as in ONNX Runtime's MatMulNBits.
inline float Finite0(float v) { return std::isnan(v) ? 0.0f : v; }

void QuantizeRowPortable(const float* x, int64_t K, int64_t bs, int64_t kb, int8_t* q, float* sx, int32_t* sum) {
  for (int64_t b = 0; b < kb; ++b) {
    const int64_t k0 = b * bs, k1 = std::min(K, k0 + bs);
    float amax = 0.0f;
    for (int64_t k = k0; k < k1; ++k) amax = std::max(amax, std::fabs(Finite0(x[k])));
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    int32_t s = 0;
    for (int64_t k = k0; k < k0 + bs; ++k) {
      // |r| <= 127; an infinite x is ±127 (its block's scale is then inf, finite values 0), on every ISA
      const float v = k < k1 ? Finite0(x[k]) : 0.0f;
      const float r = std::isinf(v) ? std::copysign(127.0f, v) : std::nearbyint(v * inv);
      q[k] = static_cast<int8_t>(std::max(-127.0f, std::min(127.0f, r)));
      s += q[k];
    }
    sx[b] = amax / 127.0f;
    sum[b] = s;
  }
}

// The level of neuron n at row k of a block (NBitsPacked's layout).
template <int Bits>
inline int Level(const uint8_t* blk, int n, int64_t k) {
  if constexpr (Bits == 8) return blk[64 * (k / 4) + 4 * n + k % 4];
  const int64_t r = k % 8;
  return (blk[64 * (k / 8) + 4 * n + r % 4] >> (4 * (r / 4))) & 15;
}

// out[m * 16 + n] = sum_b sx[m, b] s[n, b] (sum_k q[m, k] level[n, k] - zp[n, b] sum[m, b]) for one tile
// (8 bits: s[n, b] = s[n], zp = 128).
template <int Bits>
void TilePortable(const uint8_t* tile, int64_t kb, int64_t bs, const NBitsActs& a, int64_t m0, int mr, float* out) {
  const int64_t levels = NBitsPacked::LevelBytes(Bits, bs), bb = NBitsPacked::BlockBytes(Bits, bs);
  std::fill(out, out + 16 * mr, 0.0f);
  for (int64_t b = 0; b < kb; ++b) {
    const uint8_t* blk = tile + b * bb;
    float s[16];
    uint8_t zp[16] = {};
    if constexpr (Bits == 8) {
      std::memcpy(s, tile + kb * bb, sizeof(s));
    } else {
      std::memcpy(s, blk + levels, sizeof(s));
      std::memcpy(zp, blk + levels + 64, sizeof(zp));
    }
    for (int m = 0; m < mr; ++m) {
      const int8_t* xq = a.q + (m0 + m) * a.ld + b * bs;
      const int32_t xs = a.sum[(m0 + m) * kb + b];
      const float sx = a.sx[(m0 + m) * kb + b];
      for (int n = 0; n < 16; ++n) {
        int32_t acc = Bits == 8 ? xs : -zp[n] * xs;  // 8 bits: xs is already -128 x the level sum
        for (int64_t k = 0; k < bs; ++k) acc += Level<Bits>(blk, n, k) * xq[k];
        out[16 * m + n] += static_cast<float>(acc) * (s[n] * sx);
      }
    }
  }
}

#if TARDIS_X86
TARDIS_NB_VNNI inline __mmask16 Mask16(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : n <= 0 ? 0 : static_cast<__mmask16>((1u << n) - 1);
}

// Up to 16 floats (zeros past `left`), NaN read as 0 like the portable path.
TARDIS_NB_VNNI inline __m512 LoadFinite0(const float* p, int64_t left) {
  const __m512 v = _mm512_maskz_loadu_ps(Mask16(left), p);
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, v, _CMP_ORD_Q), v);
}

struct MaxPs {
  TARDIS_NB_VNNI __m512 operator()(__m512 a, __m512 b) const { return _mm512_max_ps(a, b); }
};
struct AddEpi32 {  // int32 lanes in float registers
  TARDIS_NB_VNNI __m512 operator()(__m512 a, __m512 b) const {
    return _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(a), _mm512_castps_si512(b)));
  }
};

// Lane b of the result = op over the 16 lanes of v[b], for 16 vectors at once: four rounds of pairing
// halves, quarters, pairs and lanes of two vectors (30 shuffles and 15 ops for 16 reductions, against ~8
// dependent steps each one at a time), then one permute into block order.
template <class Op>
TARDIS_NB_VNNI inline __m512 Reduce16(__m512 (&v)[16], Op op) {
  for (int i = 0; i < 8; ++i)  // 128-bit quarters: [A0 A1 B0 B1] op [A2 A3 B2 B3]
    v[i] = op(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44), _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)  // quarter q of the result holds vector 4 i + q
    v[i] = op(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x88), _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)  // within quarters: lanes 0-1 from the first vector, 2-3 from the second
    v[i] = op(_mm512_shuffle_ps(v[2 * i], v[2 * i + 1], 0x44), _mm512_shuffle_ps(v[2 * i], v[2 * i + 1], 0xEE));
  const __m512 r = op(_mm512_shuffle_ps(v[0], v[1], 0x88), _mm512_shuffle_ps(v[0], v[1], 0xDD));
  // lane 4 k + j now holds vector 4 j + k
  return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), r);
}

// QuantizeRowPortable's results, 16 blocks at a time: the blocks' maxima reduced together, one division for
// their 16 scales, then the levels with each block's 127 / max broadcast from memory and the level sums
// reduced together as well. Values that are all finite and whole vectors inside K (the usual case, checked
// per 16 blocks) skip the NaN and infinity handling.
TARDIS_NB_VNNI void QuantizeRowVnni(const float* x, int64_t K, int64_t bs, int64_t kb, int8_t* q, float* sx,
                                    int32_t* sum) {
  const __m512i sign = _mm512_set1_epi32(static_cast<int32_t>(0x80000000u));
  const __m512 inf = _mm512_set1_ps(INFINITY);
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
  for (int64_t b0 = 0; b0 < kb; b0 += 16) {
    const int nb = static_cast<int>(std::min<int64_t>(16, kb - b0));
    const int64_t k0 = b0 * bs, k1 = (b0 + nb) * bs;
    const bool whole = k1 <= K;
    __mmask16 finite = 0xFFFF;
    __m512 part[16];
    for (int j = 0; j < 16; ++j) {
      part[j] = _mm512_setzero_ps();
      if (j >= nb) continue;
      for (int64_t k = k0 + j * bs; k < k0 + (j + 1) * bs; k += 16) {
        const __m512 a = whole ? _mm512_abs_ps(_mm512_loadu_ps(x + k)) : _mm512_abs_ps(LoadFinite0(x + k, K - k));
        finite &= _mm512_cmp_ps_mask(a, inf, _CMP_LT_OQ);  // false for NaN and ±inf
        part[j] = _mm512_max_ps(part[j], a);
      }
    }
    if (whole && finite != 0xFFFF) {  // redo with NaN read as 0
      for (int j = 0; j < nb; ++j) {
        part[j] = _mm512_setzero_ps();
        for (int64_t k = k0 + j * bs; k < k0 + (j + 1) * bs; k += 16)
          part[j] = _mm512_max_ps(part[j], _mm512_abs_ps(LoadFinite0(x + k, K - k)));
      }
    }
    const bool fast = whole && finite == 0xFFFF;
    const __m512 amax = Reduce16(part, MaxPs{});
    _mm512_mask_storeu_ps(sx + b0, Mask16(nb), _mm512_div_ps(amax, _mm512_set1_ps(127.0f)));
    alignas(64) float inv[16];  // 127 / amax, 0 where amax is 0
    _mm512_store_ps(inv, _mm512_maskz_div_ps(_mm512_cmp_ps_mask(amax, _mm512_setzero_ps(), _CMP_GT_OQ),
                                             _mm512_set1_ps(127.0f), amax));
    for (int j = 0; j < 16; ++j) {
      __m512i acc = _mm512_setzero_si512();
      const __m512 iv = _mm512_set1_ps(inv[j]);
      for (int64_t k = k0 + j * bs; j < nb && k < k0 + (j + 1) * bs; k += 16) {
        __m512 r;
        if (fast) {
          r = _mm512_mul_ps(_mm512_loadu_ps(x + k), iv);
        } else {  // an infinite x is ±127 by its sign, as in the portable path (inf · 0 would be NaN)
          const __m512 xv = LoadFinite0(x + k, K - k);
          const __m512i x_sign = _mm512_and_si512(_mm512_castps_si512(xv), sign);
          const __m512 signed127 =
              _mm512_castsi512_ps(_mm512_or_si512(x_sign, _mm512_castps_si512(_mm512_set1_ps(127.0f))));
          const __mmask16 is_inf = _mm512_cmp_ps_mask(_mm512_abs_ps(xv), inf, _CMP_EQ_OQ);
          r = _mm512_mask_mov_ps(_mm512_mul_ps(xv, iv), is_inf, signed127);
        }
        // the clamp matters only where 127 / amax overflows (amax subnormal)
        const __m512i c = _mm512_max_epi32(lo, _mm512_min_epi32(hi, _mm512_cvtps_epi32(r)));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm512_cvtepi32_epi8(c));
        acc = _mm512_add_epi32(acc, c);
      }
      part[j] = _mm512_castsi512_ps(acc);
    }
    _mm512_mask_storeu_epi32(sum + b0, Mask16(nb), _mm512_castps_si512(Reduce16(part, AddEpi32{})));
  }
}

inline int32_t Quad(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// acc += v . broadcast(4 bytes at x), as VPDPBUSD with an embedded broadcast. In asm: GCC 12 keeps the
// intrinsic's accumulator apart from its result and copies every accumulator around the loop.
TARDIS_NB_VNNI inline void Dpbusd(__m512i& acc, __m512i v, const int8_t* x) {
  __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(v), "m"(*reinterpret_cast<const int32_t*>(x)));
}

// Each VPDPBUSD adds into its accumulator, so one chain of them waits out the instruction's latency (about
// 6 cycles here, two issued per cycle) at every step: at least four chains are in flight at decode. 4 bits: the low and
// high nibbles go to separate accumulators, and with one or two tokens the block's byte groups alternate
// between two sets as well.
template <int MR>
TARDIS_NB_VNNI void TileVnni4(const uint8_t* tile, int64_t kb, int64_t bs, const NBitsActs& a, int64_t m0, float* out) {
  constexpr int kChains = MR <= 2 ? 4 : 2;  // vectors per block (bs / 8) are a multiple of 2
  const int64_t levels = NBitsPacked::LevelBytes(4, bs), bb = NBitsPacked::BlockBytes(4, bs);
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 h[MR];
  for (int m = 0; m < MR; ++m) h[m] = _mm512_setzero_ps();
  const int8_t* xq[MR];
  for (int m = 0; m < MR; ++m) xq[m] = a.q + (m0 + m) * a.ld;
  for (int64_t b = 0; b < kb; ++b) {
    const uint8_t* blk = tile + b * bb;
    __m512i acc[MR][kChains];
    for (int m = 0; m < MR; ++m)
      for (int c = 0; c < kChains; ++c) acc[m][c] = _mm512_setzero_si512();
    for (int64_t p = 0; p < bs / 8; p += kChains / 2) {
      for (int u = 0; u < kChains / 2; ++u) {
        _mm_prefetch(reinterpret_cast<const char*>(blk + 64 * (p + u) + kPrefetchBytes), _MM_HINT_T0);
        const __m512i v = _mm512_loadu_si512(blk + 64 * (p + u));
        const int64_t k = b * bs + 8 * (p + u);
        const __m512i w0 = _mm512_and_si512(v, low), w1 = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        for (int m = 0; m < MR; ++m) {
          Dpbusd(acc[m][2 * u], w0, xq[m] + k);
          Dpbusd(acc[m][2 * u + 1], w1, xq[m] + k + 4);
        }
      }
    }
    const __m512 s = _mm512_loadu_ps(reinterpret_cast<const float*>(blk + levels));
    const __m512i zp = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + levels + 64)));
    for (int m = 0; m < MR; ++m) {
      __m512i sum = acc[m][0];
      for (int c = 1; c < kChains; ++c) sum = _mm512_add_epi32(sum, acc[m][c]);
      const int64_t i = (m0 + m) * kb + b;
      const __m512i t = _mm512_sub_epi32(sum, _mm512_mullo_epi32(zp, _mm512_set1_epi32(a.sum[i])));
      h[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_mul_ps(s, _mm512_set1_ps(a.sx[i])), h[m]);
    }
  }
  for (int m = 0; m < MR; ++m) _mm512_storeu_ps(out + 16 * m, h[m]);
}

// 8 bits: each loaded vector feeds VPDPBUSD as it is, one instruction per token. Per block a token's
// accumulator starts at -128 x its level sum (a.sum, a broadcast load; the weights' zero point), and is
// scaled into h once: from three tokens on, the tokens' chains alone keep both ports busy
// (kMr8 = 12 tokens: 12 accumulators + 12 h + the weights in 25 of the 32 registers).
template <int MR>
TARDIS_NB_VNNI void TileVnni8(const uint8_t* tile, int64_t kb, int64_t bs, const NBitsActs& a, int64_t m0, float* out) {
  constexpr int kChains = MR == 1 ? 4 : MR == 2 ? 2 : 1;  // vectors per block (bs / 4) are a multiple of 4
  const int64_t bb = NBitsPacked::BlockBytes(8, bs);
  __m512 h[MR];
  for (int m = 0; m < MR; ++m) h[m] = _mm512_setzero_ps();
  const int8_t* xq = a.q + m0 * a.ld;
  const int32_t* sum = a.sum + m0 * kb;
  const float* sx = a.sx + m0 * kb;
  for (int64_t b = 0; b < kb; ++b) {
    const uint8_t* blk = tile + b * bb;
    __m512i acc[MR][kChains];
    for (int m = 0; m < MR; ++m) {
      acc[m][0] = _mm512_set1_epi32(sum[m * kb + b]);
      for (int c = 1; c < kChains; ++c) acc[m][c] = _mm512_setzero_si512();
    }
    for (int64_t p = 0; p < bs / 4; p += kChains) {
      for (int c = 0; c < kChains; ++c) {
        _mm_prefetch(reinterpret_cast<const char*>(blk + 64 * (p + c) + kPrefetchBytes), _MM_HINT_T0);
        const __m512i v = _mm512_loadu_si512(blk + 64 * (p + c));
        const int64_t k = b * bs + 4 * (p + c);
        for (int m = 0; m < MR; ++m)
          Dpbusd(acc[m][c], v, xq + m * a.ld + k);
      }
    }
    for (int m = 0; m < MR; ++m) {
      __m512i t = acc[m][0];
      for (int c = 1; c < kChains; ++c) t = _mm512_add_epi32(t, acc[m][c]);
      h[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_set1_ps(sx[m * kb + b]), h[m]);
    }
  }
  const __m512 s = _mm512_loadu_ps(reinterpret_cast<const float*>(tile + kb * bb));  // the neurons' scales
  for (int m = 0; m < MR; ++m) _mm512_storeu_ps(out + 16 * m, _mm512_mul_ps(h[m], s));
}

// VPMADDUBSW sums pairs of level x int8 in int16, which 8-bit levels (0..255 x 127, twice) would overflow:
// an 8-bit level goes in as its two nibbles, the high one's pair sums weighted by 16 in VPMADDWD. The same
// two nibble vectors that carry two groups of rows at 4 bits.
template <int MR, int Bits>
TARDIS_NB_AVX2 void TileAvx2(const uint8_t* tile, int64_t kb, int64_t bs, const NBitsActs& a, int64_t m0, float* out) {
  constexpr int kRows = 32 / Bits;  // rows of K per 64-byte vector
  const int64_t levels = NBitsPacked::LevelBytes(Bits, bs), bb = NBitsPacked::BlockBytes(Bits, bs);
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1), sixteens = _mm256_set1_epi16(16);
  __m256 h[MR][2];
  for (int m = 0; m < MR; ++m) h[m][0] = h[m][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < kb; ++b) {
    const uint8_t* blk = tile + b * bb;
    __m256i acc[MR][2];
    for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_si256();
    for (int64_t p = 0; p < bs / kRows; ++p) {
      const int64_t k = b * bs + kRows * p;
      _mm_prefetch(reinterpret_cast<const char*>(blk + 64 * p + kPrefetchBytes), _MM_HINT_T0);
      for (int half = 0; half < 2; ++half) {  // neurons 0-7, then 8-15
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 64 * p + 32 * half));
        const __m256i w0 = _mm256_and_si256(v, low), w1 = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
        for (int m = 0; m < MR; ++m) {
          const int8_t* xq = a.q + (m0 + m) * a.ld + k;
          // nibbles 0..15 times int8 0..127 in magnitude: a pair sums to at most 3810, no int16 saturation
          const __m256i p0 = _mm256_maddubs_epi16(w0, _mm256_set1_epi32(Quad(xq)));
          if constexpr (Bits == 8) {  // low and high nibble of the same rows
            const __m256i p1 = _mm256_maddubs_epi16(w1, _mm256_set1_epi32(Quad(xq)));
            acc[m][half] = _mm256_add_epi32(
                acc[m][half], _mm256_add_epi32(_mm256_madd_epi16(p0, ones), _mm256_madd_epi16(p1, sixteens)));
          } else {  // rows k .. k + 3 and k + 4 .. k + 7
            const __m256i p1 = _mm256_maddubs_epi16(w1, _mm256_set1_epi32(Quad(xq + 4)));
            acc[m][half] = _mm256_add_epi32(acc[m][half], _mm256_madd_epi16(_mm256_add_epi16(p0, p1), ones));
          }
        }
      }
    }
    for (int half = 0; half < 2; ++half) {
      for (int m = 0; m < MR; ++m) {
        const int64_t i = (m0 + m) * kb + b;
        if constexpr (Bits == 8) {  // as TileVnni
          const __m256i t = _mm256_add_epi32(acc[m][half], _mm256_set1_epi32(a.sum[i]));
          h[m][half] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), _mm256_set1_ps(a.sx[i]), h[m][half]);
        } else {
          const __m256 s = _mm256_loadu_ps(reinterpret_cast<const float*>(blk + levels) + 8 * half);
          const __m256i zp =
              _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + levels + 64 + 8 * half)));
          const __m256i t = _mm256_sub_epi32(acc[m][half], _mm256_mullo_epi32(zp, _mm256_set1_epi32(a.sum[i])));
          h[m][half] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), _mm256_mul_ps(s, _mm256_set1_ps(a.sx[i])), h[m][half]);
        }
      }
    }
  }
  if constexpr (Bits == 8) {
    for (int half = 0; half < 2; ++half) {
      const __m256 s = _mm256_loadu_ps(reinterpret_cast<const float*>(tile + kb * bb) + 8 * half);
      for (int m = 0; m < MR; ++m) h[m][half] = _mm256_mul_ps(h[m][half], s);
    }
  }
  for (int m = 0; m < MR; ++m) {
    _mm256_storeu_ps(out + 16 * m, h[m][0]);
    _mm256_storeu_ps(out + 16 * m + 8, h[m][1]);
  }
}

using TileFn = void (*)(const uint8_t*, int64_t, int64_t, const NBitsActs&, int64_t, float*);

template <int... I>
constexpr std::array<TileFn, sizeof...(I)> Vnni4Table(std::integer_sequence<int, I...>) {
  return {&TileVnni4<I + 1>...};
}
template <int... I>
constexpr std::array<TileFn, sizeof...(I)> Vnni8Table(std::integer_sequence<int, I...>) {
  return {&TileVnni8<I + 1>...};
}
template <int Bits, int... I>
constexpr std::array<TileFn, sizeof...(I)> Avx2Table(std::integer_sequence<int, I...>) {
  return {&TileAvx2<I + 1, Bits>...};
}
#endif

bool HasVnni() {
#if TARDIS_X86
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  }();
  return has;
#else
  return false;
#endif
}

}  // namespace

int NBitsLevel(Isa isa) {
  if (isa == Isa::kAvx512 && HasVnni()) return 2;
  if (isa != Isa::kPortable && CpuHasAvx2()) return 1;
  return 0;
}

namespace {

// Sizes `out` for K x N at `bits` in blocks of bs, all bytes zero; returns the first tile.
uint8_t* Allocate(int64_t K, int64_t N, int64_t bs, int bits, NBitsPacked* out) {
  out->K = K;
  out->N = N;
  out->bs = bs;
  out->bits = bits;
  out->kb = (K + bs - 1) / bs;
  out->tiles = (N + 15) / 16;
  const size_t bytes = static_cast<size_t>(out->tiles * out->TileBytes());
  out->storage.assign(bytes + 64, 0);
  out->offset = (64 - reinterpret_cast<uintptr_t>(out->storage.data()) % 64) % 64;
  return out->storage.data() + out->offset;
}

}  // namespace

void PackInt4(const uint8_t* b, const float* scales, const uint8_t* zero_points, int64_t K, int64_t N, int64_t bs,
              NBitsPacked* out) {
  uint8_t* base = Allocate(K, N, bs, 4, out);
  const int64_t kb = out->kb, row = kb * bs / 2, zrow = (kb + 1) / 2;
  for (int64_t n = 0; n < N; ++n) {
    const int64_t ln = n % 16;
    for (int64_t blk = 0; blk < kb; ++blk) {
      uint8_t* dst = base + (n / 16) * out->TileBytes() + blk * out->BlockBytes();
      const uint8_t* src = b + n * row + blk * (bs / 2);
      for (int64_t k = 0; k < bs; ++k) {
        const uint8_t level = (src[k / 2] >> (4 * (k % 2))) & 15;
        dst[64 * (k / 8) + 4 * ln + k % 4] |= static_cast<uint8_t>(level << (4 * ((k % 8) / 4)));
      }
      std::memcpy(dst + out->LevelBytes() + 4 * ln, scales + n * kb + blk, sizeof(float));
      const int zp = zero_points ? (zero_points[n * zrow + blk / 2] >> (4 * (blk % 2))) & 15 : 8;
      dst[out->LevelBytes() + 64 + ln] = static_cast<uint8_t>(zp);
    }
  }
}

void PackInt8Columns(const int8_t* b, const float* scales, int64_t K, int64_t N, int64_t bs, NBitsPacked* out) {
  uint8_t* base = Allocate(K, N, bs, 8, out);
  for (int64_t k = 0; k < K; ++k) {  // B's rows in order (contiguous reads)
    const int64_t blk = k / bs, r = k % bs;
    for (int64_t n = 0; n < N; ++n)
      base[(n / 16) * out->TileBytes() + blk * out->BlockBytes() + 64 * (r / 4) + 4 * (n % 16) + r % 4] =
          static_cast<uint8_t>(b[k * N + n] + 128);
  }
  for (int64_t n = 0; n < N; ++n)
    std::memcpy(base + (n / 16) * out->TileBytes() + out->kb * out->BlockBytes() + 4 * (n % 16), scales + n,
                sizeof(float));
}

NBitsActs NBitsQuantize(const NBitsPacked& w, const float* x, int64_t M, Isa isa, std::unique_ptr<uint8_t[]>* big) {
  NBitsActs a;
  a.M = M;
  a.level = NBitsLevel(isa);
  const int64_t K = w.K, bs = w.bs, kb = w.kb;
  a.ld = kb * bs;
  const size_t q_bytes = static_cast<size_t>(M * a.ld + 63) / 64 * 64, n_blocks = static_cast<size_t>(M * kb);
  thread_local std::vector<uint8_t> keep;  // every byte below is written before it is read
  uint8_t* scratch = Scratch(keep, q_bytes + n_blocks * (sizeof(float) + sizeof(int32_t)), big);
  a.q = reinterpret_cast<int8_t*>(scratch);
  a.sx = reinterpret_cast<float*>(scratch + q_bytes);
  a.sum = reinterpret_cast<int32_t*>(scratch + q_bytes + n_blocks * sizeof(float));
  for (int64_t m = 0; m < M; ++m) {
    int8_t* q = a.q + m * a.ld;
    float* sx = a.sx + m * kb;
    int32_t* sum = a.sum + m * kb;
#if TARDIS_X86
    if (a.level == 2)
      QuantizeRowVnni(x + m * K, K, bs, kb, q, sx, sum);
    else
#endif
      QuantizeRowPortable(x + m * K, K, bs, kb, q, sx, sum);
    if (w.bits == 8)
      for (int64_t b = 0; b < kb; ++b) sum[b] *= -128;  // the accumulators' start (zero point 128)
  }
  return a;
}

void NBitsTiles(const NBitsPacked& w, const NBitsActs& a, const float* bias, int64_t t0, int64_t t1, float* h,
                int64_t ldh) {
  const bool eight = w.bits == 8;
  const int mr_max = a.level == 1 ? kMrAvx2 : eight && a.level == 2 ? kMr8 : kMr;
  float out[16 * kMr8];
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* tile = w.data() + t * w.TileBytes();
    const int64_t n0 = 16 * t, nn = std::min<int64_t>(16, w.N - n0);
    for (int64_t m0 = 0; m0 < a.M; m0 += mr_max) {
      const int mr = static_cast<int>(std::min<int64_t>(mr_max, a.M - m0));
#if TARDIS_X86
      if (a.level == 2) {
        static constexpr auto t4 = Vnni4Table(std::make_integer_sequence<int, kMr>{});
        static constexpr auto t8 = Vnni8Table(std::make_integer_sequence<int, kMr8>{});
        (eight ? t8[mr - 1] : t4[mr - 1])(tile, w.kb, w.bs, a, m0, out);
      } else if (a.level == 1) {
        static constexpr auto t4 = Avx2Table<4>(std::make_integer_sequence<int, kMrAvx2>{});
        static constexpr auto t8 = Avx2Table<8>(std::make_integer_sequence<int, kMrAvx2>{});
        (eight ? t8 : t4)[mr - 1](tile, w.kb, w.bs, a, m0, out);
      } else {
        (eight ? TilePortable<8> : TilePortable<4>)(tile, w.kb, w.bs, a, m0, mr, out);
      }
#else
      (eight ? TilePortable<8> : TilePortable<4>)(tile, w.kb, w.bs, a, m0, mr, out);
#endif
      for (int m = 0; m < mr; ++m) {
        float* dst = h + (m0 + m) * ldh + n0 - 16 * t0;
        for (int64_t n = 0; n < nn; ++n) dst[n] = out[16 * m + n] + (bias ? bias[n0 + n] : 0.0f);
      }
    }
  }
}

void NBitsMatMul(const NBitsPacked& w, const float* x, int64_t M, const float* bias, float* h, Isa isa,
                 const Parallel& par) {
  if (M <= 0 || w.N <= 0) return;
  std::unique_ptr<uint8_t[]> big;
  const NBitsActs a = NBitsQuantize(w, x, M, isa, &big);
  const int64_t items = std::max<int64_t>(1, std::min<int64_t>(w.tiles, M * w.N * w.K / (w.bits == 8 ? kUnit8 : kUnit)));
  struct Work {
    const NBitsPacked* w;
    const NBitsActs* a;
    const float* bias;
    float* h;
    int64_t items;
  } work{&w, &a, bias, h, items};
  auto run = [](void* data, size_t item) {
    const Work& wk = *static_cast<const Work*>(data);
    const int64_t tiles = wk.w->tiles, i = static_cast<int64_t>(item);
    const int64_t t0 = tiles * i / wk.items, t1 = tiles * (i + 1) / wk.items;
    NBitsTiles(*wk.w, *wk.a, wk.bias, t0, t1, wk.h + 16 * t0, wk.w->N);
  };
  if (items == 1)
    run(&work, 0);
  else
    par.For(static_cast<size_t>(items), run, &work);
}

}  // namespace tardis
