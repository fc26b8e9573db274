// The op's schema, defined once for every backend (kernels: cpu/, cuda/).
//
//   recurrence(x, W, b, h0, lengths, nonlinearity) -> (output, h_n)
//   recurrence_backward(grad_output, grad_h_n, output, W, h0, lengths, nonlinearity)
//       -> (grad_x, grad_W, grad_b, grad_h0)
//
// The backward is its own op so that autograd (registered in Python) and
// torch.compile see one opaque call per direction. It needs only the forward's
// output (h_t for every step) and h0: see activation.h.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing nnrnn_fused._C runs the static registrations below; the module
// itself has no Python functions.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(nnrnn_fused, m) {
  m.def(
      "recurrence(Tensor x, Tensor W, Tensor? b, Tensor? h0, Tensor? lengths, str nonlinearity)"
      " -> (Tensor output, Tensor h_n)");
  m.def(
      "recurrence_backward(Tensor grad_output, Tensor grad_h_n, Tensor output, Tensor W,"
      " Tensor? h0, Tensor? lengths, str nonlinearity)"
      " -> (Tensor grad_x, Tensor grad_W, Tensor grad_b, Tensor grad_h0)");
}
