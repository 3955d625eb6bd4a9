// The kernel bodies, as templates over the table's element type. isa.cc includes this file
// once per instruction set, each time inside its own namespace and with its own compiler flags,
// so the same source is vectorised for AVX2, AVX-512 or neither. Compiled with
// -ffp-contract=off: a product is rounded before it is added unless the code says std::fma,
// which it does exactly where XLA contracts the reference's multiply-add into one.
//
// Arithmetic follows jaxembed's pure-JAX path (jaxembed/core/_bag.py, jaxembed/sparse/), which
// stays the reference the kernels are tested against:
// * a bag accumulates its kept entries in order, from zero, in float32 (float64 for float64
//   tables): the sum of the column loop and of the segment reduction alike;
// * a mean divides by the kept count (at least 1), then rounds to the table's type;
// * a max keeps, per column, the first entry holding the maximum (strictly greater wins); a NaN
//   anywhere makes the column NaN; a bag with nothing kept is 0 at position -1.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"

namespace jaxembed {
namespace JAXEMBED_ISA {

// -- element types ----------------------------------------------------------------------------

struct BF16 {
  uint16_t bits;
};

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

inline float widen(float x) { return x; }
inline double widen(double x) { return x; }
inline float widen(_Float16 x) { return static_cast<float>(x); }
inline float widen(BF16 x) {
  uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

template <typename T>
inline T narrow(typename Acc<T>::type x);
template <>
inline float narrow<float>(float x) {
  return x;
}
template <>
inline double narrow<double>(double x) {
  return x;
}
template <>
inline _Float16 narrow<_Float16>(float x) {
  return static_cast<_Float16>(x);  // round to nearest even
}
template <>
inline BF16 narrow<BF16>(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return BF16{static_cast<uint16_t>((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return BF16{static_cast<uint16_t>(u >> 16)};
}

template <typename Idx>
inline bool in_range(Idx id, int64_t rows) {
  return static_cast<uint64_t>(static_cast<int64_t>(id)) < static_cast<uint64_t>(rows);
}

// prefetch every cache line of a row the loop reaches `kAhead` entries later
constexpr int64_t kAhead = 16;

inline void prefetch_bytes(const void* row, int64_t bytes) {
  const char* p = static_cast<const char*>(row);
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b, 0, 3);
}

template <typename Idx>
inline int64_t id_at(const void* ids, int64_t j) {
  return static_cast<int64_t>(static_cast<const Idx*>(ids)[j]);
}

inline void bounds(const BagArgs& a, int64_t b, int64_t* s, int64_t* e) {
  *s = std::clamp<int64_t>(a.starts[b], 0, a.n);
  *e = std::clamp<int64_t>(a.ends[b], *s, a.n);
}

// -- row readers: a float table's rows in place, a packed row decoded ----------------------------

// A float table: row(id) points into the table.
template <typename T>
struct FloatRows {
  using Elem = T;
  const T* table;
  int64_t dim;
  explicit FloatRows(const BagArgs& a) : table(static_cast<const T*>(a.table)), dim(a.dim) {}
  const void* address(int64_t id) const { return table + id * dim; }
  int64_t bytes() const { return dim * static_cast<int64_t>(sizeof(T)); }
  const T* row(int64_t id, float*) const { return table + id * dim; }
};

// The value of each fp8 code (float8_e4m3fn or float8_e5m2) as float32.
inline const float* fp8_values(int32_t format) {
  static const auto make = [](int exponent_bits) {
    std::vector<float> v(256);
    const int mantissa_bits = 7 - exponent_bits, bias = (1 << (exponent_bits - 1)) - 1;
    for (int c = 0; c < 256; ++c) {
      int sign = c >> 7, e = (c >> mantissa_bits) & ((1 << exponent_bits) - 1);
      int m = c & ((1 << mantissa_bits) - 1);
      float x;
      if (exponent_bits == 4 && e == 15 && m == 7) {
        x = std::numeric_limits<float>::quiet_NaN();  // e4m3fn: no infinities, one NaN
      } else if (exponent_bits == 5 && e == 31) {
        x = m ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
      } else if (e == 0) {
        x = std::ldexp(static_cast<float>(m), 1 - bias - mantissa_bits);
      } else {
        x = std::ldexp(static_cast<float>(m + (1 << mantissa_bits)), e - bias - mantissa_bits);
      }
      v[c] = sign ? -x : x;
    }
    return v;
  };
  static const std::vector<float> e4m3 = make(4), e5m2 = make(5);
  return format == kFormatE4M3 ? e4m3.data() : e5m2.data();
}

inline float load_f32(const uint8_t* p) {
  float x;
  std::memcpy(&x, p, sizeof x);
  return x;
}

inline float load_f16(const uint8_t* p) {
  _Float16 x;
  std::memcpy(&x, p, sizeof x);
  return static_cast<float>(x);
}

// A packed table (jaxembed/quantized/_format.py): row(id) decodes the row into `scratch` as
// the reference does, ``code * scale + bias`` in float32 (fp8: ``code * scale``).
struct PackedRows {
  using Elem = float;
  const uint8_t* data;
  int64_t dim, width;
  int32_t format;
  const float* fp8;
  explicit PackedRows(const BagArgs& a)
      : data(static_cast<const uint8_t*>(a.table)),
        dim(a.dim),
        width(a.row_bytes),
        format(a.format),
        fp8(a.format >= kFormatE4M3 ? fp8_values(a.format) : nullptr) {}
  const void* address(int64_t id) const { return data + id * width; }
  int64_t bytes() const { return width; }
  const float* row(int64_t id, float* __restrict out) const {
    const uint8_t* __restrict r = data + id * width;
    if (format == 8) {
      const float scale = load_f32(r + dim), bias = load_f32(r + dim + 4);
      for (int64_t d = 0; d < dim; ++d) out[d] = static_cast<float>(r[d]) * scale + bias;
    } else if (format == 4) {
      const float scale = load_f16(r + dim / 2), bias = load_f16(r + dim / 2 + 2);
      for (int64_t k = 0; k < dim / 2; ++k) {
        out[2 * k] = static_cast<float>(r[k] & 15) * scale + bias;
        out[2 * k + 1] = static_cast<float>(r[k] >> 4) * scale + bias;
      }
    } else if (format == 2) {
      const float scale = load_f16(r + dim / 4), bias = load_f16(r + dim / 4 + 2);
      for (int64_t k = 0; k < dim / 4; ++k) {
        for (int i = 0; i < 4; ++i) {
          out[4 * k + i] = static_cast<float>((r[k] >> (2 * i)) & 3) * scale + bias;
        }
      }
    } else {
      const float scale = load_f32(r + dim);
      for (int64_t d = 0; d < dim; ++d) out[d] = fp8[r[d]] * scale;
    }
    return out;
  }
};

// -- bag sum / mean ---------------------------------------------------------------------------

template <typename Rows, typename Out, typename Idx>
void bag_sum_t(const BagArgs& a, int64_t begin, int64_t end) {
  using A = typename Acc<Out>::type;
  const Rows rows_of(a);
  const int64_t dim = a.dim, rows = a.rows;
  const A* w = static_cast<const A*>(a.weights);
  const A fill = static_cast<A>(a.fill);
  Out* out = static_cast<Out*>(a.out);
  std::vector<A> acc(dim);
  std::vector<float> decoded(dim);
  A* __restrict total = acc.data();
  for (int64_t b = begin; b < end; ++b) {
    int64_t s, e;
    bounds(a, b, &s, &e);
    std::fill(total, total + dim, A(0));
    int64_t count = 0;
    for (int64_t j = s; j < e; ++j) {
      if (j + kAhead < e) {
        int64_t ahead = id_at<Idx>(a.ids, j + kAhead);
        if (in_range(ahead, rows)) prefetch_bytes(rows_of.address(ahead), rows_of.bytes());
      }
      if (a.keep != nullptr && !a.keep[j]) continue;
      ++count;
      int64_t id = id_at<Idx>(a.ids, j);
      if (!in_range(id, rows)) {  // the fill row
        A v = w != nullptr ? fill * w[j] : fill;  // NaN or 0: the fusing does not matter
        for (int64_t d = 0; d < dim; ++d) total[d] += v;
        continue;
      }
      const typename Rows::Elem* __restrict row = rows_of.row(id, decoded.data());
      if (w != nullptr) {  // one fused multiply-add an entry, as XLA contracts the reference's
        const A wj = w[j];
        for (int64_t d = 0; d < dim; ++d) total[d] = std::fma(static_cast<A>(widen(row[d])), wj, total[d]);
      } else {
        for (int64_t d = 0; d < dim; ++d) total[d] += static_cast<A>(widen(row[d]));
      }
    }
    Out* __restrict o = out + b * dim;
    if (a.mean) {
      const A divisor = static_cast<A>(std::max<int64_t>(count, 1));
      for (int64_t d = 0; d < dim; ++d) o[d] = narrow<Out>(total[d] / divisor);
    } else {
      for (int64_t d = 0; d < dim; ++d) o[d] = narrow<Out>(total[d]);
    }
  }
}

// -- bag max ----------------------------------------------------------------------------------

template <typename Rows, typename Out, typename Idx>
void bag_max_t(const BagArgs& a, int64_t begin, int64_t end) {
  using A = typename Acc<Out>::type;
  const Rows rows_of(a);
  const int64_t dim = a.dim, rows = a.rows;
  const A fill = static_cast<A>(a.fill);
  Out* out = static_cast<Out*>(a.out);
  std::vector<A> best_(dim);
  std::vector<int32_t> pos_(dim);
  std::vector<uint8_t> nan_(dim);
  std::vector<float> decoded(dim);
  A* __restrict best = best_.data();
  int32_t* __restrict pos = pos_.data();
  uint8_t* __restrict nan = nan_.data();
  for (int64_t b = begin; b < end; ++b) {
    int64_t s, e;
    bounds(a, b, &s, &e);
    std::fill(best, best + dim, -std::numeric_limits<A>::infinity());
    std::fill(pos, pos + dim, -1);
    std::fill(nan, nan + dim, 0);
    for (int64_t j = s; j < e; ++j) {
      if (j + kAhead < e) {
        int64_t ahead = id_at<Idx>(a.ids, j + kAhead);
        if (in_range(ahead, rows)) prefetch_bytes(rows_of.address(ahead), rows_of.bytes());
      }
      if (a.keep != nullptr && !a.keep[j]) continue;
      int64_t id = id_at<Idx>(a.ids, j);
      const int32_t at = static_cast<int32_t>(j);
      if (!in_range(id, rows)) {
        for (int64_t d = 0; d < dim; ++d) {
          bool better = fill > best[d];
          best[d] = better ? fill : best[d];
          pos[d] = better ? at : pos[d];
          nan[d] |= static_cast<uint8_t>(fill != fill);
        }
        continue;
      }
      const typename Rows::Elem* __restrict row = rows_of.row(id, decoded.data());
      for (int64_t d = 0; d < dim; ++d) {
        A v = static_cast<A>(widen(row[d]));
        bool better = v > best[d];
        best[d] = better ? v : best[d];
        pos[d] = better ? at : pos[d];
        nan[d] |= static_cast<uint8_t>(v != v);
      }
    }
    Out* __restrict o = out + b * dim;
    int32_t* __restrict p = a.pos + b * dim;
    for (int64_t d = 0; d < dim; ++d) {
      A v = nan[d] ? std::numeric_limits<A>::quiet_NaN() : (pos[d] >= 0 ? best[d] : A(0));
      o[d] = narrow<Out>(v);
      p[d] = pos[d];
    }
  }
}

// -- gather -----------------------------------------------------------------------------------

template <typename Rows, typename Out, typename Idx>
void gather_t(const BagArgs& a, int64_t begin, int64_t end) {
  using A = typename Acc<Out>::type;
  const Rows rows_of(a);
  const int64_t dim = a.dim, rows = a.rows;
  Out* out = static_cast<Out*>(a.out);
  const Out fill = narrow<Out>(static_cast<A>(a.fill));
  std::vector<float> decoded(dim);
  for (int64_t j = begin; j < end; ++j) {
    if (j + kAhead < end) {
      int64_t ahead = id_at<Idx>(a.ids, j + kAhead);
      if (in_range(ahead, rows)) prefetch_bytes(rows_of.address(ahead), rows_of.bytes());
    }
    int64_t id = id_at<Idx>(a.ids, j);
    Out* __restrict o = out + j * dim;
    if (!in_range(id, rows)) {
      for (int64_t d = 0; d < dim; ++d) o[d] = fill;
    } else if constexpr (std::is_same_v<typename Rows::Elem, Out>) {
      std::memcpy(o, rows_of.row(id, decoded.data()), dim * sizeof(Out));
    } else {  // a decoded row, rounded to the output's type
      const float* __restrict row = rows_of.row(id, decoded.data());
      for (int64_t d = 0; d < dim; ++d) o[d] = narrow<Out>(row[d]);
    }
  }
}

// -- dispatch on the table's format and types ---------------------------------------------------

template <typename K, typename Idx>
void by_table(const BagArgs& a, int64_t begin, int64_t end) {
  if (a.format != kFormatFloat) {  // packed rows, decoded to float32, out in `dtype`
    switch (a.dtype) {
      case Dtype::kF32: return K::template run<PackedRows, float, Idx>(a, begin, end);
      case Dtype::kBF16: return K::template run<PackedRows, BF16, Idx>(a, begin, end);
      case Dtype::kF16: return K::template run<PackedRows, _Float16, Idx>(a, begin, end);
      case Dtype::kF64: return;  // refused by the handler
    }
  }
  switch (a.dtype) {
    case Dtype::kF32: return K::template run<FloatRows<float>, float, Idx>(a, begin, end);
    case Dtype::kBF16: return K::template run<FloatRows<BF16>, BF16, Idx>(a, begin, end);
    case Dtype::kF16: return K::template run<FloatRows<_Float16>, _Float16, Idx>(a, begin, end);
    case Dtype::kF64: return K::template run<FloatRows<double>, double, Idx>(a, begin, end);
  }
}

template <typename K>
void by_ids(const BagArgs& a, int64_t begin, int64_t end) {
  return a.ids64 ? by_table<K, int64_t>(a, begin, end) : by_table<K, int32_t>(a, begin, end);
}

#define JAXEMBED_BODY(NAME, KERNEL)                                          \
  struct NAME##_body {                                                       \
    template <typename R, typename O, typename I>                            \
    static void run(const BagArgs& a, int64_t b, int64_t e) {                \
      KERNEL<R, O, I>(a, b, e);                                              \
    }                                                                        \
  };                                                                         \
  inline void NAME(const BagArgs& a, int64_t b, int64_t e) { by_ids<NAME##_body>(a, b, e); }

JAXEMBED_BODY(bag_sum, bag_sum_t)
JAXEMBED_BODY(bag_max, bag_max_t)
JAXEMBED_BODY(gather, gather_t)
#undef JAXEMBED_BODY

}  // namespace JAXEMBED_ISA
}  // namespace jaxembed
