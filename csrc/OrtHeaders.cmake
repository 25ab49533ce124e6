# ORT_INCLUDE_DIR: the ONNX Runtime C/C++ API headers (API version 21), for csrc/ and examples/cpp/.
# Default, as for the package build: $TARDIS_ORT_INCLUDE, else the checkout's third_party/onnxruntime/include
# (scripts/fetch_ort_headers); -DORT_INCLUDE_DIR=<dir> overrides both.
if(DEFINED ENV{TARDIS_ORT_INCLUDE} AND NOT "$ENV{TARDIS_ORT_INCLUDE}" STREQUAL "")
  set(_ort_default "$ENV{TARDIS_ORT_INCLUDE}")
else()
  set(_ort_default "${CMAKE_CURRENT_LIST_DIR}/../third_party/onnxruntime/include")
endif()
set(ORT_INCLUDE_DIR "${_ort_default}" CACHE PATH "Directory holding onnxruntime_c_api.h and onnxruntime_cxx_api.h")
if(NOT ORT_INCLUDE_DIR OR NOT EXISTS "${ORT_INCLUDE_DIR}/onnxruntime_cxx_api.h")
  message(FATAL_ERROR "ORT_INCLUDE_DIR='${ORT_INCLUDE_DIR}' does not hold the ONNX Runtime API headers; "
                      "run scripts/fetch_ort_headers, or pass -DORT_INCLUDE_DIR=<dir> (or set TARDIS_ORT_INCLUDE)")
endif()
