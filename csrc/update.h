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
  std::vector<T> sum_(dim);
  T* __restrict g = sum_.data();
  for (int64_t u = begin; u < end; ++u) {
    const int64_t lo = a.first[u], hi = a.first[u + 1];
    const int32_t head = a.order[lo];  // the row's first entry
    const int64_t row = static_cast<int64_t>(ids[head]);
    // the duplicates, summed into the first entry in their order
    const T* __restrict v0 = values + static_cast<int64_t>(head) * dim;
    for (int64_t d = 0; d < dim; ++d) g[d] = v0[d];
    for (int64_t k = lo + 1; k < hi; ++k) {
      const T* __restrict v = values + static_cast<int64_t>(a.order[k]) * dim;
      for (int64_t d = 0; d < dim; ++d) g[d] += v[d];
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
        T squares = 0;
        for (int64_t d = 0; d < dim; ++d) {
          T gd = g[d] * sign;
          if (a.weight_decay != 0) gd = gd + weight_decay * w[d];
          g[d] = gd;
          squares = std::fma(gd, gd, squares);
        }
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
