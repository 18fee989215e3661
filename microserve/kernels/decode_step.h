// A whole decode step of a Llama-family model (decode_step.cpp).
#pragma once

#include <torch/extension.h>

void bind_decode_step(pybind11::module& m);
