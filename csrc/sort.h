// Sorting 64-bit keys with their positions (search.cc orders its queries, argsort.cc and
// evict.cc sort for managed collisions' evictions, bucket.cc routes the sharded collection's
// ids): a stable radix sort of bytes.

#ifndef JAXEMBED_CSRC_SORT_H_
#define JAXEMBED_CSRC_SORT_H_

#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>
#include <vector>

namespace jaxembed {

// Keys, each with its position in the input; sorted by key (ties keep their order).
struct Ordered {
  std::vector<uint64_t> key;
  std::vector<int32_t> at;
};

namespace sort_detail {

using Counts = std::array<int64_t, 256>;

inline int byte_of(uint64_t k, int b) { return static_cast<int>((k >> (8 * b)) & 0xFF); }

// How many of the n keys hold each value of byte b: two histograms, for even and odd entries,
// as a run of one value would otherwise wait on its own counter's store at every entry.
inline Counts histogram(const uint64_t* k, int64_t n, int b) {
  Counts even{}, odd{};
  int64_t i = 0;
  for (; i + 1 < n; i += 2) {
    ++even[byte_of(k[i], b)];
    ++odd[byte_of(k[i + 1], b)];
  }
  if (i < n) ++even[byte_of(k[i], b)];
  for (int v = 0; v < 256; ++v) even[v] += odd[v];
  return even;
}

// A stable counting pass on byte b, from (k, a) to (k_to, a_to); c holds the byte's histogram
// and is spent.
inline void scatter(const uint64_t* k, const int32_t* a, int64_t n, int b, Counts* c,
                    uint64_t* k_to, int32_t* a_to) {
  int64_t start = 0;
  for (int64_t& v : *c) start += std::exchange(v, start);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t p = (*c)[byte_of(k[i], b)]++;
    k_to[p] = k[i];
    a_to[p] = a[i];
  }
}

// Sorts n entries by key, stably, by insertion: for a few entries.
inline void insertion(uint64_t* k, int32_t* a, int64_t n) {
  for (int64_t i = 1; i < n; ++i) {
    const uint64_t key = k[i];
    const int32_t at = a[i];
    int64_t p = i;
    for (; p > 0 && k[p - 1] > key; --p) {
      k[p] = k[p - 1];
      a[p] = a[p - 1];
    }
    k[p] = key;
    a[p] = at;
  }
}

// Sorts n entries by the bytes on which they differ (`differ`: the bits on which any two keys
// differ), least significant first, between (k, a) and the scratch (k_tmp, a_tmp); the result
// ends in (k, a). For keys that differ in a byte or two.
inline void lsd(uint64_t* k, int32_t* a, int64_t n, uint64_t differ, uint64_t* k_tmp,
                int32_t* a_tmp) {
  if (n <= 32) return insertion(k, a, n);
  uint64_t *k_from = k, *k_to = k_tmp;
  int32_t *a_from = a, *a_to = a_tmp;
  for (int b = 0; b < 8; ++b) {
    if (((differ >> (8 * b)) & 0xFF) == 0) continue;
    Counts c = histogram(k_from, n, b);
    scatter(k_from, a_from, n, b, &c, k_to, a_to);
    std::swap(k_from, k_to);
    std::swap(a_from, a_to);
  }
  if (k_from != k) {
    std::copy(k_from, k_from + n, k);
    std::copy(a_from, a_from + n, a);
  }
}

// Sorts n entries by key: split on the highest byte on which they differ, and each part the
// same way, down to parts of 64 or fewer (an insertion sort: a pass over 256 buckets costs
// more). Keys that differ in one or two bytes only are sorted on those, least significant
// first. The scratch (k_tmp, a_tmp) holds n.
inline void msd(uint64_t* k, int32_t* a, int64_t n, uint64_t* k_tmp, int32_t* a_tmp) {
  uint64_t differ = 0;
  for (int64_t i = 1; i < n; ++i) differ |= k[i] ^ k[0];
  if (differ == 0) return;
  int bytes = 0;
  for (int b = 0; b < 8; ++b) bytes += ((differ >> (8 * b)) & 0xFF) != 0;
  if (n <= 64 && bytes > 2) return insertion(k, a, n);
  if (bytes <= 2) return lsd(k, a, n, differ, k_tmp, a_tmp);
  const int top = (63 - __builtin_clzll(differ)) / 8;
  Counts c = histogram(k, n, top);
  const Counts sizes = c;
  scatter(k, a, n, top, &c, k_tmp, a_tmp);  // c: each part's end
  for (int v = 0; v < 256; ++v) {
    const int64_t size = sizes[v], begin = c[v] - size;
    if (size == 0) continue;
    std::copy_n(k_tmp + begin, size, k + begin);
    std::copy_n(a_tmp + begin, size, a + begin);
    if (size > 1) msd(k + begin, a + begin, size, k_tmp + begin, a_tmp + begin);
  }
}

}  // namespace sort_detail

// Sorting in two steps, so that a caller may sort the parts side by side: split_ordered orders
// the entries by their highest differing byte, and each part it leaves (equal in that byte) is
// then sorted on the bytes below by sort_part. An input already in order costs one pass, and
// leaves no part. Only the bytes on which the keys differ are sorted on (narrow keys, such as
// a device's routing keys below 2^31, take at most four passes). Splitting first keeps each
// part's counting passes in cache: passes over the whole input would each miss it on every
// write. A small input is one part.
struct Parts {
  std::vector<int64_t> bounds;  // part p is [bounds[p], bounds[p + 1])
  bool split = false;           // the parts lie in the scratch (key_tmp, at_tmp)
  std::vector<uint64_t> key_tmp;
  std::vector<int32_t> at_tmp;
  int64_t count() const { return static_cast<int64_t>(bounds.size()) - 1; }
};

inline Parts split_ordered(Ordered* o) {
  using namespace sort_detail;
  Parts parts;
  parts.bounds.push_back(0);
  const int64_t n = static_cast<int64_t>(o->key.size());
  uint64_t* key = o->key.data();
  int32_t* at = o->at.data();
  if (n < 2) return parts;
  uint64_t differ = 0;
  bool sorted = true;
  for (int64_t i = 1; i < n; ++i) {
    differ |= key[i] ^ key[0];
    sorted &= key[i - 1] <= key[i];
  }
  if (sorted) return parts;  // already in order (equal keys in their input order)
  const int top = (63 - __builtin_clzll(differ)) / 8;  // the highest byte that differs
  parts.key_tmp.resize(n);
  parts.at_tmp.resize(n);
  constexpr int64_t kCached = int64_t{1} << 15;
  if (n <= kCached || top == 0) {
    parts.bounds.push_back(n);
    return parts;
  }
  Counts c = histogram(key, n, top);
  const Counts sizes = c;
  scatter(key, at, n, top, &c, parts.key_tmp.data(), parts.at_tmp.data());
  parts.split = true;
  for (int p = 0; p < 256; ++p) {
    if (sizes[p] > 0) parts.bounds.push_back(c[p]);  // c[p]: the part's end
  }
  return parts;
}

// Sorts part p of o (see split_ordered). Parts touch disjoint entries.
inline void sort_part(Ordered* o, Parts* parts, int64_t p) {
  const int64_t begin = parts->bounds[p], n = parts->bounds[p + 1] - begin;
  if (parts->split) {  // back from the scratch, while it is in cache
    std::copy_n(parts->key_tmp.begin() + begin, n, o->key.begin() + begin);
    std::copy_n(parts->at_tmp.begin() + begin, n, o->at.begin() + begin);
  }
  sort_detail::msd(o->key.data() + begin, o->at.data() + begin, n,
                   parts->key_tmp.data() + begin, parts->at_tmp.data() + begin);
}

// Sorts all of o's entries by key, stably (equal keys keep their input order).
inline void sort_ordered(Ordered* o) {
  Parts parts = split_ordered(o);
  for (int64_t p = 0; p < parts.count(); ++p) sort_part(o, &parts, p);
}

}  // namespace jaxembed

#endif  // JAXEMBED_CSRC_SORT_H_
