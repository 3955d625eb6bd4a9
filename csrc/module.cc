// jaxembed.kernels._native: a CPython module that hands jaxembed the FFI handlers, as
// PyCapsules for jax.ffi.register_ffi_target, and says which instruction set runs them.

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "common.h"

extern "C" {
XLA_FFI_Error* jaxembed_bag_sum(XLA_FFI_CallFrame*);
XLA_FFI_Error* jaxembed_bag_max(XLA_FFI_CallFrame*);
XLA_FFI_Error* jaxembed_gather(XLA_FFI_CallFrame*);
XLA_FFI_Error* jaxembed_argsort(XLA_FFI_CallFrame*);
XLA_FFI_Error* jaxembed_bucket(XLA_FFI_CallFrame*);
XLA_FFI_Error* jaxembed_evict(XLA_FFI_CallFrame*);
XLA_FFI_Error* jaxembed_remap(XLA_FFI_CallFrame*);
XLA_FFI_Error* jaxembed_search(XLA_FFI_CallFrame*);
XLA_FFI_Error* jaxembed_sparse_update(XLA_FFI_CallFrame*);
XLA_FFI_Error* jaxembed_window(XLA_FFI_CallFrame*);
}

namespace {

PyObject* registrations(PyObject*, PyObject*) {
  struct Entry {
    const char* name;
    void* fn;
  };
  const Entry entries[] = {
      {"jaxembed_bag_sum", reinterpret_cast<void*>(&jaxembed_bag_sum)},
      {"jaxembed_bag_max", reinterpret_cast<void*>(&jaxembed_bag_max)},
      {"jaxembed_gather", reinterpret_cast<void*>(&jaxembed_gather)},
      {"jaxembed_argsort", reinterpret_cast<void*>(&jaxembed_argsort)},
      {"jaxembed_bucket", reinterpret_cast<void*>(&jaxembed_bucket)},
      {"jaxembed_evict", reinterpret_cast<void*>(&jaxembed_evict)},
      {"jaxembed_remap", reinterpret_cast<void*>(&jaxembed_remap)},
      {"jaxembed_search", reinterpret_cast<void*>(&jaxembed_search)},
      {"jaxembed_sparse_update", reinterpret_cast<void*>(&jaxembed_sparse_update)},
      {"jaxembed_window", reinterpret_cast<void*>(&jaxembed_window)},
  };
  PyObject* out = PyDict_New();
  if (out == nullptr) return nullptr;
  for (const Entry& e : entries) {
    PyObject* capsule = PyCapsule_New(e.fn, nullptr, nullptr);
    if (capsule == nullptr || PyDict_SetItemString(out, e.name, capsule) < 0) {
      Py_XDECREF(capsule);
      Py_DECREF(out);
      return nullptr;
    }
    Py_DECREF(capsule);
  }
  return out;
}

PyObject* isa(PyObject*, PyObject*) { return PyUnicode_FromString(jaxembed::kernels().isa); }

PyMethodDef methods[] = {
    {"registrations", registrations, METH_NOARGS,
     "{target name: PyCapsule} of the XLA FFI handlers."},
    {"isa", isa, METH_NOARGS, "The instruction set the kernels run with on this CPU."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT,
                      "_native",
                      "jaxembed's CPU kernels (XLA FFI handlers).",
                      -1,
                      methods,
                      nullptr,
                      nullptr,
                      nullptr,
                      nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
