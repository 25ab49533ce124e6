// The tile-path kernels and the vector GELU of GuardedFallback, written once for 8- and 16-float vectors.
//
// Included by gf_kernel.cc inside each instruction-set namespace (avx2, avx512) after that namespace has
// defined `Vec` (the vector register type and its operations, kLanes floats each, kTileVecs registers per
// chunk at most) and TARDIS_SIMD (the target attribute its functions are compiled for). No include guard:
// one copy per namespace, each compiled for its own instruction set.

// acc[q] += reg . row_q[0 : kLanes NV] for q < n, row_q = base + idx[q] * stride: one operand held in NV
// registers, the rows streamed past it four at a time with two accumulators each (8 FMA chains). Fully
// unrolled (constant NV), so reg[v] stays in registers instead of being reloaded from the stack.
template <class R, int NV>
TARDIS_SIMD inline __attribute__((always_inline)) void RegDots(const typename Vec::Reg (&reg)[NV], const R* base,
                                                               int64_t stride, const int32_t* idx, int64_t n,
                                                               float* acc) {
  using V = Vec;
  constexpr int L = V::kLanes;
  int64_t q = 0;
  for (; q + 4 <= n; q += 4) {
    const R* r0 = base + idx[q] * stride;
    const R* r1 = base + idx[q + 1] * stride;
    const R* r2 = base + idx[q + 2] * stride;
    const R* r3 = base + idx[q + 3] * stride;
    typename V::Reg a0 = V::Mul(reg[0], V::Load(r0)), a1 = V::Mul(reg[0], V::Load(r1));
    typename V::Reg a2 = V::Mul(reg[0], V::Load(r2)), a3 = V::Mul(reg[0], V::Load(r3));
    typename V::Reg b0 = V::Zero(), b1 = V::Zero(), b2 = V::Zero(), b3 = V::Zero();
#pragma GCC unroll 16
    for (int v = 1; v < NV; v += 2) {
      b0 = V::Fma(reg[v], V::Load(r0 + L * v), b0);
      b1 = V::Fma(reg[v], V::Load(r1 + L * v), b1);
      b2 = V::Fma(reg[v], V::Load(r2 + L * v), b2);
      b3 = V::Fma(reg[v], V::Load(r3 + L * v), b3);
      if (v + 1 < NV) {
        a0 = V::Fma(reg[v + 1], V::Load(r0 + L * (v + 1)), a0);
        a1 = V::Fma(reg[v + 1], V::Load(r1 + L * (v + 1)), a1);
        a2 = V::Fma(reg[v + 1], V::Load(r2 + L * (v + 1)), a2);
        a3 = V::Fma(reg[v + 1], V::Load(r3 + L * (v + 1)), a3);
      }
    }
    const __m128 s = V::Sum4(V::Add(a0, b0), V::Add(a1, b1), V::Add(a2, b2), V::Add(a3, b3));
    _mm_storeu_ps(acc + q, _mm_add_ps(_mm_loadu_ps(acc + q), s));
  }
  for (; q < n; ++q) {
    const R* r0 = base + idx[q] * stride;
    typename V::Reg a0 = V::Mul(reg[0], V::Load(r0)), b0 = V::Zero();
#pragma GCC unroll 16
    for (int v = 1; v < NV; v += 2) {
      b0 = V::Fma(reg[v], V::Load(r0 + L * v), b0);
      if (v + 1 < NV) a0 = V::Fma(reg[v + 1], V::Load(r0 + L * (v + 1)), a0);
    }
    acc[q] += V::Sum(V::Add(a0, b0));
  }
}

// h[q] += x[0 : kLanes NV] . w[js[q] * d : + kLanes NV] for q < n (x and w already offset by the chunk's
// first column): the x chunk in NV registers, the weight rows streamed past it.
template <class W, int NV>
TARDIS_SIMD void TileDots(const float* x, const W* w, int64_t d, const int32_t* js, int64_t n, float* h) {
  typename Vec::Reg xr[NV];
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) xr[v] = Vec::Load(x + Vec::kLanes * v);
  RegDots<W, NV>(xr, w, d, js, n, h);
}

// y[0 : kLanes NV] += sum_{q < n} c[q] * w[js[q] * d : + kLanes NV]: the y chunk in NV registers, stored once.
template <class W, int NV>
TARDIS_SIMD void TileAxpy(float* y, const W* w, int64_t d, const int32_t* js, const float* c, int64_t n) {
  constexpr int L = Vec::kLanes;
  typename Vec::Reg yr[NV];
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) yr[v] = Vec::Load(y + L * v);
  for (int64_t q = 0; q < n; ++q) {
    const typename Vec::Reg cv = Vec::Set1(c[q]);
    const W* r = w + js[q] * d;
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) yr[v] = Vec::Fma(cv, Vec::Load(r + L * v), yr[v]);
  }
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) Vec::Store(y + L * v, yr[v]);
}

template <class W, int... I>
TileKernels<W> MakeTile(std::integer_sequence<int, I...>) {
  return TileKernels<W>{Vec::kLanes, Vec::kTileVecs, {&TileDots<W, I + 1>...}, {&TileAxpy<W, I + 1>...}};
}

template <class W>
TileKernels<W> GetTile() {
  return MakeTile<W>(std::make_integer_sequence<int, Vec::kTileVecs>{});
}

// e^x per lane (Cephes expf: x = n ln2 + r, degree-6 polynomial in r, times 2^n; rel. err ~1e-7).
TARDIS_SIMD inline typename Vec::Reg Exp(typename Vec::Reg x) {
  using V = Vec;
  x = V::Min(V::Max(x, V::Set1(-87.3f)), V::Set1(88.3f));
  const typename V::Reg n = V::Round(V::Mul(x, V::Set1(1.44269504088896341f)));
  typename V::Reg r = V::Fnma(n, V::Set1(0.693359375f), x);
  r = V::Fnma(n, V::Set1(-2.12194440e-4f), r);
  typename V::Reg p = V::Set1(1.9875691500e-4f);
  p = V::Fma(p, r, V::Set1(1.3981999507e-3f));
  p = V::Fma(p, r, V::Set1(8.3334519073e-3f));
  p = V::Fma(p, r, V::Set1(4.1665795894e-2f));
  p = V::Fma(p, r, V::Set1(1.6666665459e-1f));
  p = V::Fma(p, r, V::Set1(5.0000001201e-1f));
  p = V::Fma(p, V::Mul(r, r), V::Add(r, V::Set1(1.0f)));
  return V::Scale2(p, n);
}

// erf per lane: Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7); odd, so |x| and the sign of x.
TARDIS_SIMD inline typename Vec::Reg Erf(typename Vec::Reg x) {
  using V = Vec;
  const typename V::Reg sign = V::SignBits(x), a = V::Xor(x, sign);
  const typename V::Reg t = V::Div(V::Set1(1.0f), V::Fma(a, V::Set1(0.3275911f), V::Set1(1.0f)));
  typename V::Reg p = V::Set1(1.061405429f);
  p = V::Fma(p, t, V::Set1(-1.453152027f));
  p = V::Fma(p, t, V::Set1(1.421413741f));
  p = V::Fma(p, t, V::Set1(-0.284496736f));
  p = V::Fma(p, t, V::Set1(0.254829592f));
  p = V::Mul(p, t);
  const typename V::Reg e = Exp(V::Mul(V::Sub(V::Zero(), a), a));
  return V::Xor(V::Fnma(p, e, V::Set1(1.0f)), sign);
}

// GELU(h) - a h - b per lane.
TARDIS_SIMD inline typename Vec::Reg CorrLanes(typename Vec::Reg hv, typename Vec::Reg av, typename Vec::Reg bv,
                                              GeluKind kind) {
  using V = Vec;
  const typename V::Reg one = V::Set1(1.0f);
  typename V::Reg inner;  // GELU(h) = 0.5 h (1 + inner)
  if (kind == GeluKind::kErf) {
    inner = Erf(V::Mul(hv, V::Set1(static_cast<float>(kInvSqrt2))));
  } else {  // tanh(u) = 1 - 2 / (e^{2u} + 1)
    const typename V::Reg u = V::Mul(V::Mul(hv, V::Fma(V::Mul(hv, hv), V::Set1(0.044715f), one)),
                                     V::Set1(static_cast<float>(2.0 * kSqrt2OverPi)));
    inner = V::Sub(one, V::Div(V::Set1(2.0f), V::Add(Exp(u), one)));
  }
  return V::Sub(V::Mul(V::Mul(hv, V::Set1(0.5f)), V::Add(inner, one)), V::Fma(av, hv, bv));
}

// c[i] = GELU(h[i]) - a[i] h[i] - b[i] for i < n, kLanes at a time (a masked last vector).
TARDIS_SIMD void CorrN(float* c, const float* h, const float* a, const float* b, int64_t n, GeluKind kind) {
  using V = Vec;
  int64_t i = 0;
  for (; i + V::kLanes <= n; i += V::kLanes)
    V::Store(c + i, CorrLanes(V::Load(h + i), V::Load(a + i), V::Load(b + i), kind));
  if (i < n) {
    const int m = static_cast<int>(n - i);
    V::StoreN(c + i, CorrLanes(V::LoadN(h + i, m), V::LoadN(a + i, m), V::LoadN(b + i, m), kind), m);
  }
}
