// libtardis_ops: ONNX Runtime custom-op library with ai.tardis::GuardedFallback (OP_SPEC.md).
//
// Built against the ORT C API version 21 headers, WITHOUT linking libonnxruntime: the API table is taken
// from the OrtApiBase that ORT passes to RegisterCustomOps, so one build loads into onnxruntime
// 1.21 ... current. Uses ORT's "lite" custom-op API (one struct per element type, both registered
// under the same op name; ORT merges them into one schema with type constraints).
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
#include "onnxruntime_lite_custom_op.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#include "gf_kernel.h"

#define TARDIS_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

constexpr const char* kDomain = "ai.tardis";
constexpr const char* kOpName = "GuardedFallback";
constexpr int kRequiredApi = 21;

std::atomic<uint64_t> g_calls{0};
std::atomic<uint64_t> g_union_calls{0};
std::atomic<uint64_t> g_neuron_calls{0};
std::atomic<uint64_t> g_tile_calls{0};
std::atomic<uint64_t> g_portable_calls{0};
std::atomic<uint64_t> g_avx512_calls{0};
std::atomic<uint64_t> g_flagged_pairs{0};

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

class OrtParallel final : public tardis::Parallel {
 public:
  explicit OrtParallel(OrtKernelContext* ctx) : ctx_(ctx) {}
  void For(size_t n, void (*fn)(void*, size_t), void* data) const override { ctx_.ParallelFor(fn, n, 0, data); }

 private:
  Ort::KernelContext ctx_;
};

template <typename T>
using In = const Ort::Custom::Tensor<T>&;

template <typename T>
struct GuardedFallbackKernel {
  GuardedFallbackKernel(const OrtApi* api, const OrtKernelInfo* info) {
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
      gelu_ = tardis::GeluKind::kErf;
    } else if (approx == "tanh") {
      gelu_ = tardis::GeluKind::kTanh;
    } else {
      ORT_CXX_API_THROW("GuardedFallback: attribute 'approximate' must be \"none\" or \"tanh\", got \"" + approx + "\"",
                        ORT_INVALID_ARGUMENT);
    }
    const char* isa = std::getenv("TARDIS_OPS_ISA");
    const bool no512 = isa != nullptr && std::strcmp(isa, "avx2") == 0;
    if (EnvFlag("TARDIS_OPS_FORCE_PORTABLE") || (isa != nullptr && std::strcmp(isa, "portable") == 0))
      isa_ = tardis::Isa::kPortable;
    else if (!no512 && tardis::CpuHasAvx512())
      isa_ = tardis::Isa::kAvx512;
    else if (tardis::CpuHasAvx2())
      isa_ = tardis::Isa::kAvx2;
    const char* s = std::getenv("TARDIS_OPS_STRATEGY");
    if (s != nullptr && std::strcmp(s, "token") == 0) strategy_ = tardis::Strategy::kToken;
    if (s != nullptr && std::strcmp(s, "union") == 0) strategy_ = tardis::Strategy::kUnion;
    if (s != nullptr && std::strcmp(s, "neuron") == 0) strategy_ = tardis::Strategy::kNeuron;
    if (s != nullptr && std::strcmp(s, "tile") == 0) strategy_ = tardis::Strategy::kTile;
  }

  Ort::Status Compute(OrtKernelContext* ctx, In<T> x, In<T> y_lin, In<T> h_hat, In<T> lo, In<T> hi, In<T> w1t,
                      In<T> b1, In<T> w2, In<T> alpha, In<T> beta, Ort::Custom::Tensor<T>& y) {
    g_calls.fetch_add(1, std::memory_order_relaxed);
    try {
      const auto& xs = x.Shape();
      if (xs.empty()) return Error("x must have rank >= 1 ([..., d]), got a scalar");
      const int64_t d = xs.back();
      const std::vector<int64_t> lead(xs.begin(), xs.end() - 1);
      if (y_lin.Shape() != xs)
        return Error("y_lin must have the shape of x " + ShapeStr(xs) + ", got " + ShapeStr(y_lin.Shape()));
      const auto& hs = h_hat.Shape();
      if (hs.size() != xs.size() || !std::equal(lead.begin(), lead.end(), hs.begin()))
        return Error("h_hat must have x's leading axes " + ShapeStr(lead) + " plus [D], got " + ShapeStr(hs) +
                     " (x is " + ShapeStr(xs) + ")");
      const int64_t D = hs.back();
      const std::vector<int64_t> vecD{D}, matDd{D, d};
      const char* vec_names[] = {"lo", "hi", "b1", "alpha", "beta"};
      const Ort::Custom::Tensor<T>* vecs[] = {&lo, &hi, &b1, &alpha, &beta};
      for (int i = 0; i < 5; ++i)
        if (vecs[i]->Shape() != vecD)
          return Error(std::string(vec_names[i]) + " must have shape [D] = " + ShapeStr(vecD) +
                       " (D from h_hat's last axis), got " + ShapeStr(vecs[i]->Shape()));
      if (w1t.Shape() != matDd)
        return Error("w1t must have shape [D, d] = " + ShapeStr(matDd) +
                     " (neuron-major W1^T; D from h_hat, d from x), got " + ShapeStr(w1t.Shape()));
      if (w2.Shape() != matDd)
        return Error("w2 must have shape [D, d] = " + ShapeStr(matDd) + " (D from h_hat, d from x), got " +
                     ShapeStr(w2.Shape()));

      int64_t tokens = 1;
      for (int64_t v : lead) tokens *= v;
      T* out = y.Allocate(xs);
      tardis::Operands op;
      op.tokens = tokens;
      op.d = d;
      op.D = D;
      op.x = x.Data();
      op.y_lin = y_lin.Data();
      op.h_hat = h_hat.Data();
      op.lo = lo.Data();
      op.hi = hi.Data();
      op.w1t = w1t.Data();
      op.b1 = b1.Data();
      op.w2 = w2.Data();
      op.alpha = alpha.Data();
      op.beta = beta.Data();
      op.y = out;
      if (tokens == 0 || d == 0) return Ort::Status{nullptr};
      OrtParallel par(ctx);
      tardis::RunInfo info;
      if constexpr (std::is_same<T, float>::value)
        tardis::RunFloat(op, gelu_, strategy_, isa_, par, &info);
      else
        tardis::RunHalf(op, gelu_, strategy_, isa_, par, &info);
      if (info.used_union) g_union_calls.fetch_add(1, std::memory_order_relaxed);
      if (info.path == tardis::Strategy::kNeuron) g_neuron_calls.fetch_add(1, std::memory_order_relaxed);
      if (info.path == tardis::Strategy::kTile) g_tile_calls.fetch_add(1, std::memory_order_relaxed);
      if (isa_ == tardis::Isa::kPortable) g_portable_calls.fetch_add(1, std::memory_order_relaxed);
      if (isa_ == tardis::Isa::kAvx512) g_avx512_calls.fetch_add(1, std::memory_order_relaxed);
      g_flagged_pairs.fetch_add(static_cast<uint64_t>(info.flagged_pairs), std::memory_order_relaxed);
      return Ort::Status{nullptr};
    } catch (const Ort::Exception& e) {
      return Ort::Status(e);
    } catch (const std::exception& e) {
      return Error(std::string("internal error: ") + e.what(), ORT_RUNTIME_EXCEPTION);
    }
  }

 private:
  static Ort::Status Error(const std::string& msg, OrtErrorCode code = ORT_INVALID_ARGUMENT) {
    return Ort::Status(("GuardedFallback: " + msg).c_str(), code);
  }

  tardis::GeluKind gelu_ = tardis::GeluKind::kErf;
  tardis::Isa isa_ = tardis::Isa::kPortable;
  tardis::Strategy strategy_ = tardis::Strategy::kAuto;
};

// Type and shape inference: output 0 has y_lin's element type and shape (x's when y_lin's rank is unknown).
// Installed on both typed ops directly instead of the lite API's InferOutputShape: ORT builds ONE schema
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

struct Registry {
  std::unique_ptr<OrtCustomOp> op_float;
  std::unique_ptr<OrtCustomOp> op_half;
  Ort::CustomOpDomain domain{nullptr};
};

Registry& GetRegistry() {
  static Registry* reg = [] {
    auto* r = new Registry;  // intentionally never freed: sessions may outlive static destruction
    r->op_float.reset(Ort::Custom::CreateLiteCustomOp<GuardedFallbackKernel<float>>(kOpName, "CPUExecutionProvider"));
    r->op_half.reset(
        Ort::Custom::CreateLiteCustomOp<GuardedFallbackKernel<Ort::Float16_t>>(kOpName, "CPUExecutionProvider"));
    r->op_float->InferOutputShapeFn = &InferTypeAndShape;
    r->op_half->InferOutputShapeFn = &InferTypeAndShape;
    r->domain = Ort::CustomOpDomain(kDomain);
    r->domain.Add(r->op_float.get());
    r->domain.Add(r->op_half.get());
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

// Number of GuardedFallback kernel invocations in this process (all sessions).
TARDIS_EXPORT uint64_t TardisOpsKernelCalls() { return g_calls.load(); }
// Invocations that took the union-gather (matrix-product) strategy.
TARDIS_EXPORT uint64_t TardisOpsUnionCalls() { return g_union_calls.load(); }
// Invocations that took the neuron-major (prefill, per-token flags) strategy.
TARDIS_EXPORT uint64_t TardisOpsNeuronCalls() { return g_neuron_calls.load(); }
// Invocations that took the tile strategy (AVX-512: token-major in L2-sized neuron blocks).
TARDIS_EXPORT uint64_t TardisOpsTileCalls() { return g_tile_calls.load(); }
// Invocations that ran the portable (non-AVX2) code.
TARDIS_EXPORT uint64_t TardisOpsPortableCalls() { return g_portable_calls.load(); }
// Invocations that ran with the AVX-512 block kernels.
TARDIS_EXPORT uint64_t TardisOpsAvx512Calls() { return g_avx512_calls.load(); }
// Sum over invocations of the flagged (token, neuron) pairs.
TARDIS_EXPORT uint64_t TardisOpsFlaggedPairs() { return g_flagged_pairs.load(); }
// 1 when the AVX2/FMA/F16C path is available on this CPU.
TARDIS_EXPORT int TardisOpsCpuHasAvx2() { return tardis::CpuHasAvx2() ? 1 : 0; }
// 1 when the CPU also has AVX-512F (block kernels of the neuron path).
TARDIS_EXPORT int TardisOpsCpuHasAvx512() { return tardis::CpuHasAvx512() ? 1 : 0; }
// ORT API version the library was built against.
TARDIS_EXPORT int TardisOpsOrtApiVersion() { return ORT_API_VERSION; }
