// jaxembed's CPU kernels: what every kernel file shares.
//
// The kernels are reached through the XLA FFI (one handler a file: bag_sum.cc, bag_max.cc,
// gather.cc, sparse_update.cc; remap.cc, search.cc, argsort.cc, window.cc and evict.cc for
// managed collisions; bucket.cc for the sharded collection's routing). Each handler checks its
// buffers, fills one of the argument structs below (or its own), and runs a kernel body over
// ranges of its work on XLA's own intra-op thread pool. The bag and update bodies (kernels.h) are compiled once per
// instruction set (isa.cc: generic, AVX2, AVX-512) and picked at run time (dispatch.cc);
// nothing is compiled for the build machine's CPU alone.
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
#include <utility>
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
  // and with `pos` (a max bag) only in the columns d where pos[bag[k] * dim + d] == k. bag[k]
  // is the last bag starting at or before k (the handler counts it from the bags' starts).
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
  // the grouping of a task's entries (the handler splits the rows into ranges, a task each):
  // `order` lists its kept entries by row (stable, so a row's entries stay in their order),
  // `first[u]..first[u+1]` is distinct row u's run, of `unique`
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

// How many tasks `work` element operations are worth on `pool`: about 2^17 operations each
// (below it a task costs more than it saves), at most kTasksPerThread per thread. Many small
// tasks rather than one a thread: a thread that loses its core (to another process, or to a
// library's spinning OpenMP threads) then holds back a small part, the rest being taken by the
// other threads (measured: with 2 tasks on 2 cores, a pooled step ran at half speed right after
// an FBGEMM call).
constexpr int64_t kTasksPerThread = 8;
inline int64_t task_count(ffi::ThreadPool& pool, int64_t work) {
  constexpr int64_t kTaskWork = int64_t{1} << 17;
  const int64_t threads = pool.num_threads();
  if (threads <= 1) return 1;
  return std::clamp<int64_t>(work / kTaskWork, 1, kTasksPerThread * threads);
}

// A future that is already available.
inline ffi::Future ready() {
  ffi::Promise promise;
  promise.SetAvailable();
  return ffi::Future(promise);
}

// Runs task(t) for t in [0, tasks) on XLA's thread pool (inline for a single task). Returns an
// ffi::Future that XLA waits on: the handler never blocks a pool thread.
template <typename Fn>
ffi::Future run_tasks(ffi::ThreadPool& pool, int64_t tasks, Fn task) {
  if (tasks <= 1) {
    if (tasks == 1) task(int64_t{0});
    return ready();
  }
  ffi::CountDownPromise done(tasks);
  for (int64_t t = 0; t < tasks; ++t) {
    pool.Schedule([task, t, done]() mutable {
      task(t);
      done.CountDown();
    });
  }
  return ffi::Future(done);
}

// Runs fn(begin, end) over [0, total) in ranges of about equal `weight` (a prefix sum of the
// work of each unit, `cumulative[i]` the work before unit i, size total + 1; null: equal
// units), as many as task_count says `work` is worth.
template <typename Fn>
ffi::Future run_split(ffi::ThreadPool& pool, int64_t total, int64_t work,
                      const int64_t* cumulative, Fn fn) {
  const int64_t parts = std::min<int64_t>(task_count(pool, work), std::max<int64_t>(total, 1));
  auto cuts = std::make_shared<std::vector<int64_t>>(parts + 1, total);
  (*cuts)[0] = 0;
  for (int64_t p = 1; p < parts; ++p) {
    int64_t& cut = (*cuts)[p];
    if (cumulative == nullptr) {
      cut = total * p / parts;
    } else {  // the first unit whose prefix reaches p / parts of the work
      const int64_t target = cumulative[total] * p / parts;
      cut = std::lower_bound(cumulative, cumulative + total + 1, target) - cumulative;
      cut = std::clamp(cut, (*cuts)[p - 1], total);
    }
  }
  return run_tasks(pool, parts, [fn, cuts](int64_t p) {
    const int64_t begin = (*cuts)[p], end = (*cuts)[p + 1];
    if (begin < end) fn(begin, end);
  });
}

inline ffi::Error invalid(const std::string& what) {
  return ffi::Error::InvalidArgument("jaxembed kernel: " + what);
}

// A future that has already failed with `error`.
inline ffi::Future failed(ffi::Error error) {
  ffi::Promise promise;
  promise.SetError(std::move(error));
  return ffi::Future(promise);
}

}  // namespace jaxembed

#endif  // JAXEMBED_CSRC_COMMON_H_
