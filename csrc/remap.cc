// jaxembed_remap: managed collisions' remap (jaxembed.collisions.ManagedCollision.remap): each
// raw id's row. Inputs: hi, lo (S,) uint32, the held ids' halves, ascending as pairs (empties,
// all ones, last); slot (S,) int32, each held id's row; q_hi, q_lo (n,) uint32, the queries;
// ok (n,) bool. Output: (n,) int32: a held id's row, the miss row S - 1 for any other valid id,
// S where ok is false. jaxembed_search's merge (held.h), with the hit test and the row read
// fused into it, while the held entry is in cache. Split over the queries on XLA's pool. A
// query equal to the empty marker would match an empty entry: the caller passes ok false for
// every invalid id (its top bit set). Every index read stays in [0, S - 1).

#include <utility>

#include "common.h"
#include "held.h"

namespace jaxembed {
namespace {

ffi::Future Remap(ffi::ThreadPool pool, ffi::Buffer<ffi::U32> hi, ffi::Buffer<ffi::U32> lo,
                  ffi::Buffer<ffi::S32> slot, ffi::Buffer<ffi::U32> q_hi,
                  ffi::Buffer<ffi::U32> q_lo, ffi::Buffer<ffi::PRED> ok,
                  ffi::Result<ffi::Buffer<ffi::S32>> out) {
  ffi::Error error = check_search(hi, lo, q_hi, q_lo, ok, out->element_count());
  if (error.failure()) return failed(std::move(error));
  const int64_t size = static_cast<int64_t>(hi.element_count());
  const int64_t n = static_cast<int64_t>(q_hi.element_count());
  if (static_cast<int64_t>(slot.element_count()) != size) {
    return failed(invalid("slot must have S entries, as hi and lo"));
  }
  const bool* valid = ok.typed_data();
  int32_t* result = out->typed_data();
  for (int64_t j = 0; j < n; ++j) {
    if (!valid[j]) result[j] = static_cast<int32_t>(size);
  }
  const Held h{hi.typed_data(), lo.typed_data(), size - 1};
  const int32_t* rows = slot.typed_data();
  const int32_t miss = static_cast<int32_t>(size - 1);
  return search_queries(pool, h, q_hi.typed_data(), q_lo.typed_data(), valid, n,
                        [h, rows, miss, result](int32_t j, uint64_t v, int64_t p) {
                          result[j] = p < h.n && h[p] == v ? rows[p] : miss;
                        });
}

}  // namespace
}  // namespace jaxembed

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxembed_remap, jaxembed::Remap,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::U32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::U32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::U32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::U32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::PRED>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::S32>>());
