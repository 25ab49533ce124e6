// libtardis_ops: ONNX Runtime custom-op library with ai.tardis::GuardedFallback, ai.tardis::MatMulNBits (the
// int4 predictor's product), ai.tardis::GuardedFallbackNBits (the two in one node) and
// ai.tardis::DequantizeMatMul (the int8 fold's product; OP_SPEC.md).
//
// Built against the ORT C API version 21 headers, WITHOUT linking libonnxruntime: the API table is taken
// from the OrtApiBase that ORT passes to RegisterCustomOps, so one build loads into onnxruntime
// 1.21 ... current. Each kernel is registered once per element type (float, float16) under the same op name;
// ORT merges them into one schema with type constraints. ort_io.h has the op descriptions and how the kernels
// read their inputs (constant weights once per kernel, activations per call).
//
// Environment (read when a kernel is created, i.e. at session creation):
//   TARDIS_OPS_FORCE_PORTABLE=1   use the portable C++ path even on AVX2 machines
//   TARDIS_OPS_ISA=avx2|portable  cap the instruction set (default: the best the CPU has: avx512 > avx2)
//   TARDIS_OPS_STRATEGY=token|union|neuron|tile|auto   force the per-token, union-gather, neuron-major or
//                                                 (AVX-512 only, else auto) tile strategy

#ifndef ORT_API_MANUAL_INIT
#define ORT_API_MANUAL_INIT
#endif
#include "onnxruntime_cxx_api.h"

#include <atomic>
#include <iterator>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#include "gf_kernel.h"
#include "nbits_kernel.h"
#include "ort_io.h"

#define TARDIS_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

constexpr const char* kDomain = "ai.tardis";
constexpr const char* kOpName = "GuardedFallback";
constexpr const char* kNBitsName = "MatMulNBits";
constexpr const char* kNBitsOp = "ai.tardis::MatMulNBits";  // in error messages
constexpr const char* kFusedName = "GuardedFallbackNBits";
constexpr const char* kFusedOp = "ai.tardis::GuardedFallbackNBits";
constexpr const char* kDqmmName = "DequantizeMatMul";
constexpr const char* kDqmmOp = "ai.tardis::DequantizeMatMul";
constexpr int kRequiredApi = 21;

std::atomic<uint64_t> g_calls{0};
std::atomic<uint64_t> g_union_calls{0};
std::atomic<uint64_t> g_neuron_calls{0};
std::atomic<uint64_t> g_tile_calls{0};
std::atomic<uint64_t> g_panel_calls{0};
std::atomic<uint64_t> g_portable_calls{0};
std::atomic<uint64_t> g_avx512_calls{0};
std::atomic<uint64_t> g_flagged_pairs{0};
std::atomic<uint64_t> g_nbits_calls{0};
std::atomic<uint64_t> g_fused_calls{0};
std::atomic<uint64_t> g_fused_paths{0};
std::atomic<uint64_t> g_dqmm_calls{0};

// Ort::Float16_t is the IEEE binary16 bits (one uint16_t member); the compute cores take those bits.
static_assert(sizeof(Ort::Float16_t) == sizeof(uint16_t), "Ort::Float16_t is not 16 bits");
const uint16_t* Bits(const Ort::Float16_t* p) { return reinterpret_cast<const uint16_t*>(p); }
uint16_t* Bits(Ort::Float16_t* p) { return reinterpret_cast<uint16_t*>(p); }

bool EnvFlag(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && v[0] != '\0' && std::strcmp(v, "0") != 0;
}

std::string ShapeStr(const std::vector<int64_t>& s) {
  std::ostringstream os;
  os << '[';
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << ']';
  return os.str();
}

// The rows of a [..., last axis] tensor: the product of its leading axes.
int64_t Rows(const std::vector<int64_t>& shape) {
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < shape.size(); ++i) rows *= shape[i];
  return rows;
}

class OrtParallel final : public tardis::Parallel {
 public:
  explicit OrtParallel(OrtKernelContext* ctx) : ctx_(ctx) {}
  void For(size_t n, void (*fn)(void*, size_t), void* data) const override { ctx_.ParallelFor(fn, n, 0, data); }

 private:
  Ort::KernelContext ctx_;
};

using tardis_ort::In;
using tardis_ort::NodeInputs;
using tardis_ort::Output;

// The instruction set a kernel created now may use: the best the CPU has, capped by the environment.
tardis::Isa IsaFromEnv() {
  const char* isa = std::getenv("TARDIS_OPS_ISA");
  const bool no512 = isa != nullptr && std::strcmp(isa, "avx2") == 0;
  if (EnvFlag("TARDIS_OPS_FORCE_PORTABLE") || (isa != nullptr && std::strcmp(isa, "portable") == 0))
    return tardis::Isa::kPortable;
  if (!no512 && tardis::CpuHasAvx512()) return tardis::Isa::kAvx512;
  if (tardis::CpuHasAvx2()) return tardis::Isa::kAvx2;
  return tardis::Isa::kPortable;
}

int64_t IntAttribute(const OrtApi* api, const OrtKernelInfo* info, const char* name, int64_t fallback) {
  int64_t value = fallback;
  if (OrtStatus* st = api->KernelInfoGetAttribute_int64(info, name, &value)) {
    api->ReleaseStatus(st);
    return fallback;
  }
  return value;
}

Ort::Status OpError(const char* op, const std::string& msg, OrtErrorCode code = ORT_INVALID_ARGUMENT) {
  return Ort::Status((std::string(op) + ": " + msg).c_str(), code);
}

// Runs a kernel's body; an exception becomes an error status naming the op (none crosses the C API).
template <class Body>
Ort::Status Guarded(const char* op, Body&& body) {
  try {
    return body();
  } catch (const Ort::Exception& e) {
    return Ort::Status(e);
  } catch (const std::exception& e) {
    return OpError(op, std::string("internal error: ") + e.what(), ORT_RUNTIME_EXCEPTION);
  }
}

float ToFloat(float v) { return v; }
float ToFloat(Ort::Float16_t v) { return v.ToFloat(); }

template <typename T>
std::vector<float> Floats(const T* p, int64_t n) {
  std::vector<float> f(static_cast<size_t>(n));
  for (size_t i = 0; i < f.size(); ++i) f[i] = ToFloat(p[i]);
  return f;
}

// A node's weights repacked for nbits_kernel: once, on the first call, and kept with the node when they are
// constant initializers (as tardis-compile emits them); otherwise on every call (weights fed as inputs may
// change between calls).
class PackedWeights {
 public:
  using Ptr = std::shared_ptr<const tardis::NBitsPacked>;
  explicit PackedWeights(bool constant) : constant_(constant) {}

  // `pack(NBitsPacked*)` fills a fresh one.
  template <class Pack>
  Ptr Get(Pack&& pack) {
    auto fresh = [&] {
      auto p = std::make_shared<tardis::NBitsPacked>();
      pack(p.get());
      return Ptr(std::move(p));
    };
    if (!constant_) return fresh();
    std::lock_guard<std::mutex> lock(mutex_);
    if (!packed_) packed_ = fresh();
    return packed_;
  }

 private:
  bool constant_;
  std::mutex mutex_;
  Ptr packed_;
};

// The int4 predictor's operands of a node: attributes K, N, bits, block_size, accuracy_level, and inputs B,
// scales, zero_points and bias, repacked as PackedWeights says (`constant`: B, scales and zero points are).
template <typename T>
class Int4Weights {
 public:
  Int4Weights(const OrtApi* api, const OrtKernelInfo* info, const char* op, bool constant)
      : op_(op), K_(IntAttribute(api, info, "K", -1)), N_(IntAttribute(api, info, "N", -1)),
        bs_(IntAttribute(api, info, "block_size", -1)), packed_(constant) {
    const int64_t accuracy_level = IntAttribute(api, info, "accuracy_level", 4);
    const int64_t bits = IntAttribute(api, info, "bits", 4);
    if (accuracy_level != 4)
      ORT_CXX_API_THROW(op_ + ": accuracy_level must be 4 (int8 activations), got " + std::to_string(accuracy_level),
                        ORT_INVALID_ARGUMENT);
    if (bits != 4)
      ORT_CXX_API_THROW(op_ + ": only bits = 4 is implemented, got " + std::to_string(bits), ORT_INVALID_ARGUMENT);
    if (K_ <= 0 || N_ <= 0 || bs_ < 16 || bs_ > 128 || (bs_ & (bs_ - 1)) != 0)
      ORT_CXX_API_THROW(op_ + ": attributes K, N > 0 and block_size 16, 32, 64 or 128 required, got K=" +
                            std::to_string(K_) + " N=" + std::to_string(N_) + " block_size=" + std::to_string(bs_),
                        ORT_INVALID_ARGUMENT);
  }

  int64_t K() const { return K_; }
  int64_t N() const { return N_; }

  // "" when B, scales, zero points and bias have the shapes the attributes say, else what is wrong.
  std::string Check(In<uint8_t> b, In<T> scales, In<uint8_t> zp, In<T> bias) const {
    const int64_t kb = Blocks();
    const std::vector<int64_t> b_shape{N_, kb, bs_ / 2}, s_shape{N_ * kb}, z_shape{N_ * ((kb + 1) / 2)}, n_shape{N_};
    if (b.Shape() != b_shape) return "B must have shape " + ShapeStr(b_shape) + ", got " + ShapeStr(b.Shape());
    if (scales.Shape() != s_shape && scales.Shape() != std::vector<int64_t>{N_, kb})
      return "scales must have shape " + ShapeStr(s_shape) + ", got " + ShapeStr(scales.Shape());
    if (zp.Shape() != z_shape && zp.Shape() != std::vector<int64_t>{N_, (kb + 1) / 2})
      return "zero_points must have shape " + ShapeStr(z_shape) + ", got " + ShapeStr(zp.Shape());
    if (bias.Shape() != n_shape) return "bias must have shape " + ShapeStr(n_shape) + ", got " + ShapeStr(bias.Shape());
    return "";
  }

  PackedWeights::Ptr Packed(const uint8_t* b, const T* scales, const uint8_t* zp) {
    return packed_.Get([&](tardis::NBitsPacked* out) {
      tardis::PackInt4(b, Floats(scales, N_ * Blocks()).data(), zp, K_, N_, bs_, out);
    });
  }

 private:
  int64_t Blocks() const { return (K_ + bs_ - 1) / bs_; }

  std::string op_;
  int64_t K_, N_, bs_;
  PackedWeights packed_;
};

// h = NBitsMatMul(a) for M rows of T into `out`; float16 goes through float32 in the calling thread's scratch.
template <typename T>
void NBitsProduct(const tardis::NBitsPacked& w, const T* a, int64_t M, const T* bias, T* out, tardis::Isa isa,
                 const tardis::Parallel& par) {
  if constexpr (std::is_same<T, float>::value) {
    tardis::NBitsMatMul(w, a, M, bias, out, isa, par);
  } else {  // A, bias and Y as float32 in the calling thread's kept scratch, converted with F16C
    const int64_t K = w.K, N = w.N;
    thread_local std::vector<float> keep;
    std::unique_ptr<float[]> big;
    float* af = tardis::Scratch(keep, static_cast<size_t>(M * K + N + M * N), &big);
    float *bf = af + M * K, *yf = bf + N;
    tardis::HalfToFloatN(Bits(a), af, M * K, isa);
    tardis::HalfToFloatN(Bits(bias), bf, N, isa);
    tardis::NBitsMatMul(w, af, M, bf, yf, isa, par);
    tardis::FloatToHalfN(yf, Bits(out), M * N, isa);
  }
}

// ai.tardis::MatMulNBits: com.microsoft::MatMulNBits at accuracy_level 4 for bits = 4 (the int4 predictor),
// run by nbits_kernel.
template <typename T>
struct MatMulNBitsKernel {
  // All five inputs must be there: the contrib op's optional zero_points / bias (and its g_idx) are not, so
  // a node without them is refused here.
  static constexpr const char* kInputs[] = {"A", "B", "scales", "zero_points", "bias"};
  static constexpr size_t kInputCount = std::size(kInputs);
  static constexpr char kInputTypes[] = "TuTuT";

  MatMulNBitsKernel(const OrtApi* api, const OrtKernelInfo* info)
      : inputs_(api, info, kNBitsOp, kInputs, "no g_idx"),
        weights_(api, info, kNBitsOp, inputs_.Constant(1) && inputs_.Constant(2) && inputs_.Constant(3)),
        isa_(IsaFromEnv()) {}

  OrtStatusPtr ComputeV2(OrtKernelContext* ctx) {
    g_nbits_calls.fetch_add(1, std::memory_order_relaxed);
    return Guarded(kNBitsOp, [&] {
      typename NodeInputs<kInputCount>::Call c;
      inputs_.Read(ctx, &c);
      const In<T> a(*c.at[0]), scales(*c.at[2]), bias(*c.at[4]);
      const In<uint8_t> b(*c.at[1]), zero_points(*c.at[3]);
      Output<T> y(ctx);
      const auto& as = a.Shape();
      const int64_t K = weights_.K();
      if (as.empty() || as.back() != K)
        return Error("A must have shape [..., K] with K = " + std::to_string(K) + ", got " + ShapeStr(as));
      const std::string wrong = weights_.Check(b, scales, zero_points, bias);
      if (!wrong.empty()) return Error(wrong);
      std::vector<int64_t> ys(as);
      ys.back() = weights_.N();
      T* out = y.Allocate(ys);
      const int64_t M = Rows(as);
      if (M == 0) return Ort::Status{nullptr};
      OrtParallel par(ctx);
      NBitsProduct(*weights_.Packed(b.Data(), scales.Data(), zero_points.Data()), a.Data(), M, bias.Data(), out, isa_,
                   par);
      return Ort::Status{nullptr};
    }).release();
  }

 private:
  static Ort::Status Error(const std::string& msg) { return OpError(kNBitsOp, msg); }

  NodeInputs<kInputCount> inputs_;
  Int4Weights<T> weights_;
  tardis::Isa isa_;
};

// ai.tardis::DequantizeMatMul: Y = A . DequantizeLinear(B, scale, axis=1) + bias for int8 B [K, N] with one
// scale per column (the int8 fold of --fold-bits 8), A rounded to int8 per block of `block_size` values of K
// as MatMulNBits does at accuracy_level 4, run by nbits_kernel at 8 bits.
template <typename T>
struct DequantizeMatMulKernel {
  static constexpr const char* kInputs[] = {"A", "B", "scale", "bias"};
  static constexpr size_t kInputCount = std::size(kInputs);
  static constexpr char kInputTypes[] = "TiTT";

  DequantizeMatMulKernel(const OrtApi* api, const OrtKernelInfo* info)
      : inputs_(api, info, kDqmmOp, kInputs, "B symmetric: no zero point"),
        bs_(IntAttribute(api, info, "block_size", 32)), packed_(inputs_.Constant(1) && inputs_.Constant(2)),
        isa_(IsaFromEnv()) {
    if (bs_ < 16 || bs_ > 128 || (bs_ & (bs_ - 1)) != 0)
      ORT_CXX_API_THROW(std::string(kDqmmOp) + ": block_size must be 16, 32, 64 or 128, got " + std::to_string(bs_),
                        ORT_INVALID_ARGUMENT);
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* ctx) {
    g_dqmm_calls.fetch_add(1, std::memory_order_relaxed);
    return Guarded(kDqmmOp, [&] {
      typename NodeInputs<kInputCount>::Call c;
      inputs_.Read(ctx, &c);
      const In<T> a(*c.at[0]), scale(*c.at[2]), bias(*c.at[3]);
      const In<int8_t> b(*c.at[1]);
      const auto& as = a.Shape();
      const auto& bs = b.Shape();
      if (bs.size() != 2) return Error("B must have shape [K, N], got " + ShapeStr(bs));
      const int64_t K = bs[0], N = bs[1];
      if (as.empty() || as.back() != K)
        return Error("A must have shape [..., K] with K = " + std::to_string(K) + " (B's rows), got " + ShapeStr(as));
      if (scale.Shape() != std::vector<int64_t>{N})
        return Error("scale must have shape [N] = [" + std::to_string(N) + "], got " + ShapeStr(scale.Shape()));
      if (bias.Shape() != std::vector<int64_t>{N})
        return Error("bias must have shape [N] = [" + std::to_string(N) + "], got " + ShapeStr(bias.Shape()));
      std::vector<int64_t> ys(as);
      ys.back() = N;
      T* out = Output<T>(ctx).Allocate(ys);
      const int64_t M = Rows(as);
      if (M == 0 || N == 0) return Ort::Status{nullptr};
      const PackedWeights::Ptr packed = packed_.Get([&](tardis::NBitsPacked* w) {
        tardis::PackInt8Columns(b.Data(), Floats(scale.Data(), N).data(), K, N, bs_, w);
      });
      NBitsProduct(*packed, a.Data(), M, bias.Data(), out, isa_, OrtParallel(ctx));
      return Ort::Status{nullptr};
    }).release();
  }

 private:
  static Ort::Status Error(const std::string& msg) { return OpError(kDqmmOp, msg); }

  NodeInputs<kInputCount> inputs_;
  int64_t bs_;
  PackedWeights packed_;
  tardis::Isa isa_;
};

// What a fallback node computes with: its GELU (attribute `approximate`), the instruction set and the strategy
// (environment, for tests and benchmarks).
struct FallbackConfig {
  FallbackConfig(const OrtApi* api, const OrtKernelInfo* info, const char* op) : isa(IsaFromEnv()) {
    std::string approx = "none";
    size_t size = 0;
    // Absent attribute -> default "none" (query the size first; a missing attribute is an error status).
    OrtStatus* st = api->KernelInfoGetAttribute_string(info, "approximate", nullptr, &size);
    if (st == nullptr && size > 0) {
      std::string buf(size, '\0');
      Ort::ThrowOnError(api->KernelInfoGetAttribute_string(info, "approximate", &buf[0], &size));
      approx.assign(buf.c_str());
    } else if (st != nullptr) {
      api->ReleaseStatus(st);
    }
    if (approx == "none") {
      gelu = tardis::GeluKind::kErf;
    } else if (approx == "tanh") {
      gelu = tardis::GeluKind::kTanh;
    } else {
      ORT_CXX_API_THROW(std::string(op) + ": attribute 'approximate' must be \"none\" or \"tanh\", got \"" + approx +
                            "\"",
                        ORT_INVALID_ARGUMENT);
    }
    const char* s = std::getenv("TARDIS_OPS_STRATEGY");
    if (s != nullptr && std::strcmp(s, "token") == 0) strategy = tardis::Strategy::kToken;
    if (s != nullptr && std::strcmp(s, "union") == 0) strategy = tardis::Strategy::kUnion;
    if (s != nullptr && std::strcmp(s, "neuron") == 0) strategy = tardis::Strategy::kNeuron;
    if (s != nullptr && std::strcmp(s, "tile") == 0) strategy = tardis::Strategy::kTile;
    if (s != nullptr && std::strcmp(s, "panel") == 0) strategy = tardis::Strategy::kPanel;
  }

  tardis::GeluKind gelu = tardis::GeluKind::kErf;
  tardis::Isa isa = tardis::Isa::kPortable;
  tardis::Strategy strategy = tardis::Strategy::kAuto;
};

// The fallback operands after x, y_lin and the prediction, checked against d (x's last axis) and D (`from`
// says where D comes from); "" when they fit, else what is wrong.
template <typename T>
std::string CheckFallbackOperands(int64_t d, int64_t D, const char* from, In<T> lo, In<T> hi, In<T> w1t, In<T> b1,
                                  In<T> w2, In<T> alpha, In<T> beta) {
  const std::vector<int64_t> vecD{D}, matDd{D, d};
  const char* vec_names[] = {"lo", "hi", "b1", "alpha", "beta"};
  const In<T>* vecs[] = {&lo, &hi, &b1, &alpha, &beta};
  for (int i = 0; i < 5; ++i)
    if (vecs[i]->Shape() != vecD)
      return std::string(vec_names[i]) + " must have shape [D] = " + ShapeStr(vecD) + " (D from " + from + "), got " +
             ShapeStr(vecs[i]->Shape());
  if (w1t.Shape() != matDd)
    return "w1t must have shape [D, d] = " + ShapeStr(matDd) + " (neuron-major W1^T; D from " + from +
           ", d from x), got " + ShapeStr(w1t.Shape());
  if (w2.Shape() != matDd)
    return "w2 must have shape [D, d] = " + ShapeStr(matDd) + " (D from " + from + ", d from x), got " +
           ShapeStr(w2.Shape());
  return "";
}

template <typename T>
tardis::Operands FallbackOperands(int64_t tokens, int64_t d, int64_t D, In<T> x, In<T> y_lin, In<T> lo, In<T> hi,
                                  In<T> w1t, In<T> b1, In<T> w2, In<T> alpha, In<T> beta, T* out) {
  tardis::Operands op;
  op.tokens = tokens;
  op.d = d;
  op.D = D;
  op.x = x.Data();
  op.y_lin = y_lin.Data();
  op.lo = lo.Data();
  op.hi = hi.Data();
  op.w1t = w1t.Data();
  op.b1 = b1.Data();
  op.w2 = w2.Data();
  op.alpha = alpha.Data();
  op.beta = beta.Data();
  op.y = out;
  return op;
}

// The path counters of one fallback run (GuardedFallback or GuardedFallbackNBits).
void CountRun(const tardis::RunInfo& info, tardis::Isa isa) {
  if (info.used_union) g_union_calls.fetch_add(1, std::memory_order_relaxed);
  if (info.path == tardis::Strategy::kNeuron) g_neuron_calls.fetch_add(1, std::memory_order_relaxed);
  if (info.path == tardis::Strategy::kTile || info.path == tardis::Strategy::kPanel)
    g_tile_calls.fetch_add(1, std::memory_order_relaxed);
  if (info.path == tardis::Strategy::kPanel) g_panel_calls.fetch_add(1, std::memory_order_relaxed);
  if (isa == tardis::Isa::kPortable) g_portable_calls.fetch_add(1, std::memory_order_relaxed);
  if (isa == tardis::Isa::kAvx512) g_avx512_calls.fetch_add(1, std::memory_order_relaxed);
  g_flagged_pairs.fetch_add(static_cast<uint64_t>(info.flagged_pairs), std::memory_order_relaxed);
}

template <typename T>
void RunFallback(const tardis::Operands& op, const FallbackConfig& cfg, const tardis::Parallel& par,
                 tardis::RunInfo* info) {
  if constexpr (std::is_same<T, float>::value)
    tardis::RunFloat(op, cfg.gelu, cfg.strategy, cfg.isa, par, info);
  else
    tardis::RunHalf(op, cfg.gelu, cfg.strategy, cfg.isa, par, info);
}

// x's leading axes and d; "" when y_lin has x's shape, else what is wrong.
template <typename T>
std::string CheckActivations(In<T> x, In<T> y_lin) {
  const auto& xs = x.Shape();
  if (xs.empty()) return "x must have rank >= 1 ([..., d]), got a scalar";
  if (y_lin.Shape() != xs) return "y_lin must have the shape of x " + ShapeStr(xs) + ", got " + ShapeStr(y_lin.Shape());
  return "";
}

template <typename T>
struct GuardedFallbackKernel {
  static constexpr const char* kInputs[] = {"x", "y_lin", "h_hat", "lo", "hi", "w1t", "b1", "w2", "alpha", "beta"};
  static constexpr size_t kInputCount = std::size(kInputs);
  static constexpr char kInputTypes[] = "TTTTTTTTTT";

  GuardedFallbackKernel(const OrtApi* api, const OrtKernelInfo* info)
      : cfg_(api, info, kOpName), inputs_(api, info, "ai.tardis::GuardedFallback", kInputs, "all required") {}

  OrtStatusPtr ComputeV2(OrtKernelContext* ctx) {
    g_calls.fetch_add(1, std::memory_order_relaxed);
    return Guarded(kOpName, [&] {
      typename NodeInputs<kInputCount>::Call c;
      inputs_.Read(ctx, &c);
      const In<T> x(*c.at[0]), y_lin(*c.at[1]), h_hat(*c.at[2]), lo(*c.at[3]), hi(*c.at[4]), w1t(*c.at[5]),
          b1(*c.at[6]), w2(*c.at[7]), alpha(*c.at[8]), beta(*c.at[9]);
      Output<T> y(ctx);
      std::string wrong = CheckActivations<T>(x, y_lin);
      if (!wrong.empty()) return Error(wrong);
      const auto& xs = x.Shape();
      const int64_t d = xs.back();
      const std::vector<int64_t> lead(xs.begin(), xs.end() - 1);
      const auto& hs = h_hat.Shape();
      if (hs.size() != xs.size() || !std::equal(lead.begin(), lead.end(), hs.begin()))
        return Error("h_hat must have x's leading axes " + ShapeStr(lead) + " plus [D], got " + ShapeStr(hs) +
                     " (x is " + ShapeStr(xs) + ")");
      const int64_t D = hs.back();
      wrong = CheckFallbackOperands<T>(d, D, "h_hat's last axis", lo, hi, w1t, b1, w2, alpha, beta);
      if (!wrong.empty()) return Error(wrong);
      const int64_t tokens = Rows(xs);
      tardis::Operands op =
          FallbackOperands<T>(tokens, d, D, x, y_lin, lo, hi, w1t, b1, w2, alpha, beta, y.Allocate(xs));
      op.h_hat = h_hat.Data();
      tardis::RunInfo info;
      if (tokens > 0 && d > 0) RunFallback<T>(op, cfg_, OrtParallel(ctx), &info);
      CountRun(info, cfg_.isa);
      return Ort::Status{nullptr};
    }).release();
  }

 private:
  static Ort::Status Error(const std::string& msg) { return OpError(kOpName, msg); }

  FallbackConfig cfg_;
  NodeInputs<kInputCount> inputs_;
};

// The int4 predictor's h_hat for the fused path: x quantized once by the calling thread, tiles of 16
// neurons per range.
class Int4RangePredictor final : public tardis::RangePredictor {
 public:
  Int4RangePredictor(const tardis::NBitsPacked& w, const float* x, int64_t M, const float* bias, tardis::Isa isa)
      : w_(w), acts_(tardis::NBitsQuantize(w, x, M, isa, &big_)), bias_(bias) {}
  int64_t Align() const override { return 16; }
  void Predict(int64_t j0, int64_t j1, float* h) const override {
    tardis::NBitsTiles(w_, acts_, bias_, j0 / 16, (j1 + 15) / 16, h, j1 - j0);
  }

 private:
  const tardis::NBitsPacked& w_;
  std::unique_ptr<uint8_t[]> big_;
  tardis::NBitsActs acts_;
  const float* bias_;
};

// ai.tardis::GuardedFallbackNBits: GuardedFallback whose h_hat is ai.tardis::MatMulNBits(x, B, scales,
// zero_points, bias) (OP_SPEC.md). At a few tokens (float32, tile path) each work item predicts its own
// neurons and adds their corrections in the same pass; otherwise h_hat first, then the fallback.
template <typename T>
struct GuardedFallbackNBitsKernel {
  static constexpr const char* kInputs[] = {"x",  "y_lin", "B",  "scales", "zero_points", "bias", "lo",
                                            "hi", "w1t",   "b1", "w2",     "alpha",       "beta"};
  static constexpr size_t kInputCount = std::size(kInputs);
  static constexpr char kInputTypes[] = "TTuTuTTTTTTTT";

  GuardedFallbackNBitsKernel(const OrtApi* api, const OrtKernelInfo* info)
      : cfg_(api, info, kFusedName), inputs_(api, info, kFusedOp, kInputs, "all required"),
        weights_(api, info, kFusedOp, inputs_.Constant(2) && inputs_.Constant(3) && inputs_.Constant(4)) {}

  OrtStatusPtr ComputeV2(OrtKernelContext* ctx) {
    g_calls.fetch_add(1, std::memory_order_relaxed);
    g_fused_calls.fetch_add(1, std::memory_order_relaxed);
    return Guarded(kFusedOp, [&] {
      typename NodeInputs<kInputCount>::Call c;
      inputs_.Read(ctx, &c);
      const In<T> x(*c.at[0]), y_lin(*c.at[1]), scales(*c.at[3]), bias(*c.at[5]), lo(*c.at[6]), hi(*c.at[7]),
          w1t(*c.at[8]), b1(*c.at[9]), w2(*c.at[10]), alpha(*c.at[11]), beta(*c.at[12]);
      const In<uint8_t> b(*c.at[2]), zero_points(*c.at[4]);
      Output<T> y(ctx);
      std::string wrong = CheckActivations<T>(x, y_lin);
      if (!wrong.empty()) return Error(wrong);
      const auto& xs = x.Shape();
      const int64_t d = xs.back(), D = weights_.N();
      if (d != weights_.K())
        return Error("x must have shape [..., K] with K = " + std::to_string(weights_.K()) + ", got " + ShapeStr(xs));
      wrong = weights_.Check(b, scales, zero_points, bias);
      if (wrong.empty()) wrong = CheckFallbackOperands<T>(d, D, "attribute N", lo, hi, w1t, b1, w2, alpha, beta);
      if (!wrong.empty()) return Error(wrong);
      const int64_t tokens = Rows(xs);
      tardis::Operands op =
          FallbackOperands<T>(tokens, d, D, x, y_lin, lo, hi, w1t, b1, w2, alpha, beta, y.Allocate(xs));
      tardis::RunInfo info;
      if (tokens > 0 && d > 0) {
        const PackedWeights::Ptr packed = weights_.Packed(b.Data(), scales.Data(), zero_points.Data());
        const OrtParallel par(ctx);
        bool fused = false;
        if constexpr (std::is_same<T, float>::value) {
          if (cfg_.strategy == tardis::Strategy::kAuto && tardis::FusedPathApplies(tokens, d, D, cfg_.isa)) {
            const Int4RangePredictor pred(*packed, x.Data(), tokens, bias.Data(), cfg_.isa);
            fused = tardis::RunFloatFused(op, pred, cfg_.gelu, cfg_.isa, par, &info);
          }
        }
        if (fused) {
          g_fused_paths.fetch_add(1, std::memory_order_relaxed);
        } else {
          thread_local std::vector<T> keep;
          std::unique_ptr<T[]> big;
          T* h_hat = tardis::Scratch(keep, static_cast<size_t>(tokens * D), &big);
          NBitsProduct(*packed, x.Data(), tokens, bias.Data(), h_hat, cfg_.isa, par);
          op.h_hat = h_hat;
          RunFallback<T>(op, cfg_, par, &info);
        }
      }
      CountRun(info, cfg_.isa);
      return Ort::Status{nullptr};
    }).release();
  }

 private:
  static Ort::Status Error(const std::string& msg) { return OpError(kFusedOp, msg); }

  FallbackConfig cfg_;
  NodeInputs<kInputCount> inputs_;
  Int4Weights<T> weights_;
};

// Type and shape inference: output 0 has y_lin's element type and shape (x's when y_lin's rank is unknown).
// Installed on both typed ops directly, not as a per-type InferOutputShape: ORT builds ONE schema
// for the same-named float and float16 ops and uses the first op's function for both, so the element type
// must come from the node's inputs, not from the op's template type (onnxruntime 1.21 checks it).
OrtStatusPtr InferTypeAndShape(const OrtCustomOp*, OrtShapeInferContext* ctx) {
  const OrtApi& api = Ort::GetApi();
  for (size_t index : {size_t{1}, size_t{0}}) {
    OrtTensorTypeAndShapeInfo* info = nullptr;
    if (OrtStatus* st = api.ShapeInferContext_GetInputTypeShape(ctx, index, &info)) {
      api.ReleaseStatus(st);
      continue;
    }
    size_t rank = 0;
    OrtStatus* st = api.GetDimensionsCount(info, &rank);
    if (st == nullptr && rank > 0) st = api.ShapeInferContext_SetOutputTypeShape(ctx, 0, info);
    // `info` is owned by the context (the C++ wrapper release()s it too): do not free it.
    if (st != nullptr || rank > 0) return st;
  }
  return nullptr;  // rank unknown: leave the output to the graph's declaration
}

// Output 0: input 0's element type and shape with the last axis n (-1: unknown).
OrtStatusPtr SetLastAxis(OrtShapeInferContext* ctx, int64_t n) {
  const OrtApi& api = Ort::GetApi();
  OrtTensorTypeAndShapeInfo* info = nullptr;
  if (OrtStatus* st = api.ShapeInferContext_GetInputTypeShape(ctx, 0, &info)) {
    api.ReleaseStatus(st);
    return nullptr;
  }
  size_t rank = 0;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  if (OrtStatus* st = api.GetDimensionsCount(info, &rank)) return st;
  if (OrtStatus* st = api.GetTensorElementType(info, &type)) return st;
  if (rank == 0) return nullptr;
  std::vector<int64_t> dims(rank);
  std::vector<const char*> names(rank, "");
  if (OrtStatus* st = api.GetDimensions(info, dims.data(), rank)) return st;
  if (OrtStatus* st = api.GetSymbolicDimensions(info, names.data(), rank)) return st;
  dims[rank - 1] = n;
  names[rank - 1] = "";
  OrtTensorTypeAndShapeInfo* out = nullptr;
  if (OrtStatus* st = api.CreateTensorTypeAndShapeInfo(&out)) return st;
  OrtStatus* st = api.SetTensorElementType(out, type);
  if (st == nullptr) st = api.SetDimensions(out, dims.data(), rank);
  if (st == nullptr) st = api.SetSymbolicDimensions(out, names.data(), rank);
  if (st == nullptr) st = api.ShapeInferContext_SetOutputTypeShape(ctx, 0, out);
  api.ReleaseTensorTypeAndShapeInfo(out);
  return st;
}

// MatMulNBits: A's element type and shape with the last axis N (the attribute).
OrtStatusPtr InferNBits(const OrtCustomOp*, OrtShapeInferContext* ctx) {
  const OrtApi& api = Ort::GetApi();
  const OrtOpAttr* attr = nullptr;
  int64_t n = 0;
  size_t len = 0;
  if (OrtStatus* st = api.ShapeInferContext_GetAttribute(ctx, "N", &attr)) return st;
  if (OrtStatus* st = api.ReadOpAttr(attr, ORT_OP_ATTR_INT, &n, sizeof(n), &len)) return st;
  return SetLastAxis(ctx, n);
}

// DequantizeMatMul: A's element type and shape with the last axis N, B's columns (unknown when B's shape is).
OrtStatusPtr InferDequantizeMatMul(const OrtCustomOp*, OrtShapeInferContext* ctx) {
  const OrtApi& api = Ort::GetApi();
  int64_t n = -1;
  OrtTensorTypeAndShapeInfo* info = nullptr;
  if (OrtStatus* st = api.ShapeInferContext_GetInputTypeShape(ctx, 1, &info)) {
    api.ReleaseStatus(st);
  } else {
    size_t rank = 0;
    if (OrtStatus* st = api.GetDimensionsCount(info, &rank)) return st;
    if (rank == 2) {
      int64_t dims[2];
      if (OrtStatus* st = api.GetDimensions(info, dims, 2)) return st;
      n = dims[1];
    }
  }
  return SetLastAxis(ctx, n);
}

// The ops, kept alive for the process: for each kernel its float and float16 op under one name, with its
// type/shape inference function. Like the registry, the ops are never freed.
struct Registry {
  Ort::CustomOpDomain domain{nullptr};

  template <template <typename> class Kernel>
  void Add(const char* name, OrtStatusPtr (*infer)(const OrtCustomOp*, OrtShapeInferContext*)) {
    OrtCustomOp* f32 = new tardis_ort::Op<Kernel, float>(name);
    OrtCustomOp* f16 = new tardis_ort::Op<Kernel, Ort::Float16_t>(name);
    for (OrtCustomOp* op : {f32, f16}) {
      op->InferOutputShapeFn = infer;
      domain.Add(op);
    }
  }
};

Registry& GetRegistry() {
  static Registry* reg = [] {
    auto* r = new Registry;  // intentionally never freed: sessions may outlive static destruction
    r->domain = Ort::CustomOpDomain(kDomain);
    r->Add<GuardedFallbackKernel>(kOpName, &InferTypeAndShape);
    r->Add<MatMulNBitsKernel>(kNBitsName, &InferNBits);
    r->Add<GuardedFallbackNBitsKernel>(kFusedName, &InferTypeAndShape);
    r->Add<DequantizeMatMulKernel>(kDqmmName, &InferDequantizeMatMul);
    return r;
  }();
  return *reg;
}

std::mutex g_register_mutex;

}  // namespace

TARDIS_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(kRequiredApi);
  if (api == nullptr) {
    const OrtApi* api1 = api_base->GetApi(1);
    std::string msg = std::string("libtardis_ops needs onnxruntime >= 1.21 (ORT API ") + std::to_string(kRequiredApi) +
                      "); this onnxruntime is " + api_base->GetVersionString();
    return api1 != nullptr ? api1->CreateStatus(ORT_FAIL, msg.c_str()) : nullptr;
  }
  std::lock_guard<std::mutex> lock(g_register_mutex);
  Ort::InitApi(api);
  try {
    Registry& reg = GetRegistry();
    Ort::UnownedSessionOptions(options).Add(reg.domain);
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, (std::string("libtardis_ops: registration failed: ") + e.what()).c_str());
  }
  return nullptr;
}

// Number of fallback kernel invocations (GuardedFallback and GuardedFallbackNBits) in this process (all sessions).
TARDIS_EXPORT uint64_t TardisOpsKernelCalls() { return g_calls.load(); }
// Invocations that took the union-gather (matrix-product) strategy.
TARDIS_EXPORT uint64_t TardisOpsUnionCalls() { return g_union_calls.load(); }
// Invocations that took the neuron-major (prefill, per-token flags) strategy.
TARDIS_EXPORT uint64_t TardisOpsNeuronCalls() { return g_neuron_calls.load(); }
// Invocations that took the tile strategy (AVX-512: token-major in L2-sized neuron blocks).
TARDIS_EXPORT uint64_t TardisOpsTileCalls() { return g_tile_calls.load(); }
// Of those, the invocations that walked the neuron blocks in column panels (large d x tokens).
TARDIS_EXPORT uint64_t TardisOpsPanelCalls() { return g_panel_calls.load(); }
// Invocations that ran the portable (non-AVX2) code.
TARDIS_EXPORT uint64_t TardisOpsPortableCalls() { return g_portable_calls.load(); }
// Invocations that ran with the AVX-512 block kernels.
TARDIS_EXPORT uint64_t TardisOpsAvx512Calls() { return g_avx512_calls.load(); }
// Sum over invocations of the flagged (token, neuron) pairs.
TARDIS_EXPORT uint64_t TardisOpsFlaggedPairs() { return g_flagged_pairs.load(); }
// Number of ai.tardis::GuardedFallbackNBits kernel invocations in this process.
TARDIS_EXPORT uint64_t TardisOpsFusedCalls() { return g_fused_calls.load(); }
// Of those, the invocations that predicted inside the fallback's work items (few tokens, float32).
TARDIS_EXPORT uint64_t TardisOpsFusedPaths() { return g_fused_paths.load(); }
// Number of ai.tardis::MatMulNBits kernel invocations in this process.
TARDIS_EXPORT uint64_t TardisOpsNBitsCalls() { return g_nbits_calls.load(); }
// Number of ai.tardis::DequantizeMatMul kernel invocations in this process.
TARDIS_EXPORT uint64_t TardisOpsDequantizeMatMulCalls() { return g_dqmm_calls.load(); }
// The instruction set ai.tardis::MatMulNBits and DequantizeMatMul use here: 2 = AVX-512 VNNI, 1 = AVX2, 0 = portable.
TARDIS_EXPORT int TardisOpsNBitsLevel() { return tardis::NBitsLevel(IsaFromEnv()); }
// 1 when the AVX2/FMA/F16C path is available on this CPU.
TARDIS_EXPORT int TardisOpsCpuHasAvx2() { return tardis::CpuHasAvx2() ? 1 : 0; }
// 1 when the CPU also has AVX-512F (block kernels of the neuron path).
TARDIS_EXPORT int TardisOpsCpuHasAvx512() { return tardis::CpuHasAvx512() ? 1 : 0; }
// ORT API version the library was built against.
TARDIS_EXPORT int TardisOpsOrtApiVersion() { return ORT_API_VERSION; }
