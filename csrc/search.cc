// jaxembed_search: managed collisions' search (jaxembed.collisions): where each raw id falls
// among the held ids. Inputs: hi, lo (S,) uint32, the held ids' halves, ascending as pairs
// (empties, all ones, last); q_hi, q_lo (n,) uint32, the queries; ok (n,) bool. Output: (n,)
// int32: each query's lower bound among the first S - 1 entries (the last is the miss slot's,
// never held), in [0, S - 1]; S - 1 where ok is false. Split over the queries on XLA's pool.
// A query equal to the empty marker would land on an empty entry: the caller passes ok false
// for every invalid id (its top bit set).
//
// The queries are first ordered (counting sorts on 16 bits of their spread, bucket within
// bucket), and then merged into the held ids: each query's lower bound is found by
// galloping forward from the previous one's, so the held ids are read in ascending order, a
// stream the hardware prefetcher follows, instead of ~log2(S) cache misses a query. The merge
// is split over XLA's pool by ranges of the ordered queries. Every index read stays in
// [0, S - 1].

#include <utility>

#include "common.h"
#include "sort.h"

namespace jaxembed {
namespace {

struct Held {
  const uint32_t* hi;
  const uint32_t* lo;
  int64_t n;  // the searched entries: S - 1
  uint64_t operator[](int64_t i) const { return (uint64_t{hi[i]} << 32) | lo[i]; }
};

// The first position in [from, n) whose key is not below v, given that none before `from` is
// (galloping: 1, 2, 4, ... ahead, then a binary search of the last step).
int64_t gallop(const Held& h, int64_t from, uint64_t v) {
  int64_t lo = from, step = 1;
  while (lo + step - 1 < h.n && h[lo + step - 1] < v) {
    lo += step;
    step *= 2;
  }
  int64_t hi = std::min(lo + step - 1, h.n);  // h[hi] >= v, or hi == n
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (h[mid] < v) lo = mid + 1; else hi = mid;
  }
  return lo;
}

void order_queries(const uint32_t* q_hi, const uint32_t* q_lo, const bool* ok, int64_t n,
                   Ordered* o) {
  o->key.clear();
  o->at.clear();
  o->key.reserve(n);
  o->at.reserve(n);
  for (int64_t j = 0; j < n; ++j) {
    if (!ok[j]) continue;
    o->key.push_back((uint64_t{q_hi[j]} << 32) | q_lo[j]);
    o->at.push_back(static_cast<int32_t>(j));
  }
  sort_ordered(o);
}

// Ordered queries [begin, end): their lower bounds, merged into the held ids.
void merge_range(const Held& h, const Ordered& o, int32_t* out, int64_t begin, int64_t end) {
  int64_t p = 0;
  uint64_t previous = 0;
  int32_t result = 0;  // the lower bound of `previous`
  for (int64_t i = begin; i < end; ++i) {
    const uint64_t v = o.key[i];
    if (i == begin || v != previous) {
      p = gallop(h, p, v);
      result = static_cast<int32_t>(p);
      previous = v;
    }
    out[o.at[i]] = result;
  }
}

ffi::Future Search(ffi::ThreadPool pool, ffi::Buffer<ffi::U32> hi, ffi::Buffer<ffi::U32> lo,
                   ffi::Buffer<ffi::U32> q_hi, ffi::Buffer<ffi::U32> q_lo,
                   ffi::Buffer<ffi::PRED> ok, ffi::Result<ffi::Buffer<ffi::S32>> out) {
  const int64_t size = static_cast<int64_t>(hi.element_count());
  const int64_t n = static_cast<int64_t>(q_hi.element_count());
  if (hi.dimensions().size() != 1 || lo.element_count() != hi.element_count()) {
    return failed(invalid("hi and lo must be (S,) each"));
  }
  if (size < 2 || size > INT32_MAX) {
    return failed(invalid("the held ids must number 2 to 2^31 - 1"));
  }
  if (static_cast<int64_t>(q_lo.element_count()) != n ||
      static_cast<int64_t>(ok.element_count()) != n ||
      static_cast<int64_t>(out->element_count()) != n) {
    return failed(invalid("q_hi, q_lo, ok and the output must have n entries each"));
  }
  if (n > INT32_MAX) return failed(invalid("at most 2^31 - 1 queries"));
  const uint32_t* qh = q_hi.typed_data();
  const uint32_t* ql = q_lo.typed_data();
  const bool* valid = ok.typed_data();
  int32_t* result = out->typed_data();
  for (int64_t j = 0; j < n; ++j) {
    if (!valid[j]) result[j] = static_cast<int32_t>(size - 1);
  }
  auto ordered = std::make_shared<Ordered>();
  order_queries(qh, ql, valid, n, ordered.get());
  const Held h{hi.typed_data(), lo.typed_data(), size - 1};
  const int64_t m = static_cast<int64_t>(ordered->key.size());
  // a query costs a short gallop: a few cache lines
  return run_split(pool, m, m * 16, nullptr, [h, ordered, result](int64_t b, int64_t e) {
    merge_range(h, *ordered, result, b, e);
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
