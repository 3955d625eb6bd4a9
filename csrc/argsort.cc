// jaxembed_argsort: the stable order of 64-bit keys given as two uint32 halves (managed
// collisions' evictions, jaxembed.collisions, sort their window and their ranks with it: XLA's
// CPU sort costs ~300 ns an element here). Inputs: hi, lo (n,) uint32, key = hi * 2^32 + lo.
// Output: (n,) int32, the positions in key order, equal keys in their input order. A radix sort
// (sort.h): one pass splits the keys on their highest differing byte, and the parts are then
// sorted side by side on XLA's pool.

#include "common.h"
#include "sort.h"

namespace jaxembed {
namespace {

ffi::Future Argsort(ffi::ThreadPool pool, ffi::Buffer<ffi::U32> hi, ffi::Buffer<ffi::U32> lo,
                    ffi::Result<ffi::Buffer<ffi::S32>> out) {
  const int64_t n = static_cast<int64_t>(hi.element_count());
  if (static_cast<int64_t>(lo.element_count()) != n ||
      static_cast<int64_t>(out->element_count()) != n) {
    return failed(invalid("hi, lo and the output must have n entries each"));
  }
  if (n > INT32_MAX) return failed(invalid("at most 2^31 - 1 keys"));
  auto o = std::make_shared<Ordered>();
  o->key.resize(n);
  o->at.resize(n);
  const uint32_t* h = hi.typed_data();
  const uint32_t* l = lo.typed_data();
  for (int64_t i = 0; i < n; ++i) {
    o->key[i] = (uint64_t{h[i]} << 32) | l[i];
    o->at[i] = static_cast<int32_t>(i);
  }
  auto parts = std::make_shared<Parts>(split_ordered(o.get()));
  int32_t* result = out->typed_data();
  if (parts->count() == 0) {  // already in order
    std::copy(o->at.begin(), o->at.end(), result);
    return ready();
  }
  // the parts side by side, each writing its own range of the output
  return run_split(pool, parts->count(), n * 8, parts->bounds.data(),
                   [o, parts, result](int64_t begin, int64_t end) {
                     for (int64_t p = begin; p < end; ++p) {
                       sort_part(o.get(), parts.get(), p);
                       const int64_t from = parts->bounds[p], to = parts->bounds[p + 1];
                       std::copy(o->at.begin() + from, o->at.begin() + to, result + from);
                     }
                   });
}

}  // namespace
}  // namespace jaxembed

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxembed_argsort, jaxembed::Argsort,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::U32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::U32>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::S32>>());
