// Sorting 64-bit keys with their positions (search.cc orders its queries, argsort.cc sorts
// for managed collisions' evictions): a stable counting sort, most significant digit first.

#ifndef JAXEMBED_CSRC_SORT_H_
#define JAXEMBED_CSRC_SORT_H_

#include <algorithm>
#include <cstdint>
#include <vector>

namespace jaxembed {

// Keys, each with its position in the input; sorted by key (ties keep their order).
struct Ordered {
  std::vector<uint64_t> key;
  std::vector<int32_t> at;
};

// Sorts o's entries [begin, end) by key, stably: a counting sort on the top bits of their
// spread (at most 16, fewer for a short range), then each bucket the same way, down to
// insertion sorts of 16 or fewer. A range of equal keys (a hot id) ends at once. The recursion
// is at most 64 / 4 deep.
inline void sort_range(Ordered* o, Ordered* tmp, int64_t begin, int64_t end) {
  const int64_t size = end - begin;
  uint64_t* key = o->key.data();
  int32_t* at = o->at.data();
  if (size <= 16) {
    for (int64_t i = begin + 1; i < end; ++i) {
      const uint64_t k = key[i];
      const int32_t a = at[i];
      int64_t p = i;
      for (; p > begin && key[p - 1] > k; --p) {
        key[p] = key[p - 1];
        at[p] = at[p - 1];
      }
      key[p] = k;
      at[p] = a;
    }
    return;
  }
  uint64_t low = key[begin], high = key[begin];
  for (int64_t i = begin + 1; i < end; ++i) {
    low = std::min(low, key[i]);
    high = std::max(high, key[i]);
  }
  if (low == high) return;
  const int spread_bits = 64 - __builtin_clzll(high - low);
  const int digit = std::min(16, std::max(4, 64 - __builtin_clzll(uint64_t(size))));
  const int shift = std::max(0, spread_bits - digit);
  const int64_t buckets = int64_t{1} << std::min(digit, spread_bits);
  std::vector<int64_t> start(buckets + 1, 0);
  for (int64_t i = begin; i < end; ++i) ++start[((key[i] - low) >> shift) + 1];
  for (int64_t b = 0; b < buckets; ++b) start[b + 1] += start[b];
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t i = begin; i < end; ++i) {
    const int64_t p = begin + fill[(key[i] - low) >> shift]++;
    tmp->key[p] = key[i];
    tmp->at[p] = at[i];
  }
  std::copy(tmp->key.begin() + begin, tmp->key.begin() + end, key + begin);
  std::copy(tmp->at.begin() + begin, tmp->at.begin() + end, at + begin);
  if (shift == 0) return;  // each bucket holds one key
  for (int64_t b = 0; b < buckets; ++b) {
    if (start[b + 1] - start[b] > 1) sort_range(o, tmp, begin + start[b], begin + start[b + 1]);
  }
}

// Sorts all of o's entries.
inline void sort_ordered(Ordered* o) {
  Ordered tmp;
  tmp.key.resize(o->key.size());
  tmp.at.resize(o->at.size());
  sort_range(o, &tmp, 0, static_cast<int64_t>(o->key.size()));
}

}  // namespace jaxembed

#endif  // JAXEMBED_CSRC_SORT_H_
