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
#if defined(__x86_64__)
#include <immintrin.h>
#endif
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

// a row is prefetched when the loop is `kAhead` entries before it (16, as FBGEMM: 8 and 32 were
// no faster on a 2-core EPYC), across bag boundaries in the bag bodies (a bag of 16 would
// otherwise never have its first rows prefetched)
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

constexpr int kVectorBytes = JAXEMBED_VECTOR_BYTES;

// -- vectors: GCC's vector extensions, one ISA's width (16, 32 or 64 bytes) ----------------------

typedef float VecF __attribute__((vector_size(kVectorBytes)));
typedef double VecD __attribute__((vector_size(kVectorBytes)));
typedef int32_t MaskF __attribute__((vector_size(kVectorBytes)));  // a VecF comparison's lanes
typedef int64_t MaskD __attribute__((vector_size(kVectorBytes)));
typedef uint32_t U32Vec __attribute__((vector_size(kVectorBytes)));
typedef uint16_t U16Half __attribute__((vector_size(kVectorBytes / 2)));
typedef _Float16 F16Half __attribute__((vector_size(kVectorBytes / 2)));
template <typename A>
struct Vectors;
template <>
struct Vectors<float> {
  using V = VecF;
  using M = MaskF;
  using MI = int32_t;
};
template <>
struct Vectors<double> {
  using V = VecD;
  using M = MaskD;
  using MI = int64_t;
};
template <typename A>
using Vec = typename Vectors<A>::V;
template <typename A>
constexpr int kLanes = kVectorBytes / static_cast<int>(sizeof(A));
constexpr int kFloatLanes = kLanes<float>;

template <typename A>
inline Vec<A> load_vec(const A* p) {
  Vec<A> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline VecF load_vec(const BF16* p) {
  U16Half h;
  std::memcpy(&h, p, sizeof h);
  U32Vec w = __builtin_convertvector(h, U32Vec) << 16;
  VecF f;
  std::memcpy(&f, &w, sizeof f);
  return f;
}
inline VecF load_vec(const _Float16* p) {
  F16Half h;
  std::memcpy(&h, p, sizeof h);
  return __builtin_convertvector(h, VecF);
}
// every lane x (a broadcast; `V{} + x` would turn a -0.0 into +0.0)
template <typename V, typename S>
inline V splat(S x) {
  V v;
#pragma GCC unroll 16
  for (int i = 0; i < static_cast<int>(sizeof(V) / sizeof(v[0])); ++i) v[i] = x;
  return v;
}
// by value, so that the vector a caller stores need not live in memory
template <typename A, typename V>
inline void store_vec(A* p, V v) {
  std::memcpy(p, &v, sizeof v);
}

#if defined(__FMA__) || defined(__AVX512F__)
constexpr bool kHasFma = true;
#else
constexpr bool kHasFma = false;
#endif

// a * b + c rounded once (the weighted bag: as XLA contracts the reference's)
template <typename A>
inline Vec<A> fused(Vec<A> a, Vec<A> b, Vec<A> c) {
#if defined(__AVX512F__)
  if constexpr (kVectorBytes == 64 && std::is_same_v<A, float>) return _mm512_fmadd_ps(a, b, c);
  if constexpr (kVectorBytes == 64 && std::is_same_v<A, double>) return _mm512_fmadd_pd(a, b, c);
#endif
#if defined(__FMA__)
  if constexpr (kVectorBytes == 32 && std::is_same_v<A, float>) return _mm256_fmadd_ps(a, b, c);
  if constexpr (kVectorBytes == 32 && std::is_same_v<A, double>) return _mm256_fmadd_pd(a, b, c);
#endif
  for (int k = 0; k < kLanes<A>; ++k) c[k] = std::fma(a[k], b[k], c[k]);
  return c;
}

// The codes of kFloatLanes consecutive BITS-bit values (BITS = 2 or 4, or 8) from `p`, which
// holds exactly kFloatLanes * BITS / 8 bytes of them, as int32 lanes: each lane takes the 32-bit
// word its code is in, shifted down (AVX2's variable shifts; plain code elsewhere).
template <int BITS>
inline MaskF unpack_codes(const uint8_t* p) {
  constexpr int bytes = kFloatLanes * BITS / 8, per_word = 32 / BITS;
  constexpr uint32_t mask = (uint32_t{1} << BITS) - 1;
  uint32_t words[(bytes + 3) / 4] = {};
  std::memcpy(words, p, bytes);
  U32Vec v, shift;
#pragma GCC unroll 16
  for (int i = 0; i < kFloatLanes; ++i) {
    v[i] = words[i / per_word];
    shift[i] = static_cast<uint32_t>(BITS * (i % per_word));
  }
  return reinterpret_cast<MaskF>((v >> shift) & mask);
}

// -- row readers: a float table's rows in place, a packed row decoded ----------------------------
//
// Every body reads rows through one of these. row(id, scratch) is a row's dim values: in the
// table itself (a float table), or decoded into `scratch` (a packed row). The fast bodies read
// a vector at a time instead: handle(id, lo) (or fill_handle(lo), a row of `fill` for an id
// outside the table) and load(handle, k), the kFloatLanes values from column lo + k, decoded in
// registers; prefetch<COLUMNS>(id, lo) asks for the cache lines of COLUMNS values from lo.

template <int LINES>
inline void prefetch_lines(const void* row) {
  const char* p = static_cast<const char*>(row);
#pragma GCC unroll 16
  for (int k = 0; k < LINES; ++k) __builtin_prefetch(p + 64 * k, 0, 3);
}

template <typename T>
struct FloatRows {
  using Elem = T;
  using Handle = const T*;
  const T* table;
  int64_t dim;
  std::vector<T> fill_row;  // filled by the fast bodies' constructor only
  explicit FloatRows(const BagArgs& a) : table(static_cast<const T*>(a.table)), dim(a.dim) {}
  FloatRows(const BagArgs& a, bool with_fill)
      : FloatRows(a) {
    fill_row.assign(dim, narrow<T>(static_cast<typename Acc<T>::type>(a.fill)));
  }
  const void* address(int64_t id) const { return table + id * dim; }
  int64_t bytes() const { return dim * static_cast<int64_t>(sizeof(T)); }
  const T* row(int64_t id, float*) const { return table + id * dim; }
  Handle handle(int64_t id, int64_t lo) const { return table + id * dim + lo; }
  Handle fill_handle(int64_t lo) const { return fill_row.data() + lo; }
  auto load(Handle h, int64_t k) const { return load_vec(h + k); }
  // the lines of `COLUMNS` values from column lo's line (a compile-time count: a loop over a
  // run-time one costs more than the prefetches, measured). Rows that do not start on a line
  // miss their last few bytes; one more line would cost aligned rows a quarter more traffic
  // (a line of another row, for D = 128 and float32: measured 20% slower)
  template <int COLUMNS>
  void prefetch(int64_t id, int64_t lo) const {
    constexpr int lines = (COLUMNS * static_cast<int>(sizeof(T)) + 63) / 64;
    const auto at = reinterpret_cast<uintptr_t>(table + id * dim + lo);
    prefetch_lines<lines>(reinterpret_cast<const void*>(at & ~uintptr_t{63}));
  }
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

// A packed table (jaxembed/quantized/_format.py): a value is ``code * scale + bias`` in float32,
// the product rounded before the sum, as the reference decodes it (fp8: ``value(code) * scale``).
// A row is its codes, then its scale and bias (float32 at 8 bits and fp8, which has no bias;
// float16 at 4 and 2 bits). FORMAT is the format the body is compiled for: 8, 4, 2, or
// kFormatE4M3 for either fp8 (whose values come from the table of `format`).
template <int FORMAT>
struct PackedRows {
  using Elem = float;
  // a row's codes from column lo, and its scale and bias as vectors
  struct Handle {
    const uint8_t* codes;
    VecF scale, bias;
  };
  const uint8_t* data;
  int64_t dim, width;
  int32_t format;
  const float* fp8;
  std::vector<uint8_t> fill_codes;  // the fill handle's codes (fast bodies)
  float fill_scale = 0, fill_bias = 0;
  explicit PackedRows(const BagArgs& a)
      : data(static_cast<const uint8_t*>(a.table)),
        dim(a.dim),
        width(a.row_bytes),
        format(a.format),
        fp8(a.format >= kFormatE4M3 ? fp8_values(a.format) : nullptr) {}
  // The fill row: codes 0 scaled by 0 plus the fill; for fp8 (no bias), the code of 0 or NaN
  // (0x7f in both fp8 formats) scaled by 1.
  PackedRows(const BagArgs& a, bool with_fill) : PackedRows(a) {
    const bool nan = a.fill != a.fill;
    if constexpr (FORMAT >= kFormatE4M3) {
      fill_codes.assign(width, nan ? 0x7f : 0);
      fill_scale = 1;
    } else {
      fill_codes.assign(width, 0);
      fill_bias = static_cast<float>(a.fill);
    }
  }
  const void* address(int64_t id) const { return data + id * width; }
  int64_t bytes() const { return width; }
  static constexpr int kBits = FORMAT >= kFormatE4M3 ? 8 : FORMAT;
  // the codes of column `col` start at byte col * bits / 8
  static int64_t code_byte(int64_t col) { return col * kBits / 8; }
  Handle handle(int64_t id, int64_t lo) const {
    const uint8_t* r = data + id * width;
    float scale, bias = 0;
    if constexpr (FORMAT == 8) {
      scale = load_f32(r + dim), bias = load_f32(r + dim + 4);
    } else if constexpr (FORMAT == 4) {
      scale = load_f16(r + dim / 2), bias = load_f16(r + dim / 2 + 2);
    } else if constexpr (FORMAT == 2) {
      scale = load_f16(r + dim / 4), bias = load_f16(r + dim / 4 + 2);
    } else {
      scale = load_f32(r + dim);
    }
    return Handle{r + code_byte(lo), splat<VecF>(scale), splat<VecF>(bias)};
  }
  Handle fill_handle(int64_t lo) const {
    return Handle{fill_codes.data() + code_byte(lo), splat<VecF>(fill_scale), splat<VecF>(fill_bias)};
  }
  // the kFloatLanes values from column lo + k (k a multiple of 4: a code starts a byte)
  VecF load(const Handle& h, int64_t k) const {
    const uint8_t* p = h.codes + code_byte(k);
    if constexpr (FORMAT >= kFormatE4M3) {
#if defined(__AVX512F__)
      if constexpr (kVectorBytes == 64) {
        const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
        return _mm512_i32gather_ps(c, fp8, 4) * h.scale;
      }
#endif
#if defined(__AVX2__)
      if constexpr (kVectorBytes == 32) {
        const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
        return _mm256_i32gather_ps(fp8, c, 4) * h.scale;
      }
#endif
      VecF v;
#pragma GCC unroll 16
      for (int i = 0; i < kFloatLanes; ++i) v[i] = fp8[p[i]];
      return v * h.scale;
    } else {
      MaskF codes;
#if defined(__AVX512F__)
      if constexpr (FORMAT == 8 && kVectorBytes == 64) {
        codes = reinterpret_cast<MaskF>(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
      } else
#endif
#if defined(__AVX2__)
      if constexpr (FORMAT == 8 && kVectorBytes == 32) {
        codes = reinterpret_cast<MaskF>(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
      } else
#endif
      {
        codes = unpack_codes<FORMAT>(p);
      }
      const VecF values = __builtin_convertvector(codes, VecF);
      // a 4 or 2-bit code times a float16 scale is exact, so one fused multiply-add rounds as
      // the product and sum do: the same values, one instruction fewer where there is FMA
      if constexpr (FORMAT != 8 && kHasFma) return fused<float>(values, h.scale, h.bias);
      return values * h.scale + h.bias;
    }
  }
  const float* row(int64_t id, float* __restrict out) const {
    const uint8_t* __restrict r = data + id * width;
    if constexpr (FORMAT == 8) {
      const float scale = load_f32(r + dim), bias = load_f32(r + dim + 4);
      for (int64_t d = 0; d < dim; ++d) out[d] = static_cast<float>(r[d]) * scale + bias;
    } else if constexpr (FORMAT == 4) {
      const float scale = load_f16(r + dim / 2), bias = load_f16(r + dim / 2 + 2);
      for (int64_t k = 0; k < dim / 2; ++k) {
        out[2 * k] = static_cast<float>(r[k] & 15) * scale + bias;
        out[2 * k + 1] = static_cast<float>(r[k] >> 4) * scale + bias;
      }
    } else if constexpr (FORMAT == 2) {
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
  // a packed row is short (its scale and bias at its end): the whole row, on the first chunk
  template <int COLUMNS>
  void prefetch(int64_t id, int64_t lo) const {
    if (lo == 0) {
      const auto first = reinterpret_cast<uintptr_t>(data + id * width);
      for (uintptr_t p = first & ~uintptr_t{63}; p < first + width; p += 64) {
        __builtin_prefetch(reinterpret_cast<const void*>(p), 0, 3);
      }
    }
  }
};

// -- the fast bodies: a chunk of a bag's output row held in vector registers ----------------------
//
// A row of `dim` values (at least one vector wide) is reduced a chunk of NV vectors at a time: NV
// accumulators in registers (at most kSumVectors for a sum, kMaxVectors for a max, which also
// keeps a position and a NaN flag a lane), the bag's entries read once per chunk (see Chunk for
// where its vectors read). Near the row's end the vectors overlap, so any width needs no mask and
// no branch (an overlapped column is reduced in each, in the same order, to the same value). Each
// entry's chunk is prefetched kAhead entries ahead, across bag boundaries, as FBGEMM's
// EmbeddingSpMDM does. An id outside the table reads a row of `fill` (NaN, or 0: a row another
// device holds).

// 8 of AVX2's (and SSE's, NEON's) 16 vector registers, 16 of AVX-512's 32: more spill (measured)
constexpr int kSumVectors = kVectorBytes >= 64 ? 16 : 8;
constexpr int kMaxVectors = kSumVectors / 2;

// Where a chunk's vectors read. A row at least NV vectors wide is covered by full chunks: vector
// k of the chunk at column c reads from c + k * lanes, and the last chunk starts at dim - NV *
// lanes (overlapping the one before it). A narrower row is one chunk whose vector k reads from
// min(k * lanes, dim - lanes). FULL is a template parameter, so that a full chunk's offsets are
// constants.
template <typename A, int NV, bool FULL>
struct Chunk {
  static constexpr int64_t kColumns = int64_t{NV} * kLanes<A>;
  static constexpr bool kFull = FULL;
  int64_t lo, hi, last;  // the columns [lo, hi) the chunk computes
  Chunk(int64_t c, int64_t dim)
      : lo(FULL ? std::min(c, dim - kColumns) : 0), hi(FULL ? lo + kColumns : dim),
        last(std::max<int64_t>(dim - kLanes<A>, 0)) {}
  int64_t at(int k) const {  // where vector k reads, from lo
    return FULL ? int64_t{k} * kLanes<A> : std::min<int64_t>(int64_t{k} * kLanes<A>, last);
  }
};

// Runs chunk_body(Chunk) over the chunks of a row of `dim` columns.
template <typename A, int NV, typename Body>
inline void for_chunks(int64_t dim, Body chunk_body) {
  constexpr int64_t columns = int64_t{NV} * kLanes<A>;
  if (dim >= columns) {
    for (int64_t c = 0; c < dim; c += columns) chunk_body(Chunk<A, NV, true>(c, dim));
  } else {
    chunk_body(Chunk<A, NV, false>(0, dim));
  }
}

// `result` (a chunk's values, from column lo) rounded into the output row
template <typename Out, typename A>
inline void store_chunk(Out* __restrict o, const A* __restrict result, int64_t lo, int64_t hi) {
  if constexpr (std::is_same_v<Out, A>) {
    std::memcpy(o + lo, result, (hi - lo) * sizeof(A));
  } else {
    for (int64_t d = lo; d < hi; ++d) o[d] = narrow<Out>(result[d - lo]);
  }
}

// The handle of entry j's row chunk, or of the fill row. A float row's handle is its address, as
// one register: GCC would otherwise fold `+ lo` into a loop-invariant register per vector, and
// spill (measured: a third slower).
template <typename Rows>
inline auto entry_handle(const Rows& rows_of, int64_t id, int64_t rows, int64_t lo) {
  auto h = in_range(id, rows) ? rows_of.handle(id, lo) : rows_of.fill_handle(lo);
  if constexpr (std::is_pointer_v<decltype(h)>) asm("" : "+r"(h));
  return h;
}

// One chunk of one bag's sum: entries [s, e) reduced over the chunk's columns into `result` (from
// column lo); returns the number of kept entries. Not inlined: the caller's state would crowd
// the accumulators out of the registers.
template <typename Rows, typename Idx, typename A, int NV, bool FULL, bool WEIGHTED>
__attribute__((noinline)) int64_t sum_chunk(const BagArgs& a, const Rows& rows_of, int64_t s,
                                            int64_t e, const Chunk<A, NV, FULL> chunk,
                                            A* __restrict result) {
  using V = Vec<A>;
  constexpr int64_t kColumns = int64_t{NV} * kLanes<A>;
  const A* __restrict w = static_cast<const A*>(a.weights);
  const Idx* __restrict ids = static_cast<const Idx*>(a.ids);
  const bool* __restrict keep = a.keep;
  const int64_t rows = a.rows, n = a.n, lo = chunk.lo;
  V acc[NV] = {};
  int64_t count = 0;
  for (int64_t j = s; j < e; ++j) {
    if (j + kAhead < n) {
      const int64_t ahead = ids[j + kAhead];
      if (in_range(ahead, rows)) rows_of.template prefetch<kColumns>(ahead, lo);
    }
    if (keep != nullptr && !keep[j]) continue;
    ++count;
    const auto h = entry_handle(rows_of, ids[j], rows, lo);
    if constexpr (WEIGHTED) {  // one fused multiply-add an entry, as XLA contracts the reference's
      const V wj = splat<V>(w[j]);
#pragma GCC unroll 16
      for (int k = 0; k < NV; ++k) acc[k] = fused<A>(V(rows_of.load(h, chunk.at(k))), wj, acc[k]);
    } else {
#pragma GCC unroll 16
      for (int k = 0; k < NV; ++k) acc[k] += rows_of.load(h, chunk.at(k));
    }
  }
  if (a.mean) {
    const V divisor = splat<V>(static_cast<A>(std::max<int64_t>(count, 1)));
#pragma GCC unroll 16
    for (int k = 0; k < NV; ++k) acc[k] = acc[k] / divisor;
  }
#pragma GCC unroll 16
  for (int k = 0; k < NV; ++k) store_vec(result + chunk.at(k), acc[k]);
  return count;
}

template <typename Rows, typename Out, typename Idx, int NV, bool WEIGHTED>
void bag_sum_fast_t(const BagArgs& a, int64_t begin, int64_t end) {
  using A = typename Acc<Out>::type;
  const Rows rows_of(a, true);
  Out* out = static_cast<Out*>(a.out) ;
  alignas(64) A result[int64_t{NV} * kLanes<A>];
  for (int64_t b = begin; b < end; ++b) {
    int64_t s, e;
    bounds(a, b, &s, &e);
    for_chunks<A, NV>(a.dim, [&](const auto chunk) {
      sum_chunk<Rows, Idx, A, NV, decltype(chunk)::kFull, WEIGHTED>(a, rows_of, s, e, chunk, result);
      store_chunk(out + b * a.dim, result, chunk.lo, chunk.hi);
    });
  }
}

template <typename Rows, typename Out, typename Idx, int NV>
void bag_sum_fast(const BagArgs& a, int64_t begin, int64_t end) {
  if (a.weights != nullptr) return bag_sum_fast_t<Rows, Out, Idx, NV, true>(a, begin, end);
  return bag_sum_fast_t<Rows, Out, Idx, NV, false>(a, begin, end);
}

// One chunk of one bag's max: per column the largest kept value, the first entry holding it
// (strictly greater wins), and whether a NaN was seen, into best / pos / nan (from column lo).
template <typename Rows, typename Idx, typename A, int NV, bool FULL>
__attribute__((noinline)) void max_chunk(const BagArgs& a, const Rows& rows_of, int64_t s,
                                         int64_t e, const Chunk<A, NV, FULL> chunk,
                                         A* __restrict best_out,
                                         typename Vectors<A>::MI* __restrict pos_out,
                                         typename Vectors<A>::MI* __restrict nan_out) {
  using V = Vec<A>;
  using M = typename Vectors<A>::M;  // a comparison's lanes: integers as wide as A
  using MI = typename Vectors<A>::MI;
  constexpr int64_t kColumns = int64_t{NV} * kLanes<A>;
  const Idx* __restrict ids = static_cast<const Idx*>(a.ids);
  const bool* __restrict keep = a.keep;
  const int64_t rows = a.rows, n = a.n, lo = chunk.lo;
  V best[NV];
  M pos[NV], nan[NV];
#pragma GCC unroll 16
  for (int k = 0; k < NV; ++k) {
    best[k] = splat<V>(-std::numeric_limits<A>::infinity());
    pos[k] = splat<M>(MI{-1});
    nan[k] = M{};
  }
  for (int64_t j = s; j < e; ++j) {
    if (j + kAhead < n) {
      const int64_t ahead = ids[j + kAhead];
      if (in_range(ahead, rows)) rows_of.template prefetch<kColumns>(ahead, lo);
    }
    if (keep != nullptr && !keep[j]) continue;
    const auto h = entry_handle(rows_of, ids[j], rows, lo);
    const M here = splat<M>(static_cast<MI>(j));
#pragma GCC unroll 16
    for (int k = 0; k < NV; ++k) {
      const V v = rows_of.load(h, chunk.at(k));
      const M better = v > best[k];
      best[k] = better ? v : best[k];
      pos[k] = better ? here : pos[k];
      nan[k] |= (v != v);
    }
  }
#pragma GCC unroll 16
  for (int k = 0; k < NV; ++k) {
    store_vec(best_out + chunk.at(k), best[k]);
    store_vec(pos_out + chunk.at(k), pos[k]);
    store_vec(nan_out + chunk.at(k), nan[k]);
  }
}

template <typename Rows, typename Out, typename Idx, int NV>
void bag_max_fast(const BagArgs& a, int64_t begin, int64_t end) {
  using A = typename Acc<Out>::type;
  using MI = typename Vectors<A>::MI;
  constexpr int64_t kColumns = int64_t{NV} * kLanes<A>;
  const Rows rows_of(a, true);
  Out* out = static_cast<Out*>(a.out);
  alignas(64) A best[kColumns];
  alignas(64) MI pos[kColumns];
  alignas(64) MI nan[kColumns];
  for (int64_t b = begin; b < end; ++b) {
    int64_t s, e;
    bounds(a, b, &s, &e);
    for_chunks<A, NV>(a.dim, [&](const auto chunk) {
      max_chunk<Rows, Idx, A, NV, decltype(chunk)::kFull>(a, rows_of, s, e, chunk, best, pos, nan);
      Out* __restrict o = out + b * a.dim;
      int32_t* __restrict p = a.pos + b * a.dim;
      for (int64_t d = chunk.lo; d < chunk.hi; ++d) {
        const int64_t i = d - chunk.lo;
        A v = nan[i] ? std::numeric_limits<A>::quiet_NaN() : (pos[i] >= 0 ? best[i] : A(0));
        o[d] = narrow<Out>(v);
        p[d] = static_cast<int32_t>(pos[i]);
      }
    });
  }
}

// The fast body with the fewest vectors (a power of two, at most MAX) that hold a row, or MAX
// for a wider row (chunks); false for a row narrower than one vector (the general body then).
template <template <typename, typename, typename, int> class Fast, int MAX, typename Rows,
          typename Out, typename Idx, int NV = 1>
inline bool run_fast(const BagArgs& a, int64_t begin, int64_t end) {
  constexpr int L = kLanes<typename Acc<Out>::type>;
  if (a.dim < L) return false;
  if constexpr (NV < MAX) {
    if (a.dim > NV * L) return run_fast<Fast, MAX, Rows, Out, Idx, 2 * NV>(a, begin, end);
  }
  Fast<Rows, Out, Idx, NV>::run(a, begin, end);
  return true;
}

template <typename Rows, typename Out, typename Idx, int NV>
struct SumFast {
  static void run(const BagArgs& a, int64_t b, int64_t e) { bag_sum_fast<Rows, Out, Idx, NV>(a, b, e); }
};
template <typename Rows, typename Out, typename Idx, int NV>
struct MaxFast {
  static void run(const BagArgs& a, int64_t b, int64_t e) { bag_max_fast<Rows, Out, Idx, NV>(a, b, e); }
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

template <typename K, typename Idx, int FORMAT>
void by_packed_output(const BagArgs& a, int64_t begin, int64_t end) {
  switch (a.dtype) {  // packed rows, decoded to float32, out in `dtype`
    case Dtype::kF32: return K::template run<PackedRows<FORMAT>, float, Idx>(a, begin, end);
    case Dtype::kBF16: return K::template run<PackedRows<FORMAT>, BF16, Idx>(a, begin, end);
    case Dtype::kF16: return K::template run<PackedRows<FORMAT>, _Float16, Idx>(a, begin, end);
    case Dtype::kF64: return;  // refused by the handler
  }
}

template <typename K, typename Idx>
void by_table(const BagArgs& a, int64_t begin, int64_t end) {
  switch (a.format) {
    case kFormatFloat: break;
    case 8: return by_packed_output<K, Idx, 8>(a, begin, end);
    case 4: return by_packed_output<K, Idx, 4>(a, begin, end);
    case 2: return by_packed_output<K, Idx, 2>(a, begin, end);
    default: return by_packed_output<K, Idx, kFormatE4M3>(a, begin, end);  // either fp8
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

// sum and max: the fast body where the row's width fits it, else the general one
template <typename R, typename O, typename I>
void bag_sum_any(const BagArgs& a, int64_t b, int64_t e) {
  if (!run_fast<SumFast, kSumVectors, R, O, I>(a, b, e)) bag_sum_t<R, O, I>(a, b, e);
}
template <typename R, typename O, typename I>
void bag_max_any(const BagArgs& a, int64_t b, int64_t e) {
  if (!run_fast<MaxFast, kMaxVectors, R, O, I>(a, b, e)) bag_max_t<R, O, I>(a, b, e);
}

JAXEMBED_BODY(bag_sum, bag_sum_any)
JAXEMBED_BODY(bag_max, bag_max_any)
JAXEMBED_BODY(gather, gather_t)
#undef JAXEMBED_BODY

}  // namespace JAXEMBED_ISA
}  // namespace jaxembed
