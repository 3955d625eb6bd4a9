// jaxembed's CPU kernels: what every kernel file shares.
//
// The kernels are reached through the XLA FFI (one handler a file: bag_sum.cc, bag_max.cc,
// gather.cc, sparse_update.cc). Each handler checks its buffers, fills one of the argument
// structs below, and runs a kernel body (kernels.h) over ranges of its work on XLA's own
// intra-op thread pool. The bodies are compiled once per instruction set (isa.cc: generic,
// AVX2, AVX-512) and picked at run time (dispatch.cc); nothing is compiled for the build
// machine's CPU alone.
//
// Reading and writing stay inside the buffers: every id is compared against the table's rows
// (one unsigned compare) before its row is touched, and bag bounds are clamped to the entries.

#ifndef JAXEMBED_CSRC_COMMON_H_
#define JAXEMBED_CSRC_COMMON_H_

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace jaxembed {

namespace ffi = xla::ffi;

// The element types a table (or an optimizer state) may hold.
enum class Dtype : int32_t { kF32 = 0, kBF16 = 1, kF16 = 2, kF64 = 3 };

inline bool dtype_of(ffi::DataType t, Dtype* out) {
  switch (t) {
    case ffi::DataType::F32: *out = Dtype::kF32; return true;
    case ffi::DataType::BF16: *out = Dtype::kBF16; return true;
    case ffi::DataType::F16: *out = Dtype::kF16; return true;
    case ffi::DataType::F64: *out = Dtype::kF64; return true;
    default: return false;
  }
}

// How a table's rows are stored: floats of `Dtype`, or packed rows (jaxembed.quantized): 8, 4 or
// 2-bit codes with a scale and bias, or fp8 codes with a scale.
constexpr int32_t kFormatFloat = 0;
constexpr int32_t kFormatE4M3 = 10;
constexpr int32_t kFormatE5M2 = 11;

// A bag reduction (bag_sum.cc, bag_max.cc) or a row gather (gather.cc). Bag b pools the kept
// entries j in [starts[b], ends[b]) (clamped to [0, n)); an entry's id outside [0, rows) reads
// a row of `fill` (NaN: an out-of-range id under jit; 0: a row another device holds).
struct BagArgs {
  Dtype dtype;          // the output's element type (a float table's own)
  int32_t format;       // kFormatFloat, 8, 4, 2, kFormatE4M3 or kFormatE5M2
  const void* table;    // (rows, dim) floats, or (rows, row_bytes) uint8 packed rows
  int64_t rows, dim, row_bytes;
  const void* ids;      // (n,) int32, or int64 when ids64
  bool ids64;
  const bool* keep;     // (n,) or null: every entry kept
  const void* weights;  // (n,) in the accumulator's type (float, double for f64), or null
  const int32_t* starts;  // (bags,)
  const int32_t* ends;    // (bags,)
  int64_t n, bags;
  double fill;
  bool mean;            // bag_sum: divide by the kept count (at least 1)
  void* out;            // (bags, dim) in `dtype`; gather: (n, dim)
  int32_t* pos;         // bag_max: (bags, dim) the first maximal entry, -1 if none
};

// A row-wise optimizer step (sparse_update.cc): the entries' duplicates summed in their order,
// then each distinct row updated once, by one thread.
enum class Optimizer : int32_t { kSgd = 0, kAdagrad = 1, kRowwiseAdagrad = 2, kLazyAdam = 3 };

struct UpdateArgs {
  Optimizer optimizer;
  Dtype dtype;           // the table's; (V, D) states share it
  void* table;           // (rows, dim), updated in place
  int64_t rows, dim;
  void* state0;          // adagrad: sum (V, D); rowwise_adagrad: sum (V,) in acc; adam: mu
  void* state1;          // adam: nu (V, D)
  const void* ids;       // (n,) int32 or int64
  bool ids64;
  const void* values;    // (n, dim) in `dtype`; with `bag`, (bags, dim): each bag's gradient
  int64_t n;
  // A pooled gradient, spread as the reference's spread (jaxembed/core/_bag.py) spreads it:
  // entry k's value is values[bag[k]] * factor[k] (0 * factor[k] for a bag outside [0, bags)),
  // and with `pos` (a max bag) only in the columns d where pos[bag[k] * dim + d] == k.
  const int32_t* bag;    // (n,) or null: the values are per entry
  const void* factor;    // (n,) in `dtype`
  const int32_t* pos;    // (bags, dim) or null
  int64_t bags;
  const void* row_rate;  // (n,) per entry factor on the rate in the acc type, or null
  double rate;           // sgd: lr; adagrad: clr; rowwise: lr; adam: step size
  double eps, b1, b2, weight_decay;
  bool maximize;
  bool rounding;         // stochastic rounding of a bf16 / f16 table
  uint32_t rounding_key;
  // the grouping, computed by the handler: `order` lists the kept entries by row (stable, so
  // a row's entries stay in their order), `first[u]..first[u+1]` is distinct row u's run
  const int32_t* order;
  const int64_t* first;
  int64_t unique;
};

using BagFn = void (*)(const BagArgs&, int64_t begin, int64_t end);
using UpdateFn = void (*)(const UpdateArgs&, int64_t begin, int64_t end);

// One instruction set's kernel bodies (isa.cc).
struct Kernels {
  const char* isa;
  BagFn bag_sum;   // bags [begin, end)
  BagFn bag_max;   // bags [begin, end)
  BagFn gather;    // entries [begin, end)
  UpdateFn update; // distinct rows [begin, end)
};

// The best kernels this CPU runs (dispatch.cc), and their instruction set's name.
const Kernels& kernels();

// Runs fn(begin, end) over [0, total) in `parts` ranges of about equal `weight` (a prefix sum
// of the work of each unit, `cumulative[i]` the work before unit i, size total + 1; null:
// equal units), on XLA's thread pool when the work is large enough, inline otherwise. Returns
// an ffi::Future that XLA waits on: the handler never blocks a pool thread.
template <typename Fn>
ffi::Future run_split(ffi::ThreadPool& pool, int64_t total, int64_t work,
                      const int64_t* cumulative, Fn fn) {
  // about 2^17 element operations per task: below it a task costs more than it saves
  constexpr int64_t kTaskWork = int64_t{1} << 17;
  int64_t threads = pool.num_threads();
  int64_t parts = std::min<int64_t>(std::max<int64_t>(work / kTaskWork, 1), 4 * threads);
  parts = std::min<int64_t>(parts, std::max<int64_t>(total, 1));
  if (parts <= 1 || threads <= 1) {
    fn(0, total);
    ffi::Promise promise;
    promise.SetAvailable();
    return ffi::Future(promise);
  }
  std::vector<int64_t> cuts(parts + 1, total);
  cuts[0] = 0;
  for (int64_t p = 1; p < parts; ++p) {
    if (cumulative == nullptr) {
      cuts[p] = total * p / parts;
    } else {  // the first unit whose prefix reaches p / parts of the work
      int64_t target = cumulative[total] * p / parts;
      cuts[p] = std::lower_bound(cumulative, cumulative + total + 1, target) - cumulative;
      cuts[p] = std::clamp(cuts[p], cuts[p - 1], total);
    }
  }
  ffi::CountDownPromise done(parts);
  for (int64_t p = 0; p < parts; ++p) {
    int64_t begin = cuts[p], end = cuts[p + 1];
    pool.Schedule([fn, begin, end, done]() mutable {
      if (begin < end) fn(begin, end);
      done.CountDown();
    });
  }
  return ffi::Future(done);
}

inline ffi::Error invalid(const std::string& what) {
  return ffi::Error::InvalidArgument("jaxembed kernel: " + what);
}

}  // namespace jaxembed

#endif  // JAXEMBED_CSRC_COMMON_H_
