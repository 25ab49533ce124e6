// How the ai.tardis kernels meet ONNX Runtime's custom-op C API: the op descriptions ORT registers, and the
// kernels' view of their inputs and output.
//
// Why not ORT's "lite" custom-op API, which these ops used first: it wraps every input of every call in a
// heap-allocated tensor object and asks ORT for its shape (a type-and-shape object, two dimension queries, a
// vector), about 0.5 µs per input on our development machine. At the fallback's 10 and the fused op's 13
// inputs that was 5-7 µs per call, a sixth of a whole 384×1536 block at one token. Here the constant
// initializers (all the weights, as tardis-compile writes them) are looked up once, when the kernel is
// created, and only the activations (x, y_lin, h_hat) are read per call.
#pragma once

#ifndef ORT_API_MANUAL_INIT
#define ORT_API_MANUAL_INIT
#endif
#include "onnxruntime_cxx_api.h"

#include <array>
#include <cstdint>
#include <exception>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

namespace tardis_ort {

// One input tensor as a kernel reads it: its elements and shape.
struct TensorView {
  const void* data = nullptr;
  std::vector<int64_t> shape;
};

// Typed access to a TensorView (a reference: the view must outlive it).
template <typename U>
class In {
 public:
  explicit In(const TensorView& view) : view_(&view) {}
  const U* Data() const { return static_cast<const U*>(view_->data); }
  const std::vector<int64_t>& Shape() const { return view_->shape; }

 private:
  const TensorView* view_;
};

// Fills `view` from a tensor OrtValue.
inline void ReadTensor(const OrtValue* value, TensorView* view) {
  const OrtApi& api = Ort::GetApi();
  OrtTensorTypeAndShapeInfo* raw = nullptr;
  Ort::ThrowOnError(api.GetTensorTypeAndShape(value, &raw));
  std::unique_ptr<OrtTensorTypeAndShapeInfo, void (*)(OrtTensorTypeAndShapeInfo*)> info(
      raw, [](OrtTensorTypeAndShapeInfo* p) { Ort::GetApi().ReleaseTensorTypeAndShapeInfo(p); });
  size_t rank = 0;
  Ort::ThrowOnError(api.GetDimensionsCount(info.get(), &rank));
  view->shape.resize(rank);
  Ort::ThrowOnError(api.GetDimensions(info.get(), view->shape.data(), rank));
  void* data = nullptr;
  Ort::ThrowOnError(api.GetTensorMutableData(const_cast<OrtValue*>(value), &data));
  view->data = data;
}

// The N inputs of one node. A constant initializer's OrtValue belongs to the session and outlives the kernel,
// so its view is taken once, here; the other inputs are read per call into a Call, which lives on the
// calling thread's stack (a session may run the same kernel from several threads at once).
// Every input of `names` must be present and non-empty, and no more: a node with an omitted one ("" in the
// node) is refused when the session is created, naming the op (`op`) and the input; `note` says what the
// op leaves out of a related op's inputs.
template <size_t N>
class NodeInputs {
 public:
  struct Call {
    std::array<TensorView, N> read;
    std::array<const TensorView*, N> at{};
  };

  NodeInputs(const OrtApi* api, const OrtKernelInfo* info, const char* op, const char* const (&names)[N],
             const char* note) {
    Require(api, info, op, names, note);
    for (size_t index = 0; index < N; ++index) {
      int is_constant = 0;
      const OrtValue* value = nullptr;
      if (OrtStatus* st = api->KernelInfoGetConstantInput_tensor(info, index, &is_constant, &value)) {
        api->ReleaseStatus(st);
        is_constant = 0;
      }
      constant_[index] = is_constant != 0 && value != nullptr;
      if (constant_[index]) ReadTensor(value, &kept_[index]);
    }
  }

  bool Constant(size_t index) const { return constant_[index]; }

  // This call's views: the kept ones for constants, the others read from `ctx` into `call`.
  void Read(OrtKernelContext* ctx, Call* call) const {
    const OrtApi& api = Ort::GetApi();
    for (size_t index = 0; index < N; ++index) {
      if (constant_[index]) {
        call->at[index] = &kept_[index];
        continue;
      }
      const OrtValue* value = nullptr;
      Ort::ThrowOnError(api.KernelContext_GetInput(ctx, index, &value));
      ReadTensor(value, &call->read[index]);
      call->at[index] = &call->read[index];
    }
  }

 private:
  static void Require(const OrtApi* api, const OrtKernelInfo* info, const char* op, const char* const (&names)[N],
                      const char* note) {
    size_t count = 0;
    Ort::ThrowOnError(api->KernelInfo_GetInputCount(info, &count));
    for (size_t index = 0; index < N; ++index) {
      size_t size = 0;
      if (index < count) Ort::ThrowOnError(api->KernelInfo_GetInputName(info, index, nullptr, &size));
      if (index >= count || size <= 1)
        ORT_CXX_API_THROW(std::string(op) + ": input " + std::to_string(index) + " (" + names[index] +
                              ") is required; the node has " + std::to_string(count) + " input(s)" +
                              (index < count ? " and this one is empty" : ""),
                          ORT_INVALID_ARGUMENT);
    }
    if (count != N) {
      std::string list;
      for (size_t index = 0; index < N; ++index) list += (index ? ", " : "") + std::string(names[index]);
      ORT_CXX_API_THROW(std::string(op) + ": takes " + std::to_string(N) + " inputs (" + list + "; " + note +
                            "), got " + std::to_string(count),
                        ORT_INVALID_ARGUMENT);
    }
  }

  std::array<bool, N> constant_{};
  std::array<TensorView, N> kept_;
};

// Output 0 of a call, allocated by ORT with the shape the kernel gives.
template <typename T>
class Output {
 public:
  explicit Output(OrtKernelContext* ctx) : ctx_(ctx) {}
  T* Allocate(const std::vector<int64_t>& shape) {
    const OrtApi& api = Ort::GetApi();
    OrtValue* value = nullptr;
    Ort::ThrowOnError(api.KernelContext_GetOutput(ctx_, 0, shape.data(), shape.size(), &value));
    void* data = nullptr;
    Ort::ThrowOnError(api.GetTensorMutableData(value, &data));
    return static_cast<T*>(data);
  }

 private:
  OrtKernelContext* ctx_;
};

template <typename T>
constexpr ONNXTensorElementDataType kElementType = std::is_same<T, float>::value
                                                       ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT
                                                       : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;

// The op ORT registers for Kernel<T> (T = float or Ort::Float16_t) on the CPU execution provider. Kernel<T>
// provides kInputCount, kInputTypes (a character per input: 'T' for T, 'u' for uint8, 'i' for int8), a constructor
// (api, info) that may throw (the error then fails session creation, naming the problem) and
// `OrtStatusPtr ComputeV2(OrtKernelContext*)`. One output, of type T.
template <template <typename> class Kernel, typename T>
struct Op : Ort::CustomOpBase<Op<Kernel, T>, Kernel<T>, true> {
  explicit Op(const char* name) : name_(name) {}

  const char* GetName() const { return name_; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return Kernel<T>::kInputCount; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    static_assert(sizeof(Kernel<T>::kInputTypes) == Kernel<T>::kInputCount + 1, "one type per input");
    switch (Kernel<T>::kInputTypes[index]) {
      case 'u':
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
      case 'i':
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
      default:
        return kElementType<T>;
    }
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return kElementType<T>; }
  // Optional for ORT's graph checks (as the lite API declared them), so that a node with an omitted input
  // reaches NodeInputs, whose error names the op and the input, not ORT's "input 3 is marked single".
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t) const { return INPUT_OUTPUT_OPTIONAL; }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t) const { return INPUT_OUTPUT_OPTIONAL; }

  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    try {
      *kernel = new Kernel<T>(&api, info);
      return nullptr;
    } catch (const Ort::Exception& e) {
      return api.CreateStatus(e.GetOrtErrorCode(), e.what());
    } catch (const std::exception& e) {
      return api.CreateStatus(ORT_FAIL, (std::string(name_) + ": " + e.what()).c_str());
    }
  }

 private:
  const char* name_;
};

}  // namespace tardis_ort
