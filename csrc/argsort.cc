// jaxembed_argsort: the stable order of 64-bit keys given as two uint32 halves (managed
// collisions' evictions, jaxembed.collisions, sort their window and their ranks with it: XLA's
// CPU sort costs ~300 ns an element here). Inputs: hi, lo (n,) uint32, key = hi * 2^32 + lo.
// Output: (n,) int32, the positions in key order, equal keys in their input order. One thread:
// a counting sort, most significant digit first (sort.h).

#include "common.h"
#include "sort.h"

namespace jaxembed {
namespace {

ffi::Error Argsort(ffi::Buffer<ffi::U32> hi, ffi::Buffer<ffi::U32> lo,
                   ffi::Result<ffi::Buffer<ffi::S32>> out) {
  const int64_t n = static_cast<int64_t>(hi.element_count());
  if (static_cast<int64_t>(lo.element_count()) != n ||
      static_cast<int64_t>(out->element_count()) != n) {
    return invalid("hi, lo and the output must have n entries each");
  }
  if (n > INT32_MAX) return invalid("at most 2^31 - 1 keys");
  Ordered o;
  o.key.resize(n);
  o.at.resize(n);
  const uint32_t* h = hi.typed_data();
  const uint32_t* l = lo.typed_data();
  for (int64_t i = 0; i < n; ++i) {
    o.key[i] = (uint64_t{h[i]} << 32) | l[i];
    o.at[i] = static_cast<int32_t>(i);
  }
  sort_ordered(&o);
  std::copy(o.at.begin(), o.at.end(), out->typed_data());
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jaxembed

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxembed_argsort, jaxembed::Argsort,
                              xla::ffi::Ffi::Bind()
                                  .Arg<xla::ffi::Buffer<xla::ffi::U32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::U32>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::S32>>());
