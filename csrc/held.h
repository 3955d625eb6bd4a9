// Managed collisions' held ids (jaxembed.collisions): a table of 64-bit ids stored as two
// uint32 halves, ascending, searched by search.cc (positions), remap.cc (rows) and evict.cc
// (an eviction's merge).
//
// A call's queries are first ordered (sort.h), and then merged into the held ids: each query's
// lower bound is found forward of the previous one's, so the held ids are read in ascending
// order, a stream the hardware prefetcher follows, instead of ~log2(S) cache misses a query.

#ifndef JAXEMBED_CSRC_HELD_H_
#define JAXEMBED_CSRC_HELD_H_

#include <algorithm>
#include <cstdint>

#include "common.h"
#include "sort.h"

namespace jaxembed {

struct Held {
  const uint32_t* hi;
  const uint32_t* lo;
  int64_t n;  // the entries searched
  uint64_t operator[](int64_t i) const { return (uint64_t{hi[i]} << 32) | lo[i]; }
};

// The first position in [from, n) whose id is not below v, given that none before `from` is
// (galloping: 1, 2, 4, ... ahead, then a binary search of the last step). Sorted queries walk
// the table forward, in the order the hardware prefetcher follows.
inline int64_t gallop(const Held& h, int64_t from, uint64_t v) {
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

// The first position in [from, n) whose id is not below v, given that none before `from` is:
// the next 16 entries counted without a branch (a call's sorted uniform ids are ~S / n entries
// apart), then galloping past them (more blocks cost skewed ids, far apart, more than they save).
inline int64_t lower_bound_from(const Held& h, int64_t from, uint64_t v) {
  constexpr int64_t kBlock = 16;
  if (from + kBlock > h.n) return gallop(h, from, v);
  int64_t below = 0;
  for (int64_t i = 0; i < kBlock; ++i) below += h[from + i] < v;
  return below < kBlock ? from + below : gallop(h, from + kBlock, v);
}

// Ordered queries [begin, end): write(j, v, p) for each, j its position in the call, v its id and
// p its lower bound among the held ids (a run of equal queries is searched once).
template <typename Write>
void merge_queries(const Held& h, const Ordered& o, int64_t begin, int64_t end, Write write) {
  int64_t p = 0;
  for (int64_t i = begin; i < end; ++i) {
    if (i == begin || o.key[i] != o.key[i - 1]) p = lower_bound_from(h, p, o.key[i]);
    write(o.at[i], o.key[i], p);
  }
}

// Searches the n queries (q_hi, q_lo) where ok among the held ids, on XLA's pool: write(j, v, p)
// for each (see merge_queries), from any thread, once. The queries are ordered by id (sort.h),
// and the parts that split_ordered leaves are each sorted and then merged, side by side; queries
// already in order are merged in ranges.
template <typename Write>
ffi::Future search_queries(ffi::ThreadPool& pool, const Held& h, const uint32_t* q_hi,
                           const uint32_t* q_lo, const bool* ok, int64_t n, Write write) {
  auto o = std::make_shared<Ordered>();
  o->key.reserve(n);
  o->at.reserve(n);
  for (int64_t j = 0; j < n; ++j) {
    if (!ok[j]) continue;
    o->key.push_back((uint64_t{q_hi[j]} << 32) | q_lo[j]);
    o->at.push_back(static_cast<int32_t>(j));
  }
  const int64_t m = static_cast<int64_t>(o->key.size());
  auto parts = std::make_shared<Parts>(split_ordered(o.get()));
  // a query costs a short scan: a few cache lines
  if (parts->count() == 0) {  // already in order
    return run_split(pool, m, m * 16, nullptr, [h, o, write](int64_t b, int64_t e) {
      merge_queries(h, *o, b, e, write);
    });
  }
  return run_split(pool, parts->count(), m * 16, parts->bounds.data(),
                   [h, o, parts, write](int64_t b, int64_t e) {
                     for (int64_t p = b; p < e; ++p) {
                       sort_part(o.get(), parts.get(), p);
                       merge_queries(h, *o, parts->bounds[p], parts->bounds[p + 1], write);
                     }
                   });
}

// The checks a search of the held ids makes of its buffers: hi, lo (S,) with 2 <= S < 2^31;
// the queries q_hi, q_lo, ok and the output n entries each, n < 2^31.
inline ffi::Error check_search(const ffi::Buffer<ffi::U32>& hi, const ffi::Buffer<ffi::U32>& lo,
                               const ffi::Buffer<ffi::U32>& q_hi, const ffi::Buffer<ffi::U32>& q_lo,
                               const ffi::Buffer<ffi::PRED>& ok, int64_t out_count) {
  const int64_t size = static_cast<int64_t>(hi.element_count());
  const int64_t n = static_cast<int64_t>(q_hi.element_count());
  if (hi.dimensions().size() != 1 || lo.element_count() != hi.element_count()) {
    return invalid("hi and lo must be (S,) each");
  }
  if (size < 2 || size > INT32_MAX) return invalid("the held ids must number 2 to 2^31 - 1");
  if (static_cast<int64_t>(q_lo.element_count()) != n ||
      static_cast<int64_t>(ok.element_count()) != n || out_count != n) {
    return invalid("q_hi, q_lo, ok and the output must have n entries each");
  }
  if (n > INT32_MAX) return invalid("at most 2^31 - 1 queries");
  return ffi::Error::Success();
}

}  // namespace jaxembed

#endif  // JAXEMBED_CSRC_HELD_H_
