// Compute core of ai.tardis::GuardedFallback.
//
// Four strategies (RunImpl; csrc/README.md has the measurements):
//   tile:   (AVX-512F with d % 16 == 0, or AVX2 with d % 8 == 0; the automatic choice there) neurons in
//          L2-sized blocks, per (token, block) the token's flagged neurons: h from the token's x chunk in
//          registers against the W1t rows, vector corrections, y += C.W2 with the y chunk in registers
//          (RunTile). For large d x tokens the same work in column-panel order (kPanel), so x and y need
//          not fit in L2.
//   token: per token t, for every flagged neuron j: h = x_t . w1t[j] + b1[j], c = GELU(h) - a_j h - b_j,
//          y_t += c * w2[j]. Work: sum_t |F(t)| * 2d, weights gathered per token.
//   union: U = union_t F(t). H = X . W1t_U^T (tokens x |U|) as a blocked product, C = mask(corr(H)),
//          Y += C . W2_U in register-blocked 4-token x 16-column tiles; each W row is read once per block
//          of tokens instead of once per token. Wins when tokens share most flagged neurons (prefill).
//   neuron: per (L2-sized neuron block, token group with L1 panels) the pairs in neuron-major order; H and
//          Y += C.W2 with the weight row slice in registers and the tokens' x / y slices in L1 (RunNeuron).
// Where the tile path cannot run (portable code, or d not a multiple of 8) a cost model picks token, union
// or neuron per call.
// Instruction sets, chosen at run time: AVX2+FMA+F16C (functions compiled with
// __attribute__((target(...))), so the library itself needs no -mavx2; tile kernels with 8-float vectors,
// vector GELU), plus AVX-512F for the tile path with 16-float vectors, the neuron path's block kernels and
// the flag scan where the CPU has it, and portable C++.
// Activations are float32 internally; float16 weights are converted on load (F16C on the AVX2 path).

#include "gf_kernel.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define TARDIS_X86 1
#define TARDIS_AVX2 __attribute__((target("avx2,fma,f16c")))
#else
#define TARDIS_X86 0
#endif

#ifndef ORT_API_MANUAL_INIT
#define ORT_API_MANUAL_INIT
#endif
#include "onnxruntime_cxx_api.h"  // Ort::Float16_t conversions only (header-only code)

namespace tardis {
namespace {

using half = uint16_t;

inline float HalfToFloat(half h) { return Ort::Float16_t::FromBits(h).ToFloat(); }
inline half FloatToHalf(float f) { return Ort::Float16_t(f).val; }
inline void Convert(half h, float* out) { *out = HalfToFloat(h); }
inline void Convert(float f, half* out) { *out = FloatToHalf(f); }

inline float Ld(const float* p, int64_t i) { return p[i]; }
inline float Ld(const half* p, int64_t i) { return HalfToFloat(p[i]); }

constexpr double kInvSqrt2 = 0.70710678118654752440;
constexpr double kSqrt2OverPi = 0.79788456080286535588;

inline float Corr(float h, float a, float b, GeluKind kind) {
  const double x = h;
  const double g = kind == GeluKind::kErf ? 0.5 * x * (1.0 + std::erf(x * kInvSqrt2))
                                          : 0.5 * x * (1.0 + std::tanh(kSqrt2OverPi * (x + 0.044715 * x * x * x)));
  return static_cast<float>(g - (static_cast<double>(a) * x + static_cast<double>(b)));
}

// One entry of a packed C block: a union neuron and its corrections for 4 tokens.
struct Entry {
  float c[4];
  int64_t u;  // index in the union
};

template <class W>
struct Kernels {
  float (*dot)(const float* x, const W* w, int64_t n);
  void (*axpy)(float* y, float a, const W* w, int64_t n);
  // out[k] = x[k] . w for k < 4 (all four rows valid pointers).
  void (*dot4)(const float* const* x, const W* w, int64_t n, float* out);
  // y[k][c0 + i] += sum_e e.c[k] * panel[(e.u - ub) * ld + i] for k < 4, i < c1 - c0 (a packed float
  // panel of W2 rows: contiguous, so the loop over entries does not walk rows d floats apart).
  void (*update4)(float* const* y, const Entry* e, int64_t ne, const float* panel, int64_t ld, int64_t ub,
                  int64_t c0, int64_t c1);
  // Neuron path, one column block [c0, c0 + n) of one neuron (x, y, w already offset by c0; n <= kColBlock):
  // acc[i] += x[tok[i] * ld : +n] . w[0 : n]   for i < m   (the x panel of a column block stays in L1)
  void (*dotblk)(const float* x, int64_t ld, const int32_t* tok, int64_t m, const W* w, int64_t n, float* acc);
  // y[tok[i] * ld : +n] += c[i] * w[0 : n]   for i < m   (distinct tokens)
  void (*axpyblk)(float* y, int64_t ld, const int32_t* tok, const float* c, int64_t m, const W* w, int64_t n);
  int64_t cols;  // the neuron path's column block: the widest n dotblk / axpyblk keep in registers
  // c[i] = GELU(h[i]) - a[i] h[i] - b[i] for i < n
  void (*corr)(float* c, const float* h, const float* a, const float* b, int64_t n, GeluKind kind);
};

inline void CorrRows(float* c, const float* h, const float* a, const float* b, int64_t n, GeluKind kind) {
  for (int64_t i = 0; i < n; ++i) c[i] = Corr(h[i], a[i], b[i], kind);
}

// Column block of the neuron path: 64 floats = 8 AVX2 registers of one weight-row slice; the slices of all
// tokens (128 tokens x 256 bytes = 32 KB) stay in L1 while the neurons of a chunk stream past them.
constexpr int64_t kColBlock = 64;

// Tile path with AVX-512F: kernels per chunk width NV = 1 .. kTileVecs vectors of 16 floats.
constexpr int kTileVecs = 16;
// Tokens per group of the tile path: a neuron block's rows are read from memory once per group, and the
// group's x and y rows (with the block) stay in L2.
constexpr int64_t kTileGroup = 256;
// Tile path order: a token group's x and y rows (float32) larger than this do not fit in L2 beside the
// neuron block; there, for d > 1024, blocks are walked in column panels instead (TilePanels, RunTile),
// with kTilePanelBytes of one panel's W1t (or W2) row slices per block.
constexpr int64_t kTileRowBytes = int64_t{1} << 20;
constexpr int64_t kTilePanelBytes = int64_t{128} << 10;
// Work items the tile path aims for (token groups x neuron splits), and the fewest flagged pairs per
// token group that make a neuron split worth its partial y.
constexpr int64_t kTileItems = 4;
constexpr int64_t kTileMinPairs = 64;
// Work items of the neuron path (each reads every weight block once).
constexpr int64_t kNeuronItems = 4;
// AVX2 tile path: chunks of up to kTileVecs2 vectors of 8 floats (the x or y chunk in 8 of the 16 ymm
// registers, 8 accumulators).
constexpr int kTileVecs2 = 8;
template <class W>
struct TileKernels {
  int lanes = 16;            // floats per vector: 16 (AVX-512F) or 8 (AVX2)
  int vecs = kTileVecs;      // vectors per chunk at most
  // h[q] += x[0 : lanes NV] . w[js[q] * d : + lanes NV]  for q < n   (x, w offset by the chunk's first column)
  void (*dots[kTileVecs])(const float* x, const W* w, int64_t d, const int32_t* js, int64_t n, float* h);
  // y[0 : lanes NV] += sum_q c[q] * w[js[q] * d : + lanes NV]
  void (*axpy[kTileVecs])(float* y, const W* w, int64_t d, const int32_t* js, const float* c, int64_t n);
};

// ------------------------------------------------------------------------------------------------
// Portable kernels
namespace portable {

template <class W>
float Dot(const float* x, const W* w, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) acc[k] += x[i + k] * Ld(w, i + k);
  float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  for (; i < n; ++i) s += x[i] * Ld(w, i);
  return s;
}

template <class W>
void Axpy(float* y, float a, const W* w, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * Ld(w, i);
}

template <class W>
void Dot4(const float* const* x, const W* w, int64_t n, float* out) {
  float a0 = 0, a1 = 0, a2 = 0, a3 = 0;
  const float *x0 = x[0], *x1 = x[1], *x2 = x[2], *x3 = x[3];
  for (int64_t i = 0; i < n; ++i) {
    const float wv = Ld(w, i);
    a0 += x0[i] * wv;
    a1 += x1[i] * wv;
    a2 += x2[i] * wv;
    a3 += x3[i] * wv;
  }
  out[0] = a0;
  out[1] = a1;
  out[2] = a2;
  out[3] = a3;
}

inline void Update4(float* const* y, const Entry* e, int64_t ne, const float* panel, int64_t ld, int64_t ub,
                    int64_t c0, int64_t c1) {
  constexpr int64_t kB = 16;
  for (int64_t c = c0; c < c1; c += kB) {
    const int64_t m = std::min(kB, c1 - c);
    float acc[4][kB];
    for (int k = 0; k < 4; ++k)
      for (int64_t i = 0; i < m; ++i) acc[k][i] = y[k][c + i];
    for (int64_t q = 0; q < ne; ++q) {
      const float* row = panel + (e[q].u - ub) * ld + (c - c0);
      for (int64_t i = 0; i < m; ++i) {
        const float wv = row[i];
        for (int k = 0; k < 4; ++k) acc[k][i] += e[q].c[k] * wv;
      }
    }
    for (int k = 0; k < 4; ++k)
      for (int64_t i = 0; i < m; ++i) y[k][c + i] = acc[k][i];
  }
}

template <class W>
void DotBlk(const float* x, int64_t ld, const int32_t* tok, int64_t m, const W* w, int64_t n, float* acc) {
  float wf[kColBlock];
  for (int64_t i = 0; i < n; ++i) wf[i] = Ld(w, i);
  for (int64_t q = 0; q < m; ++q) acc[q] += Dot(x + tok[q] * ld, wf, n);
}

template <class W>
void AxpyBlk(float* y, int64_t ld, const int32_t* tok, const float* c, int64_t m, const W* w, int64_t n) {
  float wf[kColBlock];
  for (int64_t i = 0; i < n; ++i) wf[i] = Ld(w, i);
  for (int64_t q = 0; q < m; ++q) Axpy(y + tok[q] * ld, c[q], wf, n);
}

template <class W>
Kernels<W> Get() {
  return Kernels<W>{&Dot<W>, &Axpy<W>, &Dot4<W>, &Update4, &DotBlk<W>, &AxpyBlk<W>, kColBlock, &CorrRows};
}

}  // namespace portable

// ------------------------------------------------------------------------------------------------
// AVX2 + FMA (+ F16C for float16 weights)
#if TARDIS_X86
namespace avx2 {

TARDIS_AVX2 inline __m256 Ld8(const float* p) { return _mm256_loadu_ps(p); }
TARDIS_AVX2 inline __m256 Ld8(const half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
TARDIS_AVX2 inline float Hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <class W>
TARDIS_AVX2 float Dot(const float* x, const W* w, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), Ld8(w + i), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8), Ld8(w + i + 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 16), Ld8(w + i + 16), a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 24), Ld8(w + i + 24), a3);
  }
  for (; i + 8 <= n; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), Ld8(w + i), a0);
  float s = Hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; i < n; ++i) s += x[i] * Ld(w, i);
  return s;
}

template <class W>
TARDIS_AVX2 void Axpy(float* y, float a, const W* w, int64_t n) {
  const __m256 av = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, Ld8(w + i), _mm256_loadu_ps(y + i)));
    _mm256_storeu_ps(y + i + 8, _mm256_fmadd_ps(av, Ld8(w + i + 8), _mm256_loadu_ps(y + i + 8)));
  }
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, Ld8(w + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += a * Ld(w, i);
}

template <class W>
TARDIS_AVX2 void Dot4(const float* const* x, const W* w, int64_t n, float* out) {
  const float *x0 = x[0], *x1 = x[1], *x2 = x[2], *x3 = x[3];
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  __m256 b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps(), b2 = _mm256_setzero_ps(), b3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 w0 = Ld8(w + i), w1 = Ld8(w + i + 8);
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + i), w0, a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x1 + i), w0, a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x2 + i), w0, a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x3 + i), w0, a3);
    b0 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + i + 8), w1, b0);
    b1 = _mm256_fmadd_ps(_mm256_loadu_ps(x1 + i + 8), w1, b1);
    b2 = _mm256_fmadd_ps(_mm256_loadu_ps(x2 + i + 8), w1, b2);
    b3 = _mm256_fmadd_ps(_mm256_loadu_ps(x3 + i + 8), w1, b3);
  }
  for (; i + 8 <= n; i += 8) {
    const __m256 w0 = Ld8(w + i);
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + i), w0, a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x1 + i), w0, a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x2 + i), w0, a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x3 + i), w0, a3);
  }
  float s0 = Hsum(_mm256_add_ps(a0, b0)), s1 = Hsum(_mm256_add_ps(a1, b1));
  float s2 = Hsum(_mm256_add_ps(a2, b2)), s3 = Hsum(_mm256_add_ps(a3, b3));
  for (; i < n; ++i) {
    const float wv = Ld(w, i);
    s0 += x0[i] * wv;
    s1 += x1[i] * wv;
    s2 += x2[i] * wv;
    s3 += x3[i] * wv;
  }
  out[0] = s0;
  out[1] = s1;
  out[2] = s2;
  out[3] = s3;
}

TARDIS_AVX2 void Update4(float* const* y, const Entry* e, int64_t ne, const float* panel, int64_t ld, int64_t ub,
                        int64_t c0, int64_t c1) {
  float *y0 = y[0], *y1 = y[1], *y2 = y[2], *y3 = y[3];
  int64_t c = c0;
  for (; c + 16 <= c1; c += 16) {
    __m256 p0 = _mm256_loadu_ps(y0 + c), q0 = _mm256_loadu_ps(y0 + c + 8);
    __m256 p1 = _mm256_loadu_ps(y1 + c), q1 = _mm256_loadu_ps(y1 + c + 8);
    __m256 p2 = _mm256_loadu_ps(y2 + c), q2 = _mm256_loadu_ps(y2 + c + 8);
    __m256 p3 = _mm256_loadu_ps(y3 + c), q3 = _mm256_loadu_ps(y3 + c + 8);
    for (int64_t k = 0; k < ne; ++k) {
      const float* row = panel + (e[k].u - ub) * ld + (c - c0);
      const __m256 w0 = _mm256_loadu_ps(row), w1 = _mm256_loadu_ps(row + 8);
      __m256 s = _mm256_broadcast_ss(&e[k].c[0]);
      p0 = _mm256_fmadd_ps(s, w0, p0);
      q0 = _mm256_fmadd_ps(s, w1, q0);
      s = _mm256_broadcast_ss(&e[k].c[1]);
      p1 = _mm256_fmadd_ps(s, w0, p1);
      q1 = _mm256_fmadd_ps(s, w1, q1);
      s = _mm256_broadcast_ss(&e[k].c[2]);
      p2 = _mm256_fmadd_ps(s, w0, p2);
      q2 = _mm256_fmadd_ps(s, w1, q2);
      s = _mm256_broadcast_ss(&e[k].c[3]);
      p3 = _mm256_fmadd_ps(s, w0, p3);
      q3 = _mm256_fmadd_ps(s, w1, q3);
    }
    _mm256_storeu_ps(y0 + c, p0);
    _mm256_storeu_ps(y0 + c + 8, q0);
    _mm256_storeu_ps(y1 + c, p1);
    _mm256_storeu_ps(y1 + c + 8, q1);
    _mm256_storeu_ps(y2 + c, p2);
    _mm256_storeu_ps(y2 + c + 8, q2);
    _mm256_storeu_ps(y3 + c, p3);
    _mm256_storeu_ps(y3 + c + 8, q3);
  }
  for (; c + 8 <= c1; c += 8) {
    __m256 p0 = _mm256_loadu_ps(y0 + c), p1 = _mm256_loadu_ps(y1 + c);
    __m256 p2 = _mm256_loadu_ps(y2 + c), p3 = _mm256_loadu_ps(y3 + c);
    for (int64_t k = 0; k < ne; ++k) {
      const __m256 w0 = _mm256_loadu_ps(panel + (e[k].u - ub) * ld + (c - c0));
      p0 = _mm256_fmadd_ps(_mm256_broadcast_ss(&e[k].c[0]), w0, p0);
      p1 = _mm256_fmadd_ps(_mm256_broadcast_ss(&e[k].c[1]), w0, p1);
      p2 = _mm256_fmadd_ps(_mm256_broadcast_ss(&e[k].c[2]), w0, p2);
      p3 = _mm256_fmadd_ps(_mm256_broadcast_ss(&e[k].c[3]), w0, p3);
    }
    _mm256_storeu_ps(y0 + c, p0);
    _mm256_storeu_ps(y1 + c, p1);
    _mm256_storeu_ps(y2 + c, p2);
    _mm256_storeu_ps(y3 + c, p3);
  }
  if (c < c1) portable::Update4(y, e, ne, panel + (c - c0), ld, ub, c, c1);
}

// Sums of four vectors: {sum(a), sum(b), sum(c), sum(d)}.
TARDIS_AVX2 inline __m128 Hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

template <class W>
TARDIS_AVX2 void DotBlk(const float* x, int64_t ld, const int32_t* tok, int64_t m, const W* w, int64_t n, float* acc) {
  if (n != kColBlock) {
    for (int64_t q = 0; q < m; ++q) acc[q] += Dot(x + tok[q] * ld, w, n);
    return;
  }
  const __m256 w0 = Ld8(w), w1 = Ld8(w + 8), w2 = Ld8(w + 16), w3 = Ld8(w + 24);
  const __m256 w4 = Ld8(w + 32), w5 = Ld8(w + 40), w6 = Ld8(w + 48), w7 = Ld8(w + 56);
  // Two chains per token (even / odd vectors), four tokens at a time: 8 independent FMA chains.
  auto one = [&](const float* r, __m256& a, __m256& b) TARDIS_AVX2 {
    a = _mm256_mul_ps(_mm256_loadu_ps(r), w0);
    b = _mm256_mul_ps(_mm256_loadu_ps(r + 8), w1);
    a = _mm256_fmadd_ps(_mm256_loadu_ps(r + 16), w2, a);
    b = _mm256_fmadd_ps(_mm256_loadu_ps(r + 24), w3, b);
    a = _mm256_fmadd_ps(_mm256_loadu_ps(r + 32), w4, a);
    b = _mm256_fmadd_ps(_mm256_loadu_ps(r + 40), w5, b);
    a = _mm256_fmadd_ps(_mm256_loadu_ps(r + 48), w6, a);
    b = _mm256_fmadd_ps(_mm256_loadu_ps(r + 56), w7, b);
  };
  int64_t q = 0;
  for (; q + 4 <= m; q += 4) {
    __m256 a0, b0, a1, b1, a2, b2, a3, b3;
    one(x + tok[q] * ld, a0, b0);
    one(x + tok[q + 1] * ld, a1, b1);
    one(x + tok[q + 2] * ld, a2, b2);
    one(x + tok[q + 3] * ld, a3, b3);
    const __m128 s = Hsum4(_mm256_add_ps(a0, b0), _mm256_add_ps(a1, b1), _mm256_add_ps(a2, b2), _mm256_add_ps(a3, b3));
    _mm_storeu_ps(acc + q, _mm_add_ps(_mm_loadu_ps(acc + q), s));
  }
  for (; q < m; ++q) {
    __m256 a, b;
    one(x + tok[q] * ld, a, b);
    acc[q] += Hsum(_mm256_add_ps(a, b));
  }
}

template <class W>
TARDIS_AVX2 void AxpyBlk(float* y, int64_t ld, const int32_t* tok, const float* c, int64_t m, const W* w, int64_t n) {
  if (n != kColBlock) {
    for (int64_t q = 0; q < m; ++q) Axpy(y + tok[q] * ld, c[q], w, n);
    return;
  }
  const __m256 w0 = Ld8(w), w1 = Ld8(w + 8), w2 = Ld8(w + 16), w3 = Ld8(w + 24);
  const __m256 w4 = Ld8(w + 32), w5 = Ld8(w + 40), w6 = Ld8(w + 48), w7 = Ld8(w + 56);
  for (int64_t q = 0; q < m; ++q) {
    float* r = y + tok[q] * ld;
    const __m256 cv = _mm256_broadcast_ss(c + q);
    _mm256_storeu_ps(r, _mm256_fmadd_ps(cv, w0, _mm256_loadu_ps(r)));
    _mm256_storeu_ps(r + 8, _mm256_fmadd_ps(cv, w1, _mm256_loadu_ps(r + 8)));
    _mm256_storeu_ps(r + 16, _mm256_fmadd_ps(cv, w2, _mm256_loadu_ps(r + 16)));
    _mm256_storeu_ps(r + 24, _mm256_fmadd_ps(cv, w3, _mm256_loadu_ps(r + 24)));
    _mm256_storeu_ps(r + 32, _mm256_fmadd_ps(cv, w4, _mm256_loadu_ps(r + 32)));
    _mm256_storeu_ps(r + 40, _mm256_fmadd_ps(cv, w5, _mm256_loadu_ps(r + 40)));
    _mm256_storeu_ps(r + 48, _mm256_fmadd_ps(cv, w6, _mm256_loadu_ps(r + 48)));
    _mm256_storeu_ps(r + 56, _mm256_fmadd_ps(cv, w7, _mm256_loadu_ps(r + 56)));
  }
}

// The members of a Vec traits struct that AVX2 and AVX-512 spell alike (PFX##_op_ps), one list for both.
#define TARDIS_VEC_ARITH(ATTR, PFX)                                                     \
  ATTR static Reg Set1(float v) { return PFX##_set1_ps(v); }                           \
  ATTR static Reg Zero() { return PFX##_setzero_ps(); }                                \
  ATTR static Reg Add(Reg a, Reg b) { return PFX##_add_ps(a, b); }                     \
  ATTR static Reg Sub(Reg a, Reg b) { return PFX##_sub_ps(a, b); }                     \
  ATTR static Reg Mul(Reg a, Reg b) { return PFX##_mul_ps(a, b); }                     \
  ATTR static Reg Div(Reg a, Reg b) { return PFX##_div_ps(a, b); }                     \
  ATTR static Reg Fma(Reg a, Reg b, Reg c) { return PFX##_fmadd_ps(a, b, c); }         \
  ATTR static Reg Fnma(Reg a, Reg b, Reg c) { return PFX##_fnmadd_ps(a, b, c); }       \
  ATTR static Reg Min(Reg a, Reg b) { return PFX##_min_ps(a, b); }                     \
  ATTR static Reg Max(Reg a, Reg b) { return PFX##_max_ps(a, b); }

// 8-float vectors for simd_tile.h (the tile path and vector GELU with AVX2).
struct Vec {
  using Reg = __m256;
  static constexpr int kLanes = 8, kTileVecs = kTileVecs2;
  TARDIS_AVX2 static Reg Load(const float* p) { return _mm256_loadu_ps(p); }
  TARDIS_AVX2 static Reg Load(const half* p) { return Ld8(p); }
  TARDIS_AVX2 static void Store(float* p, Reg v) { _mm256_storeu_ps(p, v); }
  // The first m < 8 lanes (the others read as 0, not stored).
  TARDIS_AVX2 static __m256i FirstLanes(int m) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(m), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  TARDIS_AVX2 static Reg LoadN(const float* p, int m) { return _mm256_maskload_ps(p, FirstLanes(m)); }
  TARDIS_AVX2 static void StoreN(float* p, Reg v, int m) { _mm256_maskstore_ps(p, FirstLanes(m), v); }
  TARDIS_VEC_ARITH(TARDIS_AVX2, _mm256)
  TARDIS_AVX2 static Reg Round(Reg a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  // p * 2^n for integral n in [-126, 127]: n built into a float's exponent field.
  TARDIS_AVX2 static Reg Scale2(Reg p, Reg n) {
    return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n),
                                                                                     _mm256_set1_epi32(127)), 23)));
  }
  TARDIS_AVX2 static Reg SignBits(Reg a) { return _mm256_and_ps(a, _mm256_set1_ps(-0.0f)); }
  TARDIS_AVX2 static Reg Xor(Reg a, Reg b) { return _mm256_xor_ps(a, b); }
  TARDIS_AVX2 static float Sum(Reg a) { return Hsum(a); }
  TARDIS_AVX2 static __m128 Sum4(Reg a, Reg b, Reg c, Reg d) { return Hsum4(a, b, c, d); }
};
#define TARDIS_SIMD TARDIS_AVX2
#include "simd_tile.h"  // NOLINT(build/include): one copy per instruction set
#undef TARDIS_SIMD

template <class W>
Kernels<W> Get() {
  return Kernels<W>{&Dot<W>, &Axpy<W>, &Dot4<W>, &Update4, &DotBlk<W>, &AxpyBlk<W>, kColBlock, &CorrN};
}

// Flag scan of one token row (float32, or float16 widened exactly): indices j with hh[j] < lo[j] or
// hh[j] > hi[j] (ordered compares: NaN is not flagged).
template <class W>
TARDIS_AVX2 int64_t FlagRowVec(const W* hh, const W* lo, const W* hi, int64_t D, int32_t* out) {
  int64_t n = 0, j = 0;
  for (; j + 8 <= D; j += 8) {
    const __m256 v = Ld8(hh + j);
    const __m256 f = _mm256_or_ps(_mm256_cmp_ps(v, Ld8(lo + j), _CMP_LT_OQ), _mm256_cmp_ps(v, Ld8(hi + j), _CMP_GT_OQ));
    unsigned m = static_cast<unsigned>(_mm256_movemask_ps(f));
    while (m) {
      out[n++] = static_cast<int32_t>(j + __builtin_ctz(m));
      m &= m - 1;
    }
  }
  for (; j < D; ++j) {
    const float v = Ld(hh, j);
    out[n] = static_cast<int32_t>(j);
    n += static_cast<int64_t>((v < Ld(lo, j)) | (v > Ld(hi, j)));
  }
  return n;
}

// float16 <-> float32, 8 values per instruction (F16C; to float16 rounding to nearest even, as
// Ort::Float16_t does).
TARDIS_AVX2 inline void Store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
TARDIS_AVX2 inline void Store8(half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
template <class S, class T>
TARDIS_AVX2 void ConvertRow(const S* src, T* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) Store8(dst + i, Ld8(src + i));
  for (; i < n; ++i) Convert(src[i], dst + i);
}

}  // namespace avx2

// AVX-512F block kernels of the neuron path (the rest of the AVX2 set is reused): one 64-float column
// block is 4 zmm registers. Chosen at run time when the CPU has AVX-512F (Isa::kAvx512).
#define TARDIS_AVX512 __attribute__((target("avx512f,avx2,fma,f16c")))
namespace avx512 {

TARDIS_AVX512 inline __m512 Ld16(const float* p) { return _mm512_loadu_ps(p); }
TARDIS_AVX512 inline __m512 Ld16(const half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
TARDIS_AVX512 inline __m256 Fold(__m512 v) {
  return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

// 16-float vectors for simd_tile.h (the tile path, the neuron path's block dots and vector GELU).
struct Vec {
  using Reg = __m512;
  static constexpr int kLanes = 16, kTileVecs = tardis::kTileVecs;
  TARDIS_AVX512 static Reg Load(const float* p) { return _mm512_loadu_ps(p); }
  TARDIS_AVX512 static Reg Load(const half* p) { return Ld16(p); }
  TARDIS_AVX512 static void Store(float* p, Reg v) { _mm512_storeu_ps(p, v); }
  // The first m < 16 lanes (the others read as 0, not stored).
  TARDIS_AVX512 static Reg LoadN(const float* p, int m) {
    return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << m) - 1u), p);
  }
  TARDIS_AVX512 static void StoreN(float* p, Reg v, int m) {
    _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << m) - 1u), v);
  }
  TARDIS_VEC_ARITH(TARDIS_AVX512, _mm512)
  TARDIS_AVX512 static Reg Round(Reg a) {
    return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  TARDIS_AVX512 static Reg Scale2(Reg p, Reg n) { return _mm512_scalef_ps(p, n); }
  // Bitwise operations on the integer view (the float forms need AVX-512DQ).
  TARDIS_AVX512 static Reg SignBits(Reg a) {
    return _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(a), _mm512_set1_epi32(INT32_MIN)));
  }
  TARDIS_AVX512 static Reg Xor(Reg a, Reg b) {
    return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(a), _mm512_castps_si512(b)));
  }
  TARDIS_AVX512 static float Sum(Reg a) { return _mm512_reduce_add_ps(a); }
  TARDIS_AVX512 static __m128 Sum4(Reg a, Reg b, Reg c, Reg d) {
    return avx2::Hsum4(Fold(a), Fold(b), Fold(c), Fold(d));
  }
};
#undef TARDIS_VEC_ARITH
#define TARDIS_SIMD TARDIS_AVX512
#include "simd_tile.h"  // NOLINT(build/include): one copy per instruction set
#undef TARDIS_SIMD

// Neuron path blocks of NV vectors (16 NV columns): the weight row slice in NV registers, the tokens' x
// slices (an L1-resident panel) streamed past it.
template <class W, int NV>
TARDIS_AVX512 void DotBlkN(const float* x, int64_t ld, const int32_t* tok, int64_t m, const W* w, float* acc) {
  __m512 wr[NV];
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) wr[v] = Ld16(w + 16 * v);
  RegDots<float, NV>(wr, x, ld, tok, m, acc);
}

template <class W, int NV>
TARDIS_AVX512 void AxpyBlkN(float* y, int64_t ld, const int32_t* tok, const float* c, int64_t m, const W* w) {
  __m512 wr[NV];
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) wr[v] = Ld16(w + 16 * v);
  for (int64_t q = 0; q < m; ++q) {
    float* r = y + tok[q] * ld;
    const __m512 cv = _mm512_set1_ps(c[q]);
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(r + 16 * v, _mm512_fmadd_ps(cv, wr[v], _mm512_loadu_ps(r + 16 * v)));
  }
}

template <class W, int... I>
constexpr auto DotBlkTable(std::integer_sequence<int, I...>) {
  return std::array<void (*)(const float*, int64_t, const int32_t*, int64_t, const W*, float*), sizeof...(I)>{
      &DotBlkN<W, I + 1>...};
}
template <class W, int... I>
constexpr auto AxpyBlkTable(std::integer_sequence<int, I...>) {
  return std::array<void (*)(float*, int64_t, const int32_t*, const float*, int64_t, const W*), sizeof...(I)>{
      &AxpyBlkN<W, I + 1>...};
}

// Column blocks of up to 16 kTileVecs floats (kTileVecs registers); other widths: AVX2 rows.
template <class W>
void DotBlk(const float* x, int64_t ld, const int32_t* tok, int64_t m, const W* w, int64_t n, float* acc) {
  static constexpr auto table = DotBlkTable<W>(std::make_integer_sequence<int, kTileVecs>{});
  if (n % 16 == 0 && n > 0 && n <= 16 * kTileVecs) return table[n / 16 - 1](x, ld, tok, m, w, acc);
  for (int64_t q = 0; q < m; ++q) acc[q] += avx2::Dot(x + tok[q] * ld, w, n);
}

template <class W>
void AxpyBlk(float* y, int64_t ld, const int32_t* tok, const float* c, int64_t m, const W* w, int64_t n) {
  static constexpr auto table = AxpyBlkTable<W>(std::make_integer_sequence<int, kTileVecs>{});
  if (n % 16 == 0 && n > 0 && n <= 16 * kTileVecs) return table[n / 16 - 1](y, ld, tok, c, m, w);
  for (int64_t q = 0; q < m; ++q) avx2::Axpy(y + tok[q] * ld, c[q], w, n);
}

// Flag scan of one float token row with AVX-512F: compare 16 lanes, compress the flagged indices into a
// full-width store (n <= j, so the 16-lane store stays inside the D-entry row).
template <class W>
TARDIS_AVX512 int64_t FlagRowVec(const W* hh, const W* lo, const W* hi, int64_t D, int32_t* out) {
  int64_t n = 0, j = 0;
  const __m512i step = _mm512_set1_epi32(16);
  __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (; j + 16 <= D; j += 16, idx = _mm512_add_epi32(idx, step)) {
    const __m512 v = Ld16(hh + j);
    const __mmask16 m =
        _mm512_cmp_ps_mask(v, Ld16(lo + j), _CMP_LT_OQ) | _mm512_cmp_ps_mask(v, Ld16(hi + j), _CMP_GT_OQ);
    _mm512_storeu_si512(out + n, _mm512_maskz_compress_epi32(m, idx));
    n += __builtin_popcount(static_cast<unsigned>(m));
  }
  for (; j < D; ++j) {
    const float v = Ld(hh, j);
    out[n] = static_cast<int32_t>(j);
    n += static_cast<int64_t>((v < Ld(lo, j)) | (v > Ld(hi, j)));
  }
  return n;
}

template <class W>
Kernels<W> Get() {
  Kernels<W> k = avx2::Get<W>();
  k.dotblk = &DotBlk<W>;
  k.axpyblk = &AxpyBlk<W>;
  k.cols = 16 * kTileVecs;
  k.corr = &CorrN;
  return k;
}

}  // namespace avx512
#endif  // TARDIS_X86

template <class W>
Kernels<W> GetKernels(Isa isa) {
#if TARDIS_X86
  if (isa == Isa::kAvx512 && CpuHasAvx512()) return avx512::Get<W>();
  if ((isa == Isa::kAvx2 || isa == Isa::kAvx512) && CpuHasAvx2()) return avx2::Get<W>();
#endif
  (void)isa;
  return portable::Get<W>();
}

// The tile kernels when the tile path can run: AVX-512F allowed and present with d a multiple of 16, else
// AVX2 allowed and present with d a multiple of 8.
template <class W>
bool GetTileKernels(Isa isa, int64_t d, TileKernels<W>* out) {
#if TARDIS_X86
  if (isa == Isa::kAvx512 && CpuHasAvx512() && d % 16 == 0) {
    *out = avx512::GetTile<W>();
    return true;
  }
  if (isa != Isa::kPortable && CpuHasAvx2() && d % 8 == 0) {
    *out = avx2::GetTile<W>();
    return true;
  }
#endif
  (void)isa;
  (void)d;
  (void)out;
  return false;
}

// ------------------------------------------------------------------------------------------------
// Parallel helpers

template <class F>
void ParallelFor(const Parallel& par, size_t n, F& f) {
  if (n == 0) return;
  if (n == 1) {
    f(size_t{0});
    return;
  }
  par.For(n, [](void* p, size_t i) { (*static_cast<F*>(p))(i); }, &f);
}

inline int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Neurons per block of the tile and neuron paths: their W1t and W2 rows fill about 1 MB, half of a
// typical L2, so a block stays cached while the tokens of a work item pass over it.
template <class T>
int64_t NeuronBlock(int64_t d, int64_t D) {
  return std::max<int64_t>(16, std::min<int64_t>(D, (int64_t{1} << 20) / (2 * d * static_cast<int64_t>(sizeof(T)))));
}

// Flagged indices of one token: j with h_hat[j] < lo[j] or h_hat[j] > hi[j] (NaN: not flagged).
template <class T>
int64_t FlagRow(const T* hh, const T* lo, const T* hi, int64_t D, int32_t* out, Isa isa) {
#if TARDIS_X86
  if (isa == Isa::kAvx512 && CpuHasAvx512()) return avx512::FlagRowVec(hh, lo, hi, D, out);
  if (isa != Isa::kPortable && CpuHasAvx2()) return avx2::FlagRowVec(hh, lo, hi, D, out);
#endif
  (void)isa;
  int64_t n = 0;
  for (int64_t j = 0; j < D; ++j) {
    const float v = Ld(hh, j);
    out[n] = static_cast<int32_t>(j);
    n += static_cast<int64_t>((v < Ld(lo, j)) | (v > Ld(hi, j)));
  }
  return n;
}

// ------------------------------------------------------------------------------------------------
// The two strategies. x: tokens x d float32 rows; y: tokens x d float32 accumulator holding y_lin.

template <class T>
struct Problem {
  int64_t tokens, d, D;
  const float* x;
  float* y;
  const T *w1t, *b1, *w2, *alpha, *beta;
  GeluKind gelu;
  const Kernels<T>* k;
  const int32_t* flags;   // one row of fld per token (neuron indices), first counts[t] entries used
  const int64_t* counts;
  int64_t fld;            // flags' row stride: D, or a fused work item's neuron range
};

template <class T>
void RunToken(const Problem<T>& p, const Parallel& par) {
  const int64_t d = p.d, D = p.D, tokens = p.tokens;
  const Kernels<T>& k = *p.k;
  const int32_t* flags = p.flags;
  const int64_t* counts = p.counts;
  int64_t max_count = 0;
  for (int64_t t = 0; t < tokens; ++t) max_count = std::max(max_count, counts[t]);
  // Few tokens (decode): split each token's flagged set into chunks with private partial sums.
  int64_t chunks = 1;
  if (tokens < 8) chunks = std::max<int64_t>(1, std::min<int64_t>(CeilDiv(16, tokens), max_count / 64));
  std::vector<float> partial(chunks > 1 ? static_cast<size_t>(tokens * chunks * d) : 0, 0.0f);

  auto work = [&](size_t item) {
    const int64_t t = static_cast<int64_t>(item) / chunks, c = static_cast<int64_t>(item) % chunks;
    const int64_t n = counts[t];
    const int64_t q0 = n * c / chunks, q1 = n * (c + 1) / chunks;
    const int32_t* list = flags + t * D;
    const float* xt = p.x + t * d;
    float* acc = chunks > 1 ? partial.data() + (t * chunks + c) * d : p.y + t * d;
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t j = list[q];
      if (q + 1 < q1) {
        const int64_t jn = list[q + 1];
        __builtin_prefetch(p.w1t + jn * d);
        __builtin_prefetch(p.w2 + jn * d);
      }
      const float h = k.dot(xt, p.w1t + j * d, d) + Ld(p.b1, j);
      const float corr = Corr(h, Ld(p.alpha, j), Ld(p.beta, j), p.gelu);
      if (corr != 0.0f) k.axpy(acc, corr, p.w2 + j * d, d);
    }
  };
  ParallelFor(par, static_cast<size_t>(tokens * chunks), work);
  if (chunks > 1) {
    for (int64_t t = 0; t < tokens; ++t) {
      float* yt = p.y + t * d;
      for (int64_t c = 0; c < chunks; ++c) {
        const float* src = partial.data() + (t * chunks + c) * d;
        for (int64_t i = 0; i < d; ++i) yt[i] += src[i];
      }
    }
  }
}

template <class T>
void RunUnion(const Problem<T>& p, const std::vector<int32_t>& uni, const std::vector<int32_t>& pos,
              const Parallel& par) {
  const int64_t d = p.d, D = p.D, tokens = p.tokens, nu = static_cast<int64_t>(uni.size());
  const Kernels<T>& k = *p.k;
  const int32_t* flags = p.flags;
  const int64_t* counts = p.counts;
  const int64_t groups = CeilDiv(tokens, 4);

  // 1. Which union neurons each group of 4 tokens needs (flagged for at least one of its tokens).
  std::unique_ptr<uint8_t[]> need(new uint8_t[static_cast<size_t>(groups * nu)]);
  auto mark = [&](size_t g) {
    uint8_t* row = need.get() + g * nu;
    std::memset(row, 0, static_cast<size_t>(nu));
    for (int64_t t = static_cast<int64_t>(g) * 4; t < std::min(tokens, static_cast<int64_t>(g) * 4 + 4); ++t) {
      const int32_t* list = flags + t * D;
      for (int64_t i = 0; i < counts[t]; ++i) row[pos[list[i]]] = 1;
    }
  };
  ParallelFor(par, static_cast<size_t>(groups), mark);

  // 2. H[t, u] = x_t . w1t[U[u]] for the needed (group, neuron) pairs, four tokens per row load, blocked
  //    over (neuron block, token block) so each W1 row is reused by the groups of a token block.
  std::unique_ptr<float[]> H(new float[static_cast<size_t>(tokens * nu)]);
  constexpr int64_t kNB = 16, kTB = 32;
  const int64_t nblocks = CeilDiv(nu, kNB), tblocks = CeilDiv(tokens, kTB);
  auto gemm1 = [&](size_t item) {
    const int64_t nb = static_cast<int64_t>(item) % nblocks, tb = static_cast<int64_t>(item) / nblocks;
    const int64_t u0 = nb * kNB, u1 = std::min(nu, u0 + kNB);
    const int64_t t0 = tb * kTB, t1 = std::min(tokens, t0 + kTB);
    for (int64_t u = u0; u < u1; ++u) {
      const T* w = p.w1t + static_cast<int64_t>(uni[u]) * d;
      for (int64_t t = t0; t < t1; t += 4) {
        if (!need[(t / 4) * nu + u]) continue;
        const float* xs[4];
        for (int q = 0; q < 4; ++q) xs[q] = p.x + std::min(t + q, t1 - 1) * d;
        float out[4];
        k.dot4(xs, w, d, out);
        for (int q = 0; q < 4 && t + q < t1; ++q) H[(t + q) * nu + u] = out[q];
      }
    }
  };
  ParallelFor(par, static_cast<size_t>(nblocks * tblocks), gemm1);

  // 3. Per group: packed entries (W2 row, 4 corrections; zero for tokens where the neuron is not flagged).
  std::vector<std::vector<Entry>> packed(static_cast<size_t>(groups));
  auto pack = [&](size_t g) {
    const int64_t t0 = static_cast<int64_t>(g) * 4;
    const uint8_t* row = need.get() + g * nu;
    std::vector<int32_t> slot(static_cast<size_t>(nu), -1);
    auto& out = packed[g];
    for (int64_t u = 0; u < nu; ++u) {
      if (!row[u]) continue;
      slot[u] = static_cast<int32_t>(out.size());
      Entry e;
      e.u = u;
      e.c[0] = e.c[1] = e.c[2] = e.c[3] = 0.0f;
      out.push_back(e);
    }
    for (int64_t q = 0; q < 4 && t0 + q < tokens; ++q) {
      const int64_t t = t0 + q;
      const int32_t* list = flags + t * D;
      for (int64_t i = 0; i < counts[t]; ++i) {
        const int32_t j = list[i];
        const int32_t u = pos[j];
        const float h = H[t * nu + u] + Ld(p.b1, j);
        out[slot[u]].c[q] = Corr(h, Ld(p.alpha, j), Ld(p.beta, j), p.gelu);
      }
    }
  };
  ParallelFor(par, static_cast<size_t>(groups), pack);

  // 4. Y += C . W2_U, parallel over column blocks (threads own columns: no reduction). Per block of kUB
  //    union neurons, the W2 rows' column slice is packed (as float) into a contiguous panel that stays in
  //    cache while every group of tokens runs its 4-token x 16-column register tiles over it.
  const int64_t cb = std::max<int64_t>(64, std::min<int64_t>(512, CeilDiv(CeilDiv(d, 8), 16) * 16));
  const int64_t cblocks = CeilDiv(d, cb);
  constexpr int64_t kUB = 128;
  auto gemm2 = [&](size_t item) {
    const int64_t c0 = static_cast<int64_t>(item) * cb, c1 = std::min(d, c0 + cb), ld = c1 - c0;
    std::vector<size_t> cursor(static_cast<size_t>(groups), 0);
    std::vector<float> panel(static_cast<size_t>(kUB * ld));
    // Rows of padding tokens (last group): private per item, their corrections are zero.
    std::vector<float> pad(tokens % 4 ? static_cast<size_t>(3 * d) : 0, 0.0f);
    for (int64_t ub = 0; ub < nu; ub += kUB) {
      const int64_t ue = std::min(nu, ub + kUB);
      for (int64_t u = ub; u < ue; ++u) {
        const T* src = p.w2 + static_cast<int64_t>(uni[u]) * d + c0;
        float* dst = panel.data() + (u - ub) * ld;
        for (int64_t i = 0; i < ld; ++i) dst[i] = Ld(src, i);
      }
      for (int64_t g = 0; g < groups; ++g) {
        const auto& ent = packed[g];
        const size_t b = cursor[g];
        size_t e = b;
        while (e < ent.size() && ent[e].u < ue) ++e;  // entries are sorted by union index
        cursor[g] = e;
        if (e == b) continue;
        float* ys[4];
        for (int q = 0; q < 4; ++q) {
          const int64_t t = g * 4 + q;
          ys[q] = t < tokens ? p.y + t * d : pad.data() + (q - 1) * d;
        }
        k.update4(ys, ent.data() + b, static_cast<int64_t>(e - b), panel.data(), ld, ub, c0, c1);
      }
    }
  };
  ParallelFor(par, static_cast<size_t>(cblocks), gemm2);
}

// Neuron-major path (prefill with flags that differ per token). Tokens in groups of G, so that one column
// block of the group's x (or y) rows fills about 32 KB: an L1-resident panel. Neurons in blocks whose W1t and
// W2 rows fill about 1 MB: L2-resident while the groups of a work item pass over them. Per (block, group),
// the group's flagged pairs in neuron-major order (a CSC per group, so they are contiguous):
//   1. per column block, per neuron: the W1t row slice in registers, the x slices of its tokens streamed
//      from the panel -> h;
//   2. C = GELU(h + b1) - a (h + b1) - b over all the pairs at once (vector erf / tanh where available);
//   3. per column block, per neuron: the W2 row slice in registers, the y slices of its tokens updated in
//      the panel.
// Every pair costs 2d FMAs with L1 operands; a weight row slice is loaded once per (group, neuron). Work
// items own whole groups (their y rows: no reduction) and read every weight block once.
template <class T>
void RunNeuron(const Problem<T>& p, const Parallel& par) {
  const int64_t d = p.d, D = p.D, tokens = p.tokens;
  const Kernels<T>& k = *p.k;
  const int64_t cols = k.cols, cblocks = CeilDiv(d, cols);
  const int64_t G = std::max<int64_t>(4, std::min<int64_t>(tokens, (int64_t{32} << 10) / (cols * 4)));
  const int64_t groups = CeilDiv(tokens, G);
  const int64_t block = NeuronBlock<T>(d, D);
  const int64_t panel = G * cols;  // floats per (group, column block) panel

  // Per-group CSC: off[g (D + 1) + j] .. off[g (D + 1) + j + 1] are the pairs of neuron j in group g (pairs
  // ordered by group, neuron, token); tok = the token's index within its group.
  std::vector<int64_t> base(static_cast<size_t>(groups + 1), 0);
  for (int64_t g = 0; g < groups; ++g) {
    base[g + 1] = base[g];
    for (int64_t t = g * G; t < std::min(tokens, (g + 1) * G); ++t) base[g + 1] += p.counts[t];
  }
  const int64_t total = base[groups];
  std::vector<int64_t> off(static_cast<size_t>(groups * (D + 1)));
  std::vector<int32_t> tok(static_cast<size_t>(total));
  std::vector<float> hc(static_cast<size_t>(total), 0.0f);
  std::unique_ptr<float[]> xp(new float[static_cast<size_t>(groups * cblocks * panel)]);
  std::unique_ptr<float[]> yp(new float[static_cast<size_t>(groups * cblocks * panel)]);
  auto pack = [&](size_t gi) {
    const int64_t g = static_cast<int64_t>(gi), t0 = g * G, t1 = std::min(tokens, t0 + G);
    int64_t* o = off.data() + g * (D + 1);
    std::fill(o, o + D + 1, 0);
    for (int64_t t = t0; t < t1; ++t) {
      const int32_t* list = p.flags + t * D;
      for (int64_t i = 0; i < p.counts[t]; ++i) ++o[list[i] + 1];
    }
    o[0] = base[g];
    for (int64_t j = 0; j < D; ++j) o[j + 1] += o[j];
    std::vector<int64_t> fill(o, o + D);
    for (int64_t t = t0; t < t1; ++t) {
      const int32_t* list = p.flags + t * D;
      for (int64_t i = 0; i < p.counts[t]; ++i) tok[fill[list[i]]++] = static_cast<int32_t>(t - t0);
    }
    for (int64_t c = 0; c < cblocks; ++c) {
      const int64_t c0 = c * cols, n = std::min(cols, d - c0);
      float* xd = xp.get() + (g * cblocks + c) * panel;
      float* yd = yp.get() + (g * cblocks + c) * panel;
      for (int64_t t = t0; t < t1; ++t) {
        std::memcpy(xd + (t - t0) * cols, p.x + t * d + c0, static_cast<size_t>(n) * sizeof(float));
        std::memcpy(yd + (t - t0) * cols, p.y + t * d + c0, static_cast<size_t>(n) * sizeof(float));
      }
    }
  };
  ParallelFor(par, static_cast<size_t>(groups), pack);

  const int64_t items = std::min<int64_t>(groups, kNeuronItems);
  auto work = [&](size_t item) {
    const int64_t g0 = groups * static_cast<int64_t>(item) / items, g1 = groups * (static_cast<int64_t>(item) + 1) / items;
    int64_t most = 0;
    for (int64_t g = g0; g < g1; ++g) most = std::max(most, base[g + 1] - base[g]);
    std::vector<float> tmp(static_cast<size_t>(3 * most));
    for (int64_t j0 = 0; j0 < D; j0 += block) {
      const int64_t j1 = std::min(D, j0 + block);
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t* o = off.data() + g * (D + 1);
        const int64_t k0 = o[j0], k1 = o[j1];
        if (k0 == k1) continue;
        for (int64_t c = 0; c < cblocks; ++c) {
          const int64_t c0 = c * cols, n = std::min(cols, d - c0);
          const float* xs = xp.get() + (g * cblocks + c) * panel;
          for (int64_t j = j0; j < j1; ++j)
            if (o[j + 1] > o[j]) k.dotblk(xs, cols, tok.data() + o[j], o[j + 1] - o[j], p.w1t + j * d + c0, n, hc.data() + o[j]);
        }
        float *hb = tmp.data(), *ab = hb + (k1 - k0), *bb = ab + (k1 - k0);
        for (int64_t j = j0; j < j1; ++j) {
          const float bj = Ld(p.b1, j), aj = Ld(p.alpha, j), betaj = Ld(p.beta, j);
          for (int64_t q = o[j]; q < o[j + 1]; ++q) {
            hb[q - k0] = hc[q] + bj;
            ab[q - k0] = aj;
            bb[q - k0] = betaj;
          }
        }
        k.corr(hc.data() + k0, hb, ab, bb, k1 - k0, p.gelu);
        for (int64_t c = 0; c < cblocks; ++c) {
          const int64_t c0 = c * cols, n = std::min(cols, d - c0);
          float* ys = yp.get() + (g * cblocks + c) * panel;
          for (int64_t j = j0; j < j1; ++j)
            if (o[j + 1] > o[j]) k.axpyblk(ys, cols, tok.data() + o[j], hc.data() + o[j], o[j + 1] - o[j], p.w2 + j * d + c0, n);
        }
      }
    }
    for (int64_t g = g0; g < g1; ++g)
      for (int64_t c = 0; c < cblocks; ++c) {
        const int64_t c0 = c * cols, n = std::min(cols, d - c0);
        const float* ys = yp.get() + (g * cblocks + c) * panel;
        for (int64_t t = g * G; t < std::min(tokens, (g + 1) * G); ++t)
          std::memcpy(p.y + t * d + c0, ys + (t - g * G) * cols, static_cast<size_t>(n) * sizeof(float));
      }
  };
  ParallelFor(par, static_cast<size_t>(items), work);
}

// Tokens per group of the tile path (groups of at most kTileGroup, as equal as possible).
inline int64_t TileGroupRows(int64_t tokens) { return CeilDiv(tokens, CeilDiv(tokens, kTileGroup)); }

// Neurons per block of the tile path in column-panel order: kTilePanelBytes of one panel's row slices
// (a panel: one chunk of `cols` columns).
template <class T>
int64_t PanelBlock(int64_t D, int64_t cols) {
  const int64_t slice = cols * static_cast<int64_t>(sizeof(T));
  return std::max<int64_t>(16, std::min<int64_t>(D, kTilePanelBytes / slice));
}

// Whether the tile path walks its neuron blocks in column panels: when a token group's x and y rows would
// not fit in L2 beside a block, and panel blocks hold more neurons than row-order ones (d > 1024 for
// float32 weights), so x and y are passed over fewer times. Whole block vs dense, int8 predictor, 10%
// flagged, 1 thread, panels vs rows: 4544 x 18176 at 128 / 64 / 32 tokens 1.40 / 1.20 / 1.09x against
// 1.05 / 1.10 / 1.07x; 3072 x 12288 at 128 tokens 1.30 vs 1.27x; 2048 x 8192 at 256 / 128 / 32 tokens
// 1.51 vs 1.44x, a tie, 1.01 vs 1.15x; 1024 x 4096 at 128 and 256 tokens (same blocks, rows in L2 or
// nearly) 4-8% slower in panels. AVX-512 kernels only: with AVX2's 64-column chunks, panels tied at
// 4544 x 18176 and lost at 2048 x 8192 (0.80 vs 1.23x).
template <class T>
bool TilePanels(int64_t tokens, int64_t d, int64_t D, const TileKernels<T>& tk) {
  return tk.lanes == 16 && TileGroupRows(tokens) * d * 2 * static_cast<int64_t>(sizeof(float)) > kTileRowBytes &&
         NeuronBlock<T>(d, D) < PanelBlock<T>(D, tk.lanes * tk.vecs);
}

// One work item of the tile path: tokens [t0, t1) against neurons [js0, js1) in equal blocks of 2/3 to 4/3 of
// `target` neurons, adding into ybase's rows (token t at ybase + t d); fresh(t) runs before the first add to
// token t's row.
template <class T, class Fresh>
void TileItem(const Problem<T>& p, const TileKernels<T>& tk, bool panels, int64_t t0, int64_t t1, int64_t js0,
              int64_t js1, int64_t target, float* ybase, Fresh&& fresh) {
  const int64_t d = p.d, lanes = tk.lanes, nvec = d / lanes, chunks = CeilDiv(nvec, tk.vecs), nt = t1 - t0;
  const int64_t block = CeilDiv(js1 - js0, std::max<int64_t>(1, CeilDiv(3 * (js1 - js0), 4 * target)));
  // Per token of the group: its cursor into its flag list, and for the current block its first flagged
  // entry and (column panels) the offset of its pairs in the block's pair buffers.
  const size_t n_tok = static_cast<size_t>(nt);
  std::vector<int64_t> cur(n_tok), first(n_tok), off(n_tok + 1);
  for (int64_t t = t0; t < t1; ++t) {
    const int32_t* list = p.flags + t * p.fld;
    cur[t - t0] = std::lower_bound(list, list + p.counts[t], static_cast<int32_t>(js0)) - list;
  }
  // h, c, alpha, beta of the pairs: one token's (rows) or the whole group's (panels: blocks of at most
  // 4/3 PanelBlock neurons, so at most ~1.4 MB).
  std::vector<float> buf(static_cast<size_t>(4 * block));
  auto gather = [&](const int32_t* js, int64_t n, float* h, float* a, float* b) {
    for (int64_t q = 0; q < n; ++q) {
      h[q] = Ld(p.b1, js[q]);
      a[q] = Ld(p.alpha, js[q]);
      b[q] = Ld(p.beta, js[q]);
    }
  };
  auto dots = [&](int64_t t, int64_t c, const int32_t* js, int64_t n, float* h) {
    const int64_t v0 = c * tk.vecs, nv = std::min<int64_t>(tk.vecs, nvec - v0);
    tk.dots[nv - 1](p.x + t * d + lanes * v0, p.w1t + lanes * v0, d, js, n, h);
  };
  auto axpy = [&](int64_t t, int64_t c, const int32_t* js, int64_t n, const float* corr) {
    const int64_t v0 = c * tk.vecs, nv = std::min<int64_t>(tk.vecs, nvec - v0);
    tk.axpy[nv - 1](ybase + t * d + lanes * v0, p.w2 + lanes * v0, d, js, corr, n);
  };
  for (int64_t j0 = js0; j0 < js1; j0 += block) {
    const int32_t j1 = static_cast<int32_t>(std::min(js1, j0 + block));
    off[0] = 0;
    for (int64_t i = 0; i < nt; ++i) {
      const int32_t* list = p.flags + (t0 + i) * p.fld;
      const int64_t q0 = cur[i], cnt = p.counts[t0 + i];
      int64_t q1 = q0;
      while (q1 < cnt && list[q1] < j1) ++q1;
      first[i] = q0;
      cur[i] = q1;
      off[i + 1] = off[i] + (q1 - q0);
    }
    auto js_of = [&](int64_t i) { return p.flags + (t0 + i) * p.fld + first[i]; };
    if (!panels) {
      float *hb = buf.data(), *cb = hb + block, *ab = cb + block, *bb = ab + block;
      for (int64_t i = 0; i < nt; ++i) {
        const int64_t n = off[i + 1] - off[i];
        if (n == 0) continue;
        gather(js_of(i), n, hb, ab, bb);
        for (int64_t c = 0; c < chunks; ++c) dots(t0 + i, c, js_of(i), n, hb);
        p.k->corr(cb, hb, ab, bb, n, p.gelu);
        fresh(t0 + i);
        for (int64_t c = 0; c < chunks; ++c) axpy(t0 + i, c, js_of(i), n, cb);
      }
      continue;
    }
    const int64_t np = off[nt];
    if (np == 0) continue;
    if (buf.size() < static_cast<size_t>(4 * np)) buf.resize(static_cast<size_t>(4 * np));
    float *hb = buf.data(), *cb = hb + np, *ab = cb + np, *bb = ab + np;
    for (int64_t i = 0; i < nt; ++i)
      gather(js_of(i), off[i + 1] - off[i], hb + off[i], ab + off[i], bb + off[i]);
    for (int64_t c = 0; c < chunks; ++c)
      for (int64_t i = 0; i < nt; ++i)
        if (off[i + 1] > off[i]) dots(t0 + i, c, js_of(i), off[i + 1] - off[i], hb + off[i]);
    p.k->corr(cb, hb, ab, bb, np, p.gelu);
    for (int64_t i = 0; i < nt; ++i)
      if (off[i + 1] > off[i]) fresh(t0 + i);
    for (int64_t c = 0; c < chunks; ++c)
      for (int64_t i = 0; i < nt; ++i)
        if (off[i + 1] > off[i]) axpy(t0 + i, c, js_of(i), off[i + 1] - off[i], cb + off[i]);
  }
}

// Tile path (AVX-512F with d a multiple of 16, or AVX2 with d a multiple of 8; tk.lanes floats per vector,
// chunks of up to tk.vecs vectors): tokens in groups, neurons in blocks whose W1t and W2 rows fill
// about 1 MB, so a block stays in L2 while the group's tokens pass over it. Per (token, block): the token's
// flagged neurons in the block (a slice of its sorted flag list); h by TileDots over 256-column chunks with
// the token's x chunk in registers; the corrections 16 lanes at a time (vector erf / tanh); then
// y += C . W2 by TileAxpy with the token's y chunk in registers, stored once per chunk. Every pair costs 2d
// FMAs with one weight load each and no store. Work items are (token group, neuron range) pairs.
// Column-panel order (`panels`), for token groups whose x and y rows do not fit in L2 beside the block:
// blocks of kTilePanelBytes of one panel's row slices, and per block first every token's dots panel by
// panel (h summed over the panels in the pair buffer), then the corrections, then y += C . W2 panel by
// panel. L2 then holds one panel of the block's rows and of the group's x (or y) rows, and each block
// passes over x and y once instead of once per L2-sized block of whole rows.
template <class T>
void RunTile(const Problem<T>& p, const TileKernels<T>& tk, bool panels, const Parallel& par) {
  const int64_t d = p.d, D = p.D, tokens = p.tokens, lanes = tk.lanes;
  int64_t total = 0;
  for (int64_t t = 0; t < tokens; ++t) total += p.counts[t];
  // A weight row is fetched from memory once per token group that needs it, so groups are only as many
  // as L2 requires; parallel work comes from splitting the neuron range instead (each split adds into its
  // own copy of y), as long as a split keeps kTileMinPairs pairs per token group. A split is cut into
  // equal blocks of 2/3 to 4/3 of the target block (fewer blocks, less per-(token, block) overhead).
  const int64_t groups = CeilDiv(tokens, kTileGroup);
  const int64_t splits = groups >= kTileItems ? 1 : std::max<int64_t>(1, std::min(kTileItems / groups,
                                                                                 total / (groups * kTileMinPairs)));
  const int64_t target = panels ? PanelBlock<T>(D, lanes * tk.vecs) : NeuronBlock<T>(d, D);
  // The copies of y of splits 1.. (split 0 adds into y): a token's row is zeroed by its split's work item
  // when the split first adds to it, in cache just before use, and marked in `touched`, so the sum at the
  // end reads only rows that were added to. Zeroing all copies up front on the calling thread (a fresh
  // buffer per call) cost 1-3.5% of the whole rewritten block at 128 tokens, 10% flagged, int8 predictor
  // (384x1536 x1.41 -> x1.45 with 1 thread, x1.31 -> x1.35 with 2; 1024x4096 x1.33 -> x1.36 / x1.48 ->
  // x1.49; alternating processes, 2026-11-30).
  thread_local std::vector<float> partial_keep;
  std::unique_ptr<float[]> partial_big;
  float* partial = Scratch(partial_keep, static_cast<size_t>((splits - 1) * tokens * d), &partial_big);
  std::vector<uint8_t> touched(static_cast<size_t>((splits - 1) * tokens), 0);
  auto work = [&](size_t item) {
    const int64_t g = static_cast<int64_t>(item) / splits, s = static_cast<int64_t>(item) % splits;
    float* ybase = s == 0 ? p.y : partial + (s - 1) * tokens * d;
    auto fresh = [&](int64_t t) {  // token t's row of this split's copy of y, before the first add
      if (s == 0) return;
      uint8_t& mark = touched[static_cast<size_t>((s - 1) * tokens + t)];
      if (mark) return;
      std::fill(ybase + t * d, ybase + (t + 1) * d, 0.0f);
      mark = 1;
    };
    TileItem(p, tk, panels, tokens * g / groups, tokens * (g + 1) / groups, D * s / splits, D * (s + 1) / splits,
             target, ybase, fresh);
  };
  ParallelFor(par, static_cast<size_t>(groups * splits), work);
  if (splits == 1) return;
  auto reduce = [&](size_t t) {
    float* yt = p.y + static_cast<int64_t>(t) * d;
    for (int64_t s = 1; s < splits; ++s) {
      if (!touched[static_cast<size_t>((s - 1) * tokens) + t]) continue;
      const float* src = partial + ((s - 1) * tokens + static_cast<int64_t>(t)) * d;
      for (int64_t i = 0; i < d; ++i) yt[i] += src[i];
    }
  };
  ParallelFor(par, static_cast<size_t>(tokens), reduce);
}

// Fused prediction (RunFloatFused): at most this many tokens, and neurons per work item at least. (Two items
// of 768 neurons instead of four at 384x1536 measured the same; csrc/README.md has the fused path's numbers.)
constexpr int64_t kFusedTokens = 8;
constexpr int64_t kFusedNeurons = 384;

// x, y: float32 activations (y holds y_lin on entry); the other operands are read from op as T.
template <class T>
void RunImpl(const Operands& op, const float* x, float* y, GeluKind gelu, Strategy strategy, Isa isa,
             const Parallel& par, RunInfo* info) {
  const int64_t tokens = op.tokens, d = op.d, D = op.D;
  const T* h_hat = static_cast<const T*>(op.h_hat);
  const T* lo = static_cast<const T*>(op.lo);
  const T* hi = static_cast<const T*>(op.hi);

  // Flag sets, one row of D int32 per token (first counts[t] entries valid).
  thread_local std::vector<int32_t> flag_keep;
  std::unique_ptr<int32_t[]> flag_big;
  int32_t* flags = Scratch(flag_keep, static_cast<size_t>(tokens * D), &flag_big);
  std::vector<int64_t> counts(static_cast<size_t>(tokens), 0);
  const int64_t fblocks = std::min<int64_t>(tokens, 64);
  auto flag_work = [&](size_t b) {
    const int64_t t0 = tokens * static_cast<int64_t>(b) / fblocks, t1 = tokens * (static_cast<int64_t>(b) + 1) / fblocks;
    for (int64_t t = t0; t < t1; ++t) counts[t] = FlagRow(h_hat + t * D, lo, hi, D, flags + t * D, isa);
  };
  ParallelFor(par, static_cast<size_t>(fblocks), flag_work);

  int64_t total = 0;
  for (int64_t t = 0; t < tokens; ++t) total += counts[t];
  RunInfo local;
  local.flagged_pairs = total;
  if (total == 0) {
    if (info) *info = local;
    return;
  }

  const Kernels<T> kernels = GetKernels<T>(isa);
  Problem<T> p{tokens, d, D, x, y,
               static_cast<const T*>(op.w1t), static_cast<const T*>(op.b1), static_cast<const T*>(op.w2),
               static_cast<const T*>(op.alpha), static_cast<const T*>(op.beta), gelu, &kernels, flags,
               counts.data(), D};

  TileKernels<T> tile;
  const bool tile_ok = GetTileKernels<T>(isa, d, &tile);
  if ((strategy == Strategy::kTile || strategy == Strategy::kPanel) && !tile_ok) strategy = Strategy::kAuto;
  bool use_union = false, use_neuron = strategy == Strategy::kNeuron;
  bool use_tile = strategy == Strategy::kTile || strategy == Strategy::kPanel;
  bool use_panels = strategy == Strategy::kPanel;
  std::vector<int32_t> uni, pos;
  // Where the tile path runs it is the automatic choice for every call. AVX-512F (d % 16 == 0): measured at
  // 1 to 1024 tokens, 5-10% flagged, independent and correlated (rho 0.9) flags, it beat the token, union
  // and neuron paths (e.g. 384x1536, 10%, rho 0.9: 8 tokens 0.07 vs 0.21 / 0.23 ms for union / neuron;
  // 1024 tokens 6.1 vs 18.3 / 13.6 ms). AVX2 (d % 8 == 0; column panels not used, they were tuned for
  // AVX-512): the whole rewritten block at 10% flagged against the cost model's choice, 768x3072: 1 token
  // 0.32-0.33 vs 0.33-0.34 ms, 8 tokens 0.94-0.96 vs 1.59-1.72 ms, 128 tokens 7.1 vs 12.3 ms.
  if (strategy == Strategy::kAuto && tile_ok) {
    use_tile = true;
    use_panels = TilePanels<T>(tokens, d, D, tile);
  }
  if (strategy == Strategy::kUnion || (strategy == Strategy::kAuto && !use_tile && tokens >= 2)) {
    // Union and per-group union sizes (groups of 4 tokens) for the cost model.
    std::vector<int32_t> stamp(static_cast<size_t>(D), -1);
    std::vector<uint8_t> in_union(static_cast<size_t>(D), 0);
    int64_t group_sum = 0;
    for (int64_t t = 0; t < tokens; ++t) {
      const int32_t g = static_cast<int32_t>(t / 4);
      const int32_t* list = flags + t * D;
      for (int64_t i = 0; i < counts[t]; ++i) {
        const int32_t j = list[i];
        in_union[j] = 1;
        if (stamp[j] != g) {
          stamp[j] = g;
          ++group_sum;
        }
      }
    }
    for (int64_t j = 0; j < D; ++j)
      if (in_union[j]) uni.push_back(static_cast<int32_t>(j));
    const int64_t nu = static_cast<int64_t>(uni.size());
    local.union_size = nu;
    // Cost model. token path: one W1 and one W2 row per flagged (token, neuron) pair, used once each
    // (sum_t |F(t)| = total row pairs, vector-at-a-time, bound by cache/memory traffic). union path: per
    // group of 4 tokens one row pair per neuron needed by the group (group_sum row pairs), each used by 4
    // tokens in register-blocked tiles: 4x the flops of a row pair, at kBlockedGain x the speed.
    constexpr double kBlockedGain = 2.5;
    const double cost_token = static_cast<double>(total);
    const double cost_union = 4.0 * static_cast<double>(group_sum) / kBlockedGain;
    // neuron path: each union row pair read once, then every pair at L1-panel speed. (Measured: the neuron
    // path beats the token path from ~8 tokens at >= 5% flagged, and the union path unless nearly every
    // token of a group shares the group's flagged set, where the two tie; the union path lost at 8 tokens
    // with a real int4 predictor's partly shared flags, hence its modest gain.)
    constexpr double kNeuronPair = 0.25;
    const double cost_neuron = static_cast<double>(nu) + kNeuronPair * static_cast<double>(total);
    if (strategy == Strategy::kAuto) {
      use_neuron = cost_neuron < cost_token && cost_neuron < cost_union;
      use_union = !use_neuron && cost_union < cost_token;
    } else {
      use_union = true;
    }
    if (use_union) {
      pos.assign(static_cast<size_t>(D), -1);
      for (int64_t u = 0; u < nu; ++u) pos[uni[u]] = static_cast<int32_t>(u);
    }
  }
  local.used_union = use_union;
  local.path = use_union    ? Strategy::kUnion
               : use_neuron ? Strategy::kNeuron
               : use_tile   ? (use_panels ? Strategy::kPanel : Strategy::kTile)
                            : Strategy::kToken;
  if (use_union)
    RunUnion(p, uni, pos, par);
  else if (use_tile)
    RunTile(p, tile, local.path == Strategy::kPanel, par);
  else if (use_neuron)
    RunNeuron(p, par);
  else
    RunToken(p, par);
  if (info) *info = local;
}

}  // namespace

bool CpuHasAvx2() {
#if TARDIS_X86
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }();
  return has;
#else
  return false;
#endif
}

bool CpuHasAvx512() {
#if TARDIS_X86
  static const bool has = [] {
    __builtin_cpu_init();
    return CpuHasAvx2() && __builtin_cpu_supports("avx512f");
  }();
  return has;
#else
  return false;
#endif
}

void RunFloat(const Operands& op, GeluKind gelu, Strategy strategy, Isa isa, const Parallel& par, RunInfo* info) {
  const int64_t n = op.tokens * op.d;
  float* y = static_cast<float*>(op.y);
  const float* y_lin = static_cast<const float*>(op.y_lin);
  if (n > 0 && y != y_lin) std::memcpy(y, y_lin, static_cast<size_t>(n) * sizeof(float));
  RunImpl<float>(op, static_cast<const float*>(op.x), y, gelu, strategy, isa, par, info);
}

bool FusedPathApplies(int64_t tokens, int64_t d, int64_t D, Isa isa) {
  TileKernels<float> tk;
  return tokens >= 1 && tokens <= kFusedTokens && D >= 1 && GetTileKernels<float>(isa, d, &tk);
}

bool RunFloatFused(const Operands& op, const RangePredictor& pred, GeluKind gelu, Isa isa, const Parallel& par,
                   RunInfo* info) {
  const int64_t tokens = op.tokens, d = op.d, D = op.D;
  TileKernels<float> tk;
  if (!FusedPathApplies(tokens, d, D, isa)) return false;
  GetTileKernels<float>(isa, d, &tk);
  float* y = static_cast<float*>(op.y);
  const float* y_lin = static_cast<const float*>(op.y_lin);
  if (y != y_lin) std::memcpy(y, y_lin, static_cast<size_t>(tokens * d) * sizeof(float));
  // Work items own neuron ranges (multiples of the predictor's alignment): each predicts its range for every
  // token, flags it and adds its corrections into its own copy of y (item 0 into y), all in one parallel
  // section: no h_hat tensor, and the predictor's and the kernel's reads of one item overlap the other's.
  const int64_t align = std::max<int64_t>(1, pred.Align()), units = CeilDiv(D, align);
  const int64_t items = std::max<int64_t>(1, std::min({kTileItems, units, D / kFusedNeurons}));
  const int64_t range = align * CeilDiv(units, items);  // the widest item
  thread_local std::vector<float> keep;
  std::unique_ptr<float[]> big;
  float* h_all = Scratch(keep, static_cast<size_t>(items * tokens * (range + d)), &big);
  float* copies = h_all + items * tokens * range;  // y of items 1..
  thread_local std::vector<int32_t> flag_keep;
  std::unique_ptr<int32_t[]> flag_big;
  int32_t* flags_all = Scratch(flag_keep, static_cast<size_t>(items * tokens * range), &flag_big);
  std::vector<int64_t> counts(static_cast<size_t>(items * tokens), 0);
  const Kernels<float> kernels = GetKernels<float>(isa);
  const float* lo = static_cast<const float*>(op.lo);
  const float* hi = static_cast<const float*>(op.hi);
  const bool panels = TilePanels<float>(tokens, d, D, tk);
  const int64_t target = panels ? PanelBlock<float>(D, tk.lanes * tk.vecs) : NeuronBlock<float>(d, D);
  auto work = [&](size_t item) {
    const int64_t s = static_cast<int64_t>(item);
    const int64_t j0 = align * (units * s / items), j1 = std::min(D, align * (units * (s + 1) / items)), n = j1 - j0;
    float* h = h_all + s * tokens * range;
    int32_t* flags = flags_all + s * tokens * range;
    int64_t* cnt = counts.data() + s * tokens;
    pred.Predict(j0, j1, h);
    for (int64_t t = 0; t < tokens; ++t) {
      int32_t* list = flags + t * n;
      cnt[t] = FlagRow(h + t * n, lo + j0, hi + j0, n, list, isa);
      for (int64_t q = 0; q < cnt[t]; ++q) list[q] += static_cast<int32_t>(j0);
    }
    float* ybase = s == 0 ? y : copies + (s - 1) * tokens * d;
    if (s > 0) std::fill(ybase, ybase + tokens * d, 0.0f);
    const Problem<float> p{tokens, d, D, static_cast<const float*>(op.x), y,
                           static_cast<const float*>(op.w1t), static_cast<const float*>(op.b1),
                           static_cast<const float*>(op.w2), static_cast<const float*>(op.alpha),
                           static_cast<const float*>(op.beta), gelu, &kernels, flags, cnt, n};
    TileItem(p, tk, panels, 0, tokens, j0, j1, target, ybase, [](int64_t) {});
  };
  ParallelFor(par, static_cast<size_t>(items), work);
  for (int64_t s = 1; s < items; ++s) {
    const float* src = copies + (s - 1) * tokens * d;
    for (int64_t i = 0; i < tokens * d; ++i) y[i] += src[i];
  }
  if (info) {
    *info = RunInfo{};
    info->path = panels ? Strategy::kPanel : Strategy::kTile;
    for (int64_t c : counts) info->flagged_pairs += c;
  }
  return true;
}

void RunHalf(const Operands& op, GeluKind gelu, Strategy strategy, Isa isa, const Parallel& par, RunInfo* info) {
  const int64_t n = op.tokens * op.d;
  const half* xh = static_cast<const half*>(op.x);
  const half* yl = static_cast<const half*>(op.y_lin);
  half* yh = static_cast<half*>(op.y);
  // x and y as float32 in the calling thread's kept scratch (a fresh zeroed buffer per call cost page
  // faults and a pass of its own).
  thread_local std::vector<float> xy_keep;
  std::unique_ptr<float[]> xy_big;
  float* x = Scratch(xy_keep, static_cast<size_t>(2 * n), &xy_big);
  float* y = x + n;
  HalfToFloatN(xh, x, n, isa);
  HalfToFloatN(yl, y, n, isa);
  RunImpl<half>(op, x, y, gelu, strategy, isa, par, info);
  FloatToHalfN(y, yh, n, isa);
}

// dst[i] = src[i] converted, for i < n: F16C where the CPU has it (unless isa is kPortable).
template <class S, class T>
void ConvertN(const S* src, T* dst, int64_t n, Isa isa) {
#if TARDIS_X86
  if (isa != Isa::kPortable && CpuHasAvx2()) return avx2::ConvertRow(src, dst, n);
#endif
  (void)isa;
  for (int64_t i = 0; i < n; ++i) Convert(src[i], dst + i);
}

void HalfToFloatN(const uint16_t* src, float* dst, int64_t n, Isa isa) { ConvertN(src, dst, n, isa); }
void FloatToHalfN(const float* src, uint16_t* dst, int64_t n, Isa isa) { ConvertN(src, dst, n, isa); }

}  // namespace tardis
