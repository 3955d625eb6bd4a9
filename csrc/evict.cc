// jaxembed_evict: a managed-collision eviction's replacement (jaxembed.collisions._remap, steps
// 5 to 7 of ManagedCollision._evict): which new ids enter, which held entries leave, and the
// held table re-sorted by id, in O(S + W log W) where the pure-JAX path makes ~50 passes over
// the S held entries (bisections of the ranks).
//
// Inputs, S held entries sorted by id (the last, the miss slot's, always empty) and W new ids:
//   hi, lo (S,) uint32: the held ids; slot (S,) int32: their rows;
//   counts, last (S,) int32 each, or (0,) where the policy keeps none: the metadata moved with
//     the entries;
//   key (S,) uint32: each held entry's policy key (ascending = kept first);
//   n_hi, n_lo (W,) uint32, n_count, n_last (W,) int32 (or (0,) as counts and last): the new
//     ids in order F (the window's order: count descending, then id);
//   n_key (W,) uint32: their keys; num_new () int32: how many of the W are new ids.
// The ranking, TorchRec's one stable sort of [held entries; new ids] by key: an entry ranks by
// (key, held before new, position); the top S stay or enter. Outputs:
//   hi, lo, slot, counts, last: the new held table (kept entries and entering ids merged by id);
//   evicted (min(S, W),) int32: the rows given to the entering ids, in the leaving entries' rank
//     order (the k-th entering id takes the k-th), S as padding;
//   entering () int32: how many ids entered.
//
// How: the S-th entry of the ranking is found by two 16-bit histograms of the keys (held and
// new), so no held entry is sorted; the leaving entries (as many as enter, at most W) are then
// collected in one pass and sorted, and the table is merged in one more. One thread: a call
// evicts once per eviction_interval calls.

#include <array>

#include "common.h"
#include "held.h"
#include "sort.h"

namespace jaxembed {
namespace {

constexpr int kDigit = 16;
constexpr int64_t kBuckets = int64_t{1} << kDigit;

// The cut of the ranking: held entries with key below `key`, and the first `held_at_key` of
// those with key == `key` (in position order), stay; the first `entering` new ids (by key, then
// order F) enter.
struct Cut {
  uint32_t key;
  int64_t held_at_key;
  int64_t entering;
};

// Adds to `counts` how many keys hold each high 16 bits (top < 0), or each low 16 bits among the
// keys whose high 16 bits are `top`. Without a branch, and on two tables, for even and odd keys:
// a policy's keys are often all equal (every count 1), and one table would make each increment
// wait on the store before it.
void count_digits(const uint32_t* key, int64_t size, int64_t top, std::vector<int64_t>* counts) {
  std::vector<uint32_t> even(kBuckets, 0), odd(kBuckets, 0);
  const bool high = top < 0;
  auto digit = [high](uint32_t k) { return high ? k >> kDigit : k & (kBuckets - 1); };
  auto in = [high, top](uint32_t k) -> uint32_t { return high || (k >> kDigit) == top; };
  int64_t j = 0;
  for (; j + 1 < size; j += 2) {
    even[digit(key[j])] += in(key[j]);
    odd[digit(key[j + 1])] += in(key[j + 1]);
  }
  if (j < size) even[digit(key[j])] += in(key[j]);
  for (int64_t d = 0; d < kBuckets; ++d) (*counts)[d] += int64_t{even[d]} + odd[d];
}

// new_keys: the new ids' keys, ascending (m of them).
Cut find_cut(const uint32_t* key, int64_t size, const std::vector<uint32_t>& new_keys) {
  const int64_t m = static_cast<int64_t>(new_keys.size());
  std::vector<int64_t> held(kBuckets, 0), fresh(kBuckets, 0);
  count_digits(key, size, -1, &held);
  for (int64_t e = 0; e < m; ++e) ++fresh[new_keys[e] >> kDigit];
  // the bucket holding the S-th entry of the ranking (S held entries exist, so one does)
  int64_t need = size, fresh_before = 0, top = 0;
  for (; top < kBuckets; ++top) {
    const int64_t here = held[top] + fresh[top];
    if (here >= need) break;
    need -= here;
    fresh_before += fresh[top];
  }
  // within it, by the low 16 bits: the held entries of a key rank before its new ids
  std::fill(held.begin(), held.end(), 0);
  count_digits(key, size, top, &held);
  int64_t e = fresh_before;  // the new ids below the current key
  for (int64_t low = 0; low < kBuckets; ++low) {
    const uint32_t k = static_cast<uint32_t>((top << kDigit) | low);
    if (need <= held[low]) return Cut{k, need, e};
    need -= held[low];
    int64_t at_key = 0;
    while (e + at_key < m && new_keys[e + at_key] == k) ++at_key;
    if (need <= at_key) return Cut{k, held[low], e + need};
    need -= at_key;
    e += at_key;
  }
  return Cut{0xFFFFFFFFu, 0, e};  // not reached: the bucket holds the S-th entry
}

struct Column {
  const int32_t* held;   // (S,), or null when the policy keeps none
  const int32_t* fresh;  // (W,)
  int32_t* out;          // (S,)
};

ffi::Error Evict(ffi::Buffer<ffi::U32> hi, ffi::Buffer<ffi::U32> lo, ffi::Buffer<ffi::S32> slot,
                 ffi::Buffer<ffi::S32> counts, ffi::Buffer<ffi::S32> last,
                 ffi::Buffer<ffi::U32> key, ffi::Buffer<ffi::U32> n_hi,
                 ffi::Buffer<ffi::U32> n_lo, ffi::Buffer<ffi::S32> n_count,
                 ffi::Buffer<ffi::S32> n_last, ffi::Buffer<ffi::U32> n_key,
                 ffi::Buffer<ffi::S32> num_new, ffi::Result<ffi::Buffer<ffi::U32>> hi_out,
                 ffi::Result<ffi::Buffer<ffi::U32>> lo_out,
                 ffi::Result<ffi::Buffer<ffi::S32>> slot_out,
                 ffi::Result<ffi::Buffer<ffi::S32>> counts_out,
                 ffi::Result<ffi::Buffer<ffi::S32>> last_out,
                 ffi::Result<ffi::Buffer<ffi::S32>> evicted_out,
                 ffi::Result<ffi::Buffer<ffi::S32>> entering_out) {
  const int64_t size = static_cast<int64_t>(hi.element_count());
  const int64_t window = static_cast<int64_t>(n_hi.element_count());
  if (size < 2 || size >= INT32_MAX) return invalid("the held entries must number 2 to 2^31 - 2");
  if (window >= INT32_MAX) return invalid("at most 2^31 - 2 new ids");
  auto count = [](const auto& b) { return static_cast<int64_t>(b.element_count()); };
  if (count(lo) != size || count(slot) != size || count(key) != size || count(*hi_out) != size ||
      count(*lo_out) != size || count(*slot_out) != size) {
    return invalid("hi, lo, slot, key and their outputs must have S entries each");
  }
  if (count(n_lo) != window || count(n_key) != window) {
    return invalid("n_hi, n_lo and n_key must have W entries each");
  }
  const bool has_counts = count(counts) != 0, has_last = count(last) != 0;
  if ((has_counts && count(counts) != size) || (has_last && count(last) != size) ||
      count(*counts_out) != count(counts) || count(*last_out) != count(last) ||
      count(n_count) != (has_counts ? window : 0) || count(n_last) != (has_last ? window : 0)) {
    return invalid("counts and last (and n_count, n_last, their outputs) must be S (W) or 0");
  }
  if (count(*evicted_out) != std::min(size, window) || count(num_new) != 1 ||
      count(*entering_out) != 1) {
    return invalid("evicted must have min(S, W) entries; num_new and entering one");
  }
  const int64_t m = num_new.typed_data()[0];
  if (m < 0 || m > window) return invalid("num_new must be in [0, W]");

  const uint32_t* h = hi.typed_data();
  const uint32_t* l = lo.typed_data();
  const int32_t* s = slot.typed_data();
  const uint32_t* k = key.typed_data();
  uint32_t* h_out = hi_out->typed_data();
  uint32_t* l_out = lo_out->typed_data();
  int32_t* s_out = slot_out->typed_data();
  int32_t* evicted = evicted_out->typed_data();
  const std::array<Column, 2> columns{
      Column{has_counts ? counts.typed_data() : nullptr,
             has_counts ? n_count.typed_data() : nullptr, counts_out->typed_data()},
      Column{has_last ? last.typed_data() : nullptr, has_last ? n_last.typed_data() : nullptr,
             last_out->typed_data()}};

  // the new ids by (key, order F)
  Ordered fresh;
  fresh.key.resize(m);
  fresh.at.resize(m);
  const uint32_t* nk = n_key.typed_data();
  for (int64_t e = 0; e < m; ++e) {
    fresh.key[e] = (uint64_t{nk[e]} << 32) | static_cast<uint64_t>(e);
    fresh.at[e] = static_cast<int32_t>(e);
  }
  sort_ordered(&fresh);
  std::vector<uint32_t> new_keys(m);
  for (int64_t e = 0; e < m; ++e) new_keys[e] = static_cast<uint32_t>(fresh.key[e] >> 32);
  const Cut cut = m == 0 ? Cut{0, 0, 0} : find_cut(k, size, new_keys);
  const int64_t entering = cut.entering;
  const int64_t size_evicted = std::min(size, window);
  if (entering < 0 || entering > std::min(m, size_evicted)) {
    return invalid("internal: more ids enter than are new or fit the table");
  }

  // the leaving entries: by position, then by (key, position), the rank order
  std::vector<int64_t> out_at;
  out_at.reserve(entering);
  Ordered leaving;
  leaving.key.reserve(entering);
  leaving.at.reserve(entering);
  if (entering > 0) {
    int64_t at_key = 0;  // entries with the cut's key so far
    for (int64_t j = 0; j < size; ++j) {
      const bool tie = k[j] == cut.key;
      const bool out = (k[j] > cut.key) | (tie & (at_key >= cut.held_at_key));
      at_key += tie;
      if (!out) continue;  // most entries stay: at most W leave
      out_at.push_back(j);
      leaving.key.push_back((uint64_t{k[j]} << 32) | static_cast<uint64_t>(j));
      leaving.at.push_back(static_cast<int32_t>(j));
    }
    if (static_cast<int64_t>(out_at.size()) != entering) {
      return invalid("internal: the leaving entries do not match the entering ids");
    }
    sort_ordered(&leaving);
  }
  for (int64_t q = 0; q < size_evicted; ++q) {
    evicted[q] = q < entering ? s[leaving.at[q]] : static_cast<int32_t>(size);
  }

  // the entering ids by id (each new id is valid, so below every empty entry), and where each
  // goes: before the first held entry not below it
  Ordered in;
  in.key.resize(entering);
  in.at.resize(entering);
  const uint32_t* nh = n_hi.typed_data();
  const uint32_t* nl = n_lo.typed_data();
  for (int64_t q = 0; q < entering; ++q) {
    const int32_t src = fresh.at[q];
    in.key[q] = (uint64_t{nh[src]} << 32) | nl[src];
    in.at[q] = static_cast<int32_t>(q);
  }
  sort_ordered(&in);
  std::vector<int64_t> in_at(entering);
  const Held table{h, l, size};
  for (int64_t q = 0, p = 0; q < entering; ++q) in_at[q] = p = gallop(table, p, in.key[q]);

  // the kept entries and the entering ids, merged by id: runs of kept entries are copied whole
  auto copy_run = [&](int64_t from, int64_t to, int64_t o) {
    const int64_t n = to - from;
    if (n <= 0) return;
    std::memcpy(h_out + o, h + from, n * sizeof(uint32_t));
    std::memcpy(l_out + o, l + from, n * sizeof(uint32_t));
    std::memcpy(s_out + o, s + from, n * sizeof(int32_t));
    for (const Column& c : columns) {
      if (c.held != nullptr) std::memcpy(c.out + o, c.held + from, n * sizeof(int32_t));
    }
  };
  int64_t j = 0, o = 0, q = 0, a = 0;
  while (o < size) {
    const int64_t next_in = q < entering ? in_at[q] : size;
    const int64_t next_out = a < entering ? out_at[a] : size;
    const int64_t stop = std::min(next_in, next_out);
    copy_run(j, stop, o);
    o += stop - j;
    j = stop;
    if (q < entering && in_at[q] == j) {  // an entering id goes before held entry j
      const int32_t rank = in.at[q];
      const int32_t src = fresh.at[rank];
      h_out[o] = nh[src];
      l_out[o] = nl[src];
      s_out[o] = evicted[rank];
      for (const Column& c : columns) {
        if (c.held != nullptr) c.out[o] = c.fresh[src];
      }
      ++o;
      ++q;
    } else if (a < entering && out_at[a] == j) {  // a leaving entry
      ++j;
      ++a;
    } else if (j == size) {
      break;
    }
  }
  if (o != size || q != entering || a != entering) {
    return invalid("internal: the merge did not fill the table");
  }
  entering_out->typed_data()[0] = static_cast<int32_t>(entering);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jaxembed

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxembed_evict, jaxembed::Evict,
                              xla::ffi::Ffi::Bind()
                                  .Arg<xla::ffi::Buffer<xla::ffi::U32>>()  // hi
                                  .Arg<xla::ffi::Buffer<xla::ffi::U32>>()  // lo
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()  // slot
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()  // counts
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()  // last
                                  .Arg<xla::ffi::Buffer<xla::ffi::U32>>()  // key
                                  .Arg<xla::ffi::Buffer<xla::ffi::U32>>()  // n_hi
                                  .Arg<xla::ffi::Buffer<xla::ffi::U32>>()  // n_lo
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()  // n_count
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()  // n_last
                                  .Arg<xla::ffi::Buffer<xla::ffi::U32>>()  // n_key
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()  // num_new
                                  .Ret<xla::ffi::Buffer<xla::ffi::U32>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::U32>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::S32>>());
