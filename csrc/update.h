// The row-wise optimizers' update body (sparse_update.cc groups the entries): for each distinct
// row u of [begin, end), its entries' values are summed in their order, in the table's type
// (the reference's coalesce), and the optimizer's step is applied to that row of the table and
// of its state, in place. Every distinct row belongs to exactly one range, so no two threads
// touch one row. Included by isa.cc inside its ISA's namespace.
//
// The arithmetic is the pure-JAX optimizers' (jaxembed/sparse/_optimizers.py), in the same
// order, with the same float32 constants (the reference's Python floats are weakly typed, so
// they round to float32 where they meet float32 values). Float32 and float64 tables only:
// the handler refuses the others, which keep the reference path.

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "common.h"

namespace jaxembed {
namespace JAXEMBED_ISA {

template <typename T, typename Idx>
void update_t(const UpdateArgs& a, int64_t begin, int64_t end) {
  const int64_t dim = a.dim;
  T* table = static_cast<T*>(a.table);
  const T* values = static_cast<const T*>(a.values);
  const Idx* ids = static_cast<const Idx*>(a.ids);
  const T* row_rate = static_cast<const T*>(a.row_rate);
  const T rate = static_cast<T>(a.rate);
  const T eps = static_cast<T>(a.eps);
  const T one_minus_b1 = static_cast<T>(1.0 - a.b1);
  const T one_minus_b2 = static_cast<T>(1.0 - a.b2);
  const T weight_decay = static_cast<T>(a.weight_decay);
  const T sign = a.maximize ? T(-1) : T(1);
  const T* factor = static_cast<const T*>(a.factor);
  std::vector<T> sum_(dim), zeros_(dim, T(0));
  T* __restrict g = sum_.data();
  // entry e's value added into g (FIRST: written), in the reference's arithmetic: its row of
  // `values`, or its bag's gradient times its factor, the product rounded (see UpdateArgs)
  auto add_entry = [&](int32_t e, auto first) {
    constexpr bool kFirst = decltype(first)::value;
    if (a.bag == nullptr) {
      const T* __restrict v = values + static_cast<int64_t>(e) * dim;
      for (int64_t d = 0; d < dim; ++d) g[d] = kFirst ? v[d] : g[d] + v[d];
      return;
    }
    const int64_t b = a.bag[e];
    const bool inside = static_cast<uint64_t>(b) < static_cast<uint64_t>(a.bags);
    const T* __restrict src = inside ? values + b * dim : zeros_.data();
    const T f = factor[e];
    if (a.pos == nullptr || !inside) {
      for (int64_t d = 0; d < dim; ++d) g[d] = kFirst ? src[d] * f : g[d] + src[d] * f;
    } else {  // a max bag: only the columns this entry holds the maximum of
      const int32_t* __restrict at = a.pos + b * dim;
      for (int64_t d = 0; d < dim; ++d) {
        const T v = (at[d] == e ? src[d] : T(0)) * f;
        g[d] = kFirst ? v : g[d] + v;
      }
    }
  };
  // what the next rows and entries read, asked for ahead: the table and state rows are written
  // too, and the values (a bag's gradient, an entry's row) are read in an order of their own
  constexpr int64_t kRowsAhead = 4, kEntriesAhead = 8;
  const int64_t entries = a.first[a.unique];
  auto prefetch_row = [&](int64_t u) {
    const int64_t next = static_cast<int64_t>(ids[a.order[a.first[u]]]);
    const char* w = reinterpret_cast<const char*>(table + next * dim);
    for (int64_t b = 0; b < dim * static_cast<int64_t>(sizeof(T)); b += 64) {
      __builtin_prefetch(w + b, 1, 3);
    }
    if (a.optimizer == Optimizer::kRowwiseAdagrad) {
      __builtin_prefetch(static_cast<const T*>(a.state0) + next, 1, 3);
    }
  };
  auto prefetch_entry = [&](int64_t k) {
    const int32_t e = a.order[k];
    int64_t at = e;
    if (a.bag != nullptr) {
      at = a.bag[e];
      if (static_cast<uint64_t>(at) >= static_cast<uint64_t>(a.bags)) return;
    }
    const char* v = reinterpret_cast<const char*>(values + at * dim);
    for (int64_t b = 0; b < dim * static_cast<int64_t>(sizeof(T)); b += 64) {
      __builtin_prefetch(v + b, 0, 3);
    }
  };
  for (int64_t u = begin; u < end; ++u) {
    const int64_t lo = a.first[u], hi = a.first[u + 1];
    if (u + kRowsAhead < end) prefetch_row(u + kRowsAhead);
    const int32_t head = a.order[lo];  // the row's first entry
    const int64_t row = static_cast<int64_t>(ids[head]);
    // the duplicates, summed into the first entry in their order
    for (int64_t k = lo; k < hi; ++k) {
      if (k + kEntriesAhead < entries) prefetch_entry(k + kEntriesAhead);
      if (k == lo) {
        add_entry(a.order[k], std::true_type{});
      } else {
        add_entry(a.order[k], std::false_type{});
      }
    }
    // the row's rate: the step size times its table's lr_scale
    const T r = row_rate != nullptr ? rate * row_rate[head] : rate;
    T* __restrict w = table + row * dim;
    switch (a.optimizer) {
      case Optimizer::kSgd: {
        // ``w + g * -rate``, which XLA contracts to one fused multiply-add
        const T step = a.maximize ? r : -r;
        for (int64_t d = 0; d < dim; ++d) w[d] = std::fma(g[d], step, w[d]);
        break;
      }
      case Optimizer::kAdagrad: {
        T* __restrict acc = static_cast<T*>(a.state0) + row * dim;
        for (int64_t d = 0; d < dim; ++d) {
          const T gd = g[d] * sign;
          const T s = acc[d] + gd * gd;
          const T std_ = std::sqrt(s) + eps;
          w[d] = w[d] + gd / std_ * -r;
          acc[d] = s;
        }
        break;
      }
      case Optimizer::kRowwiseAdagrad: {
        T* __restrict acc = static_cast<T*>(a.state0) + row;
        for (int64_t d = 0; d < dim; ++d) {
          T gd = g[d] * sign;
          if (a.weight_decay != 0) gd = gd + weight_decay * w[d];
          g[d] = gd;
        }
        // the squares summed in kPartial interleaved partial sums (XLA's reduction also sums in
        // vector lanes, in an order of its own): one running sum would make a chain of dim
        // dependent additions, a third of the step (measured)
        constexpr int kPartial = 16;
        T partial[kPartial] = {};
        int64_t d = 0;
        for (; d + kPartial <= dim; d += kPartial) {
          for (int i = 0; i < kPartial; ++i) partial[i] = std::fma(g[d + i], g[d + i], partial[i]);
        }
        for (int i = 0; d < dim; ++d, ++i) partial[i] = std::fma(g[d], g[d], partial[i]);
        T squares = 0;
        for (int i = 0; i < kPartial; ++i) squares += partial[i];
        const T s = *acc + squares / static_cast<T>(dim > 0 ? dim : 1);
        const T multiplier = r / (std::sqrt(s) + eps);
        for (int64_t d = 0; d < dim; ++d) w[d] = w[d] + g[d] * -multiplier;
        *acc = s;
        break;
      }
      case Optimizer::kLazyAdam: {
        T* __restrict mu = static_cast<T*>(a.state0) + row * dim;
        T* __restrict nu = static_cast<T*>(a.state1) + row * dim;
        for (int64_t d = 0; d < dim; ++d) {
          const T gd = g[d] * sign;
          const T m = std::fma(gd - mu[d], one_minus_b1, mu[d]);
          const T n = std::fma(std::fma(gd, gd, -nu[d]), one_minus_b2, nu[d]);
          w[d] = w[d] + m / (std::sqrt(n) + eps) * -r;
          mu[d] = m;
          nu[d] = n;
        }
        break;
      }
    }
  }
}

inline void update(const UpdateArgs& a, int64_t begin, int64_t end) {
  if (a.dtype == Dtype::kF64) {
    return a.ids64 ? update_t<double, int64_t>(a, begin, end)
                   : update_t<double, int32_t>(a, begin, end);
  }
  return a.ids64 ? update_t<float, int64_t>(a, begin, end)
                 : update_t<float, int32_t>(a, begin, end);
}

}  // namespace JAXEMBED_ISA
}  // namespace jaxembed
