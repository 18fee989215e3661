// The Python module: microserve.kernels.load() returns it.
#include "decode_step.h"
#include "quant_linear.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("repack", &repack, "GGUF blocks to the kernels' layout");
  m.def("stack", &stack, "row blocks in different formats as one weight");
  m.def("dequantize", &dequantize, "repacked weight rows to float32");
  m.def("dequantize_bf16", &dequantize_bf16, "the repacked weight to bfloat16");
  m.def("linear", &linear, "y = x W^T (+ bias) on a repacked GGUF-format weight");
  m.def("simd", &simd, "instruction set the kernels were built for");
  bind_decode_step(m);
}
