// Compute core of ai.tardis::MatMulNBits and ai.tardis::DequantizeMatMul (OP_SPEC.md): a 4- or 8-bit
// block-quantized matrix product with int8 activations, the arithmetic of com.microsoft::MatMulNBits at
// accuracy_level 4; 4 bits for the int4 predictor, 8 for the int8 fold (--fold-bits 8).
// Independent of the ONNX Runtime API, like gf_kernel.h.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "gf_kernel.h"

namespace tardis {

// The weights repacked once per node for the int8 dot-product kernels, in tiles of 16 neurons:
//   4 bits (MatMulNBits): per block of `bs` rows of K, the levels, then the 16 neurons' scales (float32) and
//     zero points (uint8);
//   8 bits (DequantizeMatMul): the levels of every block, then the 16 neurons' scales (float32), one per
//     neuron for all of K; the zero point is 128 (levels B + 128).
// The levels are vectors of 64 bytes, byte 4 n + i for neuron n:
//   4 bits: bs / 8 vectors per block; in vector p, the low nibble holds row 8 p + i of the block, the high
//     one row 8 p + 4 + i;
//   8 bits: bs / 4 vectors per block; in vector p, row 4 p + i.
// Neurons past N and rows past K are zero (their outputs are not stored; their activations are 0).
struct NBitsPacked {
  int64_t K = 0, N = 0, bs = 0, kb = 0, tiles = 0;
  int bits = 4;
  std::vector<uint8_t> storage;  // data() starts at the first 64-byte boundary in it (whole-line loads)
  size_t offset = 0;

  // 16 neurons x bs rows x bits / 8; at 4 bits a block also holds its scales and zero points
  static constexpr int64_t LevelBytes(int bits, int64_t bs) { return bs * 2 * bits; }
  static constexpr int64_t BlockBytes(int bits, int64_t bs) { return LevelBytes(bits, bs) + (bits == 4 ? 16 * 4 + 16 : 0); }

  const uint8_t* data() const { return storage.data() + offset; }
  int64_t LevelBytes() const { return LevelBytes(bits, bs); }
  int64_t BlockBytes() const { return BlockBytes(bits, bs); }
  int64_t TileBytes() const { return kb * BlockBytes() + (bits == 8 ? 16 * 4 : 0); }
};

// Repack MatMulNBits inputs: B [N, kb, bs / 2] (two levels per byte, low nibble first), scales [N * kb]
// (float32; float16 callers convert first), zero points [N, ceil(kb / 2)] packed the same way (nullptr:
// 8, MatMulNBits' default).
void PackInt4(const uint8_t* b, const float* scales, const uint8_t* zero_points, int64_t K, int64_t N, int64_t bs,
              NBitsPacked* out);

// Repack the operands of x . DequantizeLinear(B, scale, axis=1): B int8 [K, N], one scale per column [N]
// (float32). Stored as 8-bit levels B + 128; `bs` rows of K share an activation scale.
void PackInt8Columns(const int8_t* b, const float* scales, int64_t K, int64_t N, int64_t bs, NBitsPacked* out);

// The int8 activations of M rows for NBitsTiles: levels padded to kb * bs per row, one scale and one level
// sum per block, and the instruction set (NBitsLevel) the tiles use.
struct NBitsActs {
  int64_t M = 0, ld = 0;  // ld = kb * bs
  int level = 0;
  int8_t* q = nullptr;
  float* sx = nullptr;
  int32_t* sum = nullptr;  // 8 bits: -128 x the level sum, the start of the block's integer accumulator
};

// Quantizes x (float32 [M, K]) for NBitsTiles into the calling thread's kept scratch (over kKeepBytes: a
// buffer owned by *big): valid until this thread quantizes again, readable from any thread meanwhile.
NBitsActs NBitsQuantize(const NBitsPacked& w, const float* x, int64_t M, Isa isa, std::unique_ptr<uint8_t[]>* big);

// The neurons of tiles [t0, t1) (16 each): h[m * ldh + n - 16 t0] for n in [16 t0, min(16 t1, N)).
void NBitsTiles(const NBitsPacked& w, const NBitsActs& a, const float* bias, int64_t t0, int64_t t1, float* h,
               int64_t ldh);

// h[m, :] = Q(x[m, :]) . W + bias for m < M: x float32 [M, K], h float32 [M, N], bias [N] or nullptr.
// Q rounds each block of bs values of a row to int8 with one scale, max |x| / 127 (MatMulNBits' accuracy
// level 4); the integer products are exact, the per-block scaling float32.
void NBitsMatMul(const NBitsPacked& w, const float* x, int64_t M, const float* bias, float* h, Isa isa,
                const Parallel& par);

// The instruction set NBitsMatMul uses under the cap `isa`: 2 = AVX-512 VNNI, 1 = AVX2, 0 = portable.
int NBitsLevel(Isa isa);

}  // namespace tardis
