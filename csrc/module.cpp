// The Python module sparse_kernels._C.  Importing it runs the static
// TORCH_LIBRARY_IMPL registrations of every kernel file linked into it; the op
// schemas themselves are defined once, in Python (sparse_kernels/ops/).
#include <pybind11/pybind11.h>
#include <torch/version.h>

#ifndef SK_WITH_CUDA
#define SK_WITH_CUDA 0
#endif

#define SK_STR2(x) #x
#define SK_STR(x) SK_STR2(x)

PYBIND11_MODULE(_C, m) {
  m.doc() = "sparse_kernels compiled kernels (CPU C++ and, when built, CUDA)";
  m.attr("torch_version") =
      SK_STR(TORCH_VERSION_MAJOR) "." SK_STR(TORCH_VERSION_MINOR) "." SK_STR(TORCH_VERSION_PATCH);
  m.attr("with_cuda") = static_cast<bool>(SK_WITH_CUDA);
#ifdef _OPENMP
  m.attr("with_openmp") = true;  // at::parallel_for in the CPU kernels runs on torch's threads
#else
  m.attr("with_openmp") = false;  // ... or compiles to a serial loop
#endif
}
