// Compute core of ai.tardis::MatMulNBits (OP_SPEC.md): a 4-bit block-quantized matrix product with int8
// activations, the arithmetic of com.microsoft::MatMulNBits at accuracy_level 4, for the int4 predictor.
// Independent of the ONNX Runtime API, like gf_kernel.h.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "gf_kernel.h"

namespace tardis {

// The weights repacked once per node for the int8 dot-product kernels. Per tile of 16 neurons, per block of
// `bs` rows of K: bs / 8 vectors of 64 bytes (byte 4 n + i holds, in its low nibble, the level of neuron n at
// row 8 p + i of the block and, in its high nibble, the one at row 8 p + 4 + i), then the 16 neurons' scales
// (float32) and zero points (int8). Neurons past N are zero (their outputs are not stored).
struct Int4Packed {
  int64_t K = 0, N = 0, bs = 0, kb = 0, tiles = 0;
  std::vector<uint8_t> storage;  // data() starts at the first 64-byte boundary in it (whole-line loads)
  size_t offset = 0;

  const uint8_t* data() const { return storage.data() + offset; }
  int64_t BlockBytes() const { return bs * 8 + 16 * 4 + 16; }
  int64_t TileBytes() const { return kb * BlockBytes(); }
};

// Repack MatMulNBits inputs: B [N, kb, bs / 2] (two levels per byte, low nibble first), scales [N * kb]
// (float32; float16 callers convert first), zero points [N, ceil(kb / 2)] packed the same way (nullptr:
// 8, MatMulNBits' default).
void PackInt4(const uint8_t* b, const float* scales, const uint8_t* zero_points, int64_t K, int64_t N, int64_t bs,
              Int4Packed* out);

// The int8 activations of M rows for Int4Tiles: levels padded to kb * bs per row, one scale and one level
// sum per block, and the instruction set (Int4Level) the tiles use.
struct Int4Acts {
  int64_t M = 0, ld = 0;  // ld = kb * bs
  int level = 0;
  int8_t* q = nullptr;
  float* sx = nullptr;
  int32_t* sum = nullptr;
};

// Quantizes x (float32 [M, K]) for Int4Tiles into the calling thread's kept scratch (over kKeepBytes: a
// buffer owned by *big): valid until this thread quantizes again, readable from any thread meanwhile.
Int4Acts Int4Quantize(const Int4Packed& w, const float* x, int64_t M, Isa isa, std::unique_ptr<uint8_t[]>* big);

// The neurons of tiles [t0, t1) (16 each): h[m * ldh + n - 16 t0] for n in [16 t0, min(16 t1, N)).
void Int4Tiles(const Int4Packed& w, const Int4Acts& a, const float* bias, int64_t t0, int64_t t1, float* h,
               int64_t ldh);

// h[m, :] = Q(x[m, :]) . W + bias for m < M: x float32 [M, K], h float32 [M, N], bias [N] or nullptr.
// Q rounds each block of bs values of a row to int8 with one scale, max |x| / 127 (MatMulNBits' accuracy
// level 4); the integer products are exact, the per-block scaling float32.
void Int4MatMul(const Int4Packed& w, const float* x, int64_t M, const float* bias, float* h, Isa isa,
                const Parallel& par);

// The instruction set Int4MatMul uses under the cap `isa`: 2 = AVX-512 VNNI, 1 = AVX2, 0 = portable.
int Int4Level(Isa isa);

}  // namespace tardis
