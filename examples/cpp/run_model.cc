// run_model: deploy a tardis-compile model from C++. ONNX Runtime's C++ API, the op library registered with
// one call, inputs and outputs as raw little-endian files (what a serving pipeline would hand over).
//
//   run_model MODEL.onnx OUT_PREFIX [--library libtardis_ops.so] [--threads N] NAME=FILE:D0xD1x... ...
//
// Each input is read from FILE with the shape given and the element type the model declares (float32,
// float16, int64, int32); each output is written to OUT_PREFIX.<output name>.bin (characters other than
// letters, digits, '.', '_' and '-' replaced by '_'; two names that map to one file get the output's index
// too) and listed on stdout as "output <name> <d0>x<d1>...". Unknown options, names the model does not take,
// and output types the example cannot write are refused before the run.
// Without --library the model still runs: ORT inlines the ONNX function bodies of the ai.tardis ops. With it,
// "tardis kernel calls <n>", "tardis nbits calls <n>" and "tardis fused calls <n>" report how often the compiled
// fallback kernels (GuardedFallback or GuardedFallbackNBits), MatMulNBits and GuardedFallbackNBits ran in this
// process (the library's TardisOpsKernelCalls / TardisOpsNBitsCalls / TardisOpsFusedCalls probes).
#include <dlfcn.h>

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <stdexcept>
#include <string>
#include <vector>

#include "onnxruntime_cxx_api.h"

namespace {

struct InputSpec {
  std::string name, file;
  std::vector<int64_t> shape;
};

// A whole decimal number at least `low`, or an error naming `what`.
int64_t ParseInt(const std::string& text, int64_t low, const std::string& what) {
  size_t used = 0;
  int64_t value = 0;
  try {
    value = std::stoll(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (text.empty() || used != text.size() || value < low)
    throw std::runtime_error(what + ": '" + text + "' is not a whole number >= " + std::to_string(low));
  return value;
}

InputSpec ParseInput(const std::string& arg) {
  const size_t eq = arg.find('='), colon = arg.rfind(':');
  if (eq == std::string::npos || colon == std::string::npos || colon < eq)
    throw std::runtime_error("input '" + arg + "' is not NAME=FILE:D0xD1x...");
  InputSpec spec{arg.substr(0, eq), arg.substr(eq + 1, colon - eq - 1), {}};
  const std::string dims = arg.substr(colon + 1) + "x";  // every dimension ends with 'x': "2x3x" has an empty one
  for (size_t start = 0, end; (end = dims.find('x', start)) != std::string::npos; start = end + 1)
    spec.shape.push_back(ParseInt(dims.substr(start, end - start), 0, "input '" + arg + "'"));
  return spec;
}

// An output name as a file name part: path separators and other odd characters become '_'.
std::string FileSafe(const std::string& name) {
  std::string out(name);
  for (char& c : out)
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '_' && c != '-') c = '_';
  return out;
}

size_t ElementSize(ONNXTensorElementDataType type) {
  switch (type) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32:
      return 4;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16:
      return 2;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64:
      return 8;
    default:
      throw std::runtime_error("element type " + std::to_string(type) + " is not supported by this example");
  }
}

std::vector<char> ReadFile(const std::string& path, size_t expect) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  const std::streamoff end = in ? static_cast<std::streamoff>(in.tellg()) : -1;
  if (end < 0) throw std::runtime_error("cannot read '" + path + "'");  // missing, or not a regular file
  const size_t size = static_cast<size_t>(end);
  if (size != expect)
    throw std::runtime_error("'" + path + "' holds " + std::to_string(size) + " bytes, the shape needs " +
                             std::to_string(expect));
  std::vector<char> data(size);
  in.seekg(0);
  in.read(data.data(), static_cast<std::streamsize>(size));
  return data;
}

// A counter of the library in this process (the same file ORT loaded; RTLD_NOLOAD finds it), -1 if absent.
long long Probe(const std::string& library, const char* symbol) {
  void* handle = dlopen(library.c_str(), RTLD_NOW | RTLD_NOLOAD);
  if (!handle) return -1;
  auto* calls = reinterpret_cast<uint64_t (*)()>(dlsym(handle, symbol));
  const long long n = calls ? static_cast<long long>(calls()) : -1;
  dlclose(handle);
  return n;
}

int Run(int argc, char** argv) {
  if (argc < 3) {
    std::cerr << "usage: run_model MODEL.onnx OUT_PREFIX [--library LIB] [--threads N] NAME=FILE:D0xD1x...\n";
    return 2;
  }
  const std::string model = argv[1], prefix = argv[2];
  std::string library;
  int threads = 1;
  std::vector<InputSpec> specs;
  for (int i = 3; i < argc; ++i) {
    const std::string arg = argv[i];
    if ((arg == "--library" || arg == "--threads") && i + 1 >= argc) {
      throw std::runtime_error(arg + " needs a value");
    } else if (arg == "--library") {
      library = argv[++i];
    } else if (arg == "--threads") {
      threads = static_cast<int>(ParseInt(argv[++i], 1, "--threads"));
    } else if (arg.rfind("--", 0) == 0) {
      throw std::runtime_error("unknown option '" + arg + "' (options: --library LIB, --threads N)");
    } else {
      specs.push_back(ParseInput(arg));
    }
  }

  Ort::Env env(ORT_LOGGING_LEVEL_WARNING, "run_model");
  Ort::SessionOptions options;
  options.SetIntraOpNumThreads(threads);
  if (!library.empty()) options.RegisterCustomOpsLibrary(library.c_str());  // the one call deployment needs
  Ort::Session session(env, model.c_str(), options);

  Ort::AllocatorWithDefaultOptions allocator;
  Ort::MemoryInfo cpu = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  std::vector<std::string> in_names;
  std::vector<std::vector<char>> buffers;
  std::vector<Ort::Value> in_values;
  for (size_t i = 0; i < session.GetInputCount(); ++i) {
    const std::string name = session.GetInputNameAllocated(i, allocator).get();
    const InputSpec* spec = nullptr;
    for (const auto& s : specs)
      if (s.name == name) spec = &s;
    if (!spec) throw std::runtime_error("no file given for model input '" + name + "'");
    const auto type = session.GetInputTypeInfo(i).GetTensorTypeAndShapeInfo().GetElementType();
    size_t count = 1;
    for (int64_t dim : spec->shape) count *= static_cast<size_t>(dim);
    buffers.push_back(ReadFile(spec->file, count * ElementSize(type)));
    in_values.push_back(Ort::Value::CreateTensor(cpu, buffers.back().data(), buffers.back().size(),
                                                 spec->shape.data(), spec->shape.size(), type));
    in_names.push_back(name);
  }
  for (const auto& s : specs)
    if (std::find(in_names.begin(), in_names.end(), s.name) == in_names.end())
      throw std::runtime_error("'" + s.name + "' is not an input of the model");
  std::vector<std::string> out_names, files;
  for (size_t i = 0; i < session.GetOutputCount(); ++i) {
    out_names.push_back(session.GetOutputNameAllocated(i, allocator).get());
    ElementSize(session.GetOutputTypeInfo(i).GetTensorTypeAndShapeInfo().GetElementType());  // before the run
    files.push_back(prefix + "." + FileSafe(out_names.back()) + ".bin");
    if (std::count(files.begin(), files.end(), files.back()) > 1)  // e.g. "a/b" and "a:b"
      files.back() = prefix + "." + FileSafe(out_names.back()) + "." + std::to_string(i) + ".bin";
  }
  std::vector<const char*> in_ptrs, out_ptrs;
  for (const auto& n : in_names) in_ptrs.push_back(n.c_str());
  for (const auto& n : out_names) out_ptrs.push_back(n.c_str());

  auto outputs = session.Run(Ort::RunOptions{nullptr}, in_ptrs.data(), in_values.data(), in_values.size(),
                             out_ptrs.data(), out_ptrs.size());
  for (size_t i = 0; i < outputs.size(); ++i) {
    const auto info = outputs[i].GetTensorTypeAndShapeInfo();
    const size_t bytes = info.GetElementCount() * ElementSize(info.GetElementType());
    const std::string& path = files[i];
    std::ofstream out(path, std::ios::binary);
    out.write(static_cast<const char*>(outputs[i].GetTensorRawData()), static_cast<std::streamsize>(bytes));
    if (!out) throw std::runtime_error("cannot write '" + path + "'");
    std::cout << "output " << out_names[i] << " ";
    const auto shape = info.GetShape();
    for (size_t k = 0; k < shape.size(); ++k) std::cout << (k ? "x" : "") << shape[k];
    std::cout << "\n";
  }
  if (!library.empty()) {
    std::cout << "tardis kernel calls " << Probe(library, "TardisOpsKernelCalls") << "\n";
    std::cout << "tardis nbits calls " << Probe(library, "TardisOpsNBitsCalls") << "\n";
    std::cout << "tardis fused calls " << Probe(library, "TardisOpsFusedCalls") << "\n";
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return Run(argc, argv);
  } catch (const std::exception& e) {  // Ort::Exception included: one line naming the problem
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
}
