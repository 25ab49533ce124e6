// Compute core of ai.tardis::GuardedFallback (see OP_SPEC.md). Independent of the ONNX Runtime API:
// tardis_ops.cc validates the tensors, hands raw pointers here and supplies the thread pool.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

namespace tardis {

enum class GeluKind { kErf, kTanh };
// All but kAuto force a path (tests, benchmarks). kPanel is the tile path in column-panel order.
enum class Strategy { kAuto, kToken, kUnion, kNeuron, kTile, kPanel };
enum class Isa { kPortable, kAvx2, kAvx512 };  // kAvx512: AVX2 set + AVX-512F block kernels

// Runs fn(data, i) for every i in [0, n), possibly in parallel; returns when all are done.
class Parallel {
 public:
  virtual ~Parallel() = default;
  virtual void For(size_t n, void (*fn)(void*, size_t), void* data) const = 0;
};

// Raw operands. Element type is float or IEEE binary16 (uint16_t bits) for all of them; `tokens` is the
// product of x's leading axes. Weights are neuron-major: w1t[j*d + i], w2[j*d + i].
struct Operands {
  int64_t tokens = 0, d = 0, D = 0;
  const void* x = nullptr;
  const void* y_lin = nullptr;
  const void* h_hat = nullptr;
  const void* lo = nullptr;
  const void* hi = nullptr;
  const void* w1t = nullptr;
  const void* b1 = nullptr;
  const void* w2 = nullptr;
  const void* alpha = nullptr;
  const void* beta = nullptr;
  void* y = nullptr;
};

struct RunInfo {
  Strategy path = Strategy::kToken;  // the path that ran (kToken, kUnion, kNeuron, kTile or kPanel)
  bool used_union = false;
  int64_t flagged_pairs = 0;  // sum over tokens of |F(t)|
  int64_t union_size = 0;     // |U| = |union of F(t)|
};

// True when the CPU supports AVX2, FMA and F16C (checked once at run time).
bool CpuHasAvx2();
// True when the CPU also supports AVX-512F.
bool CpuHasAvx512();

// float16 (IEEE binary16 bits) -> float32 and back (round to nearest even), n values; 8 per instruction
// with F16C unless isa is kPortable.
void HalfToFloatN(const uint16_t* src, float* dst, int64_t n, Isa isa);
void FloatToHalfN(const float* src, uint16_t* dst, int64_t n, Isa isa);

// Per-call scratch of n elements, not initialized: `keep` (a buffer of the calling thread, kept between
// calls) while it is at most kKeepBytes, else a one-off allocation owned by `*big`. A fresh multi-MB buffer
// per call costs page faults (and, zeroed, a pass over it on the calling thread while the workers wait).
constexpr size_t kKeepBytes = size_t{16} << 20;
template <class E>
E* Scratch(std::vector<E>& keep, size_t n, std::unique_ptr<E[]>* big) {
  if (n * sizeof(E) > kKeepBytes) {
    big->reset(new E[n]);
    return big->get();
  }
  if (keep.size() < n) keep.resize(n);
  return keep.data();
}

// y = y_lin + sum_{j in F(t)} (GELU(h_j) - alpha_j h_j - beta_j) w2[j,:], for float32 operands.
void RunFloat(const Operands& op, GeluKind gelu, Strategy strategy, Isa isa, const Parallel& par, RunInfo* info);
// h_hat of a range of neurons for every token, computed inside the fallback's work items (RunFloatFused).
class RangePredictor {
 public:
  virtual ~RangePredictor() = default;
  // Ranges handed to Predict start at multiples of this.
  virtual int64_t Align() const = 0;
  // h[t * (j1 - j0) + j - j0] for every token t and neuron j in [j0, j1); called from any thread.
  virtual void Predict(int64_t j0, int64_t j1, float* h) const = 0;
};

// Whether RunFloatFused runs for these sizes: float32 operands, few tokens, the tile path available.
bool FusedPathApplies(int64_t tokens, int64_t d, int64_t D, Isa isa);
// RunFloat with h_hat (op.h_hat unused) from `pred`, for few tokens where the tile path runs: each work item
// predicts a range of neurons, flags it and adds its corrections, all in one parallel section. Returns false,
// y untouched, where it does not apply (FusedPathApplies); the caller then computes h_hat and calls RunFloat.
bool RunFloatFused(const Operands& op, const RangePredictor& pred, GeluKind gelu, Isa isa, const Parallel& par,
                   RunInfo* info);
// The same for float16 operands (converted to float32 internally, accumulated in float32).
void RunHalf(const Operands& op, GeluKind gelu, Strategy strategy, Isa isa, const Parallel& par, RunInfo* info);

}  // namespace tardis
