// jaxembed_search: managed collisions' search (jaxembed.collisions): where each raw id falls
// among the held ids. Inputs: hi, lo (S,) uint32, the held ids' halves, ascending as pairs
// (empties, all ones, last); q_hi, q_lo (n,) uint32, the queries; ok (n,) bool. Output: (n,)
// int32: each query's lower bound among the first S - 1 entries (the last is the miss slot's,
// never held), in [0, S - 1]; S - 1 where ok is false. Split over the queries on XLA's pool.
// A query equal to the empty marker would land on an empty entry: the caller passes ok false
// for every invalid id (its top bit set).
//
// The queries are ordered, then merged into the held ids (held.h); the merge is split over
// XLA's pool by ranges of the ordered queries. Every index read stays in [0, S - 1].

#include <utility>

#include "common.h"
#include "held.h"
#include "sort.h"

namespace jaxembed {
namespace {

ffi::Future Search(ffi::ThreadPool pool, ffi::Buffer<ffi::U32> hi, ffi::Buffer<ffi::U32> lo,
                   ffi::Buffer<ffi::U32> q_hi, ffi::Buffer<ffi::U32> q_lo,
                   ffi::Buffer<ffi::PRED> ok, ffi::Result<ffi::Buffer<ffi::S32>> out) {
  ffi::Error error = check_search(hi, lo, q_hi, q_lo, ok, out->element_count());
  if (error.failure()) return failed(std::move(error));
  const int64_t size = static_cast<int64_t>(hi.element_count());
  const int64_t n = static_cast<int64_t>(q_hi.element_count());
  const bool* valid = ok.typed_data();
  int32_t* result = out->typed_data();
  for (int64_t j = 0; j < n; ++j) {
    if (!valid[j]) result[j] = static_cast<int32_t>(size - 1);
  }
  const Held h{hi.typed_data(), lo.typed_data(), size - 1};
  return search_queries(pool, h, q_hi.typed_data(), q_lo.typed_data(), valid, n,
                        [result](int32_t j, uint64_t, int64_t p) {
                          result[j] = static_cast<int32_t>(p);
                        });
}

}  // namespace
}  // namespace jaxembed

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxembed_search, jaxembed::Search,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::U32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::U32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::U32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::U32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::PRED>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::S32>>());
