// jaxembed_window: a managed-collision eviction's first step (jaxembed.collisions._remap,
// ManagedCollision._evict, step 1): the distinct ids of the window, with how often and when they
// were last seen. Inputs: hi, lo (W,) uint32, the window's ids by call (`ids_per_call` a call;
// empties, all ones, where unused); first_call () int32, the window's first call. Outputs, W
// each: u_hi, u_lo uint32, the distinct valid ids ascending, then empties; u_count int32, each
// one's entries (0 past them); u_last int32, the last call that saw it (0 past them). The
// window is sorted by id (sort.h, its parts side by side on XLA's pool); a distinct id is then
// a run, and its last entry is its last call's (the sort is stable).

#include <atomic>
#include <utility>

#include "common.h"
#include "sort.h"

namespace jaxembed {
namespace {

constexpr uint32_t kTopBit = 0x80000000u;  // an id with it set is not valid (an empty entry)

ffi::Future Window(ffi::ThreadPool pool, ffi::Buffer<ffi::U32> hi, ffi::Buffer<ffi::U32> lo,
                   ffi::Buffer<ffi::S32> first_call, int64_t ids_per_call,
                   ffi::Result<ffi::Buffer<ffi::U32>> u_hi, ffi::Result<ffi::Buffer<ffi::U32>> u_lo,
                   ffi::Result<ffi::Buffer<ffi::S32>> u_count,
                   ffi::Result<ffi::Buffer<ffi::S32>> u_last) {
  const int64_t n = static_cast<int64_t>(hi.element_count());
  auto count = [](const auto& b) { return static_cast<int64_t>(b.element_count()); };
  if (count(lo) != n || count(*u_hi) != n || count(*u_lo) != n || count(*u_count) != n ||
      count(*u_last) != n) {
    return failed(invalid("hi, lo and the outputs must have W entries each"));
  }
  if (n > INT32_MAX) return failed(invalid("at most 2^31 - 1 ids"));
  if (ids_per_call < 1 || n % ids_per_call != 0) {
    return failed(invalid("ids_per_call must be >= 1 and divide the window"));
  }
  if (count(first_call) != 1) return failed(invalid("first_call must be a scalar"));
  auto o = std::make_shared<Ordered>();
  o->key.reserve(n);
  o->at.reserve(n);
  const uint32_t* h = hi.typed_data();
  const uint32_t* l = lo.typed_data();
  for (int64_t i = 0; i < n; ++i) {
    if (h[i] & kTopBit) continue;  // an empty entry
    o->key.push_back((uint64_t{h[i]} << 32) | l[i]);
    o->at.push_back(static_cast<int32_t>(i));
  }
  auto parts = std::make_shared<Parts>(split_ordered(o.get()));
  struct Out {
    uint32_t* hi;
    uint32_t* lo;
    int32_t* count;
    int32_t* last;
    int64_t n, per_call;
    int32_t first;
  };
  const Out out{u_hi->typed_data(), u_lo->typed_data(), u_count->typed_data(),
                u_last->typed_data(), n, ids_per_call, first_call.typed_data()[0]};
  // the runs, once the window is sorted (after every part)
  auto finish = [o, out]() {
    const std::vector<uint64_t>& key = o->key;
    const int64_t m = static_cast<int64_t>(key.size());
    int64_t u = 0;
    for (int64_t i = 0; i < m;) {
      int64_t end = i + 1;
      while (end < m && key[end] == key[i]) ++end;
      out.hi[u] = static_cast<uint32_t>(key[i] >> 32);
      out.lo[u] = static_cast<uint32_t>(key[i]);
      out.count[u] = static_cast<int32_t>(end - i);
      out.last[u] = out.first + static_cast<int32_t>(o->at[end - 1] / out.per_call);
      ++u;
      i = end;
    }
    std::fill(out.hi + u, out.hi + out.n, 0xFFFFFFFFu);
    std::fill(out.lo + u, out.lo + out.n, 0xFFFFFFFFu);
    std::fill(out.count + u, out.count + out.n, 0);
    std::fill(out.last + u, out.last + out.n, 0);
  };
  if (parts->count() <= 1) {
    if (parts->count() == 1) sort_part(o.get(), parts.get(), 0);
    finish();
    return ready();
  }
  // the parts side by side; the last one to finish writes the runs
  auto left = std::make_shared<std::atomic<int64_t>>(parts->count());
  return run_split(pool, parts->count(), n * 8, parts->bounds.data(),
                   [o, parts, left, finish](int64_t begin, int64_t end) {
                     for (int64_t p = begin; p < end; ++p) sort_part(o.get(), parts.get(), p);
                     if (left->fetch_sub(end - begin) == end - begin) finish();
                   });
}

}  // namespace
}  // namespace jaxembed

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxembed_window, jaxembed::Window,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::U32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::U32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Attr<int64_t>("ids_per_call")
                                  .Ret<xla::ffi::Buffer<xla::ffi::U32>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::U32>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::S32>>());
