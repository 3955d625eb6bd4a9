// jaxembed_sparse_update: a row-wise optimizer's step on the rows a sparse gradient touches,
// in place (jaxembed/sparse/_optimizers.py's sgd, adagrad, rowwise_adagrad and lazy_adam).
//
// Inputs: table (rows, dim); state0, state1 (the optimizer's row states, (0,) where it has
// none: adagrad's sum, rowwise_adagrad's (rows,) sum, lazy_adam's mu and nu); ids (n,)
// int32/int64; values (n, dim) in the table's type, or a pooled gradient: values (bags, dim),
// starts (bags,) (where each bag starts, never decreasing), factor (n,) (each entry's factor:
// kept, count scale, weight), pos (bags, dim) or (0,) (a max bag's positions), so that the
// (n, dim) spread never exists (starts, factor and pos are (0,) otherwise); row_rate (n,) or
// (0,): each entry's factor on the rate (its table's lr_scale); rate, a () scalar in the
// table's type. Attributes: optimizer, eps, b1, b2, weight_decay, maximize. Outputs: the table
// and the two states, aliased to the inputs (jax.ffi.ffi_call's input_output_aliases), so a
// donated step writes in place.
//
// Ids outside [0, rows) are dropped, as the reference's scatters drop them. The rows are split
// into ranges, one task of XLA's pool each: a task groups the entries of its rows by row with
// a stable LSD radix sort, so each row's duplicates are summed in their order, as the
// reference's coalesce sums them, and updates each of its distinct rows once.

#include <cstring>

#include "bag_inputs.h"

namespace jaxembed {

namespace {

// The kept entries whose rows lie in [lo, hi), grouped by row: `order` lists them by row (stable,
// so a row's entries stay in their order), `first[u]..first[u + 1]` is distinct row u's run.
// Each entry is sorted as one 64-bit key, its row (less lo) above its position, by an LSD radix
// sort with as few passes as digits of at most 12 bits allow (two up to 2^24 rows): each pass
// streams the keys, and 4,096 counts fit in L1.
template <typename Idx>
void group(const Idx* ids, int64_t n, int64_t lo, int64_t hi, std::vector<int32_t>* order,
           std::vector<int64_t>* first) {
  std::vector<uint64_t> keys, tmp;
  for (int64_t j = 0; j < n; ++j) {
    const uint64_t at = static_cast<uint64_t>(static_cast<int64_t>(ids[j]) - lo);
    if (at < static_cast<uint64_t>(hi - lo)) keys.push_back(at << 32 | static_cast<uint32_t>(j));
  }
  int bits = 0;
  while (bits < 63 && (int64_t{1} << bits) < hi - lo) ++bits;
  const int passes = (bits + 11) / 12, radix = passes ? (bits + passes - 1) / passes : 1;
  const uint64_t mask = (uint64_t{1} << radix) - 1;
  std::vector<int64_t> count(size_t{1} << radix);
  tmp.resize(keys.size());
  for (int shift = 32; shift < 32 + bits; shift += radix) {
    std::fill(count.begin(), count.end(), 0);
    for (uint64_t k : keys) ++count[(k >> shift) & mask];
    int64_t total = 0;
    for (auto& c : count) {
      const int64_t here = c;
      c = total;
      total += here;
    }
    for (uint64_t k : keys) tmp[count[(k >> shift) & mask]++] = k;
    keys.swap(tmp);
  }
  order->resize(keys.size());
  first->clear();
  for (size_t k = 0; k < keys.size(); ++k) {
    (*order)[k] = static_cast<int32_t>(keys[k]);
    if (k == 0 || keys[k] >> 32 != keys[k - 1] >> 32) first->push_back(static_cast<int64_t>(k));
  }
  first->push_back(static_cast<int64_t>(keys.size()));
}

bool same_shape(ffi::AnyBuffer a, ffi::AnyBuffer b) {
  auto x = a.dimensions(), y = b.dimensions();
  if (x.size() != y.size() || a.element_type() != b.element_type()) return false;
  for (size_t i = 0; i < x.size(); ++i) {
    if (x[i] != y[i]) return false;
  }
  return true;
}

// An output aliased to its input is the input's buffer; should XLA hand a separate one, the
// input is copied there first, so the update reads the state it was given.
void alias(ffi::AnyBuffer in, ffi::AnyBuffer out) {
  if (in.untyped_data() != out.untyped_data() && in.size_bytes()) {
    std::memcpy(out.untyped_data(), in.untyped_data(), in.size_bytes());
  }
}

}  // namespace

static ffi::Future SparseUpdate(ffi::ThreadPool pool, ffi::AnyBuffer table, ffi::AnyBuffer state0,
                                ffi::AnyBuffer state1, ffi::AnyBuffer ids, ffi::AnyBuffer values,
                                ffi::Buffer<ffi::S32> starts, ffi::AnyBuffer factor,
                                ffi::Buffer<ffi::S32> pos, ffi::AnyBuffer row_rate,
                                ffi::AnyBuffer rate,
                                ffi::Result<ffi::AnyBuffer> table_out,
                                ffi::Result<ffi::AnyBuffer> state0_out,
                                ffi::Result<ffi::AnyBuffer> state1_out, int32_t optimizer,
                                double eps, double b1, double b2, double weight_decay,
                                bool maximize) {
  UpdateArgs a{};
  BagArgs shape{};
  if (auto e = table_and_ids(table, ids, kFormatFloat, 0, table.element_type(), &shape);
      e.failure()) {
    return failed(e);
  }
  if (shape.dtype != Dtype::kF32 && shape.dtype != Dtype::kF64) {
    return failed(invalid("the sparse update takes float32 and float64 tables"));
  }
  if (optimizer < 0 || optimizer > 3) return failed(invalid("unknown optimizer"));
  a.optimizer = static_cast<Optimizer>(optimizer);
  a.dtype = shape.dtype;
  a.rows = shape.rows;
  a.dim = shape.dim;
  a.ids = shape.ids;
  a.ids64 = shape.ids64;
  a.n = shape.n;
  const bool pooled = factor.element_count() != 0;
  if (values.element_type() != table.element_type() || values.dimensions().size() != 2 ||
      (!pooled && values.dimensions()[0] != a.n) || values.dimensions()[1] != a.dim) {
    return failed(invalid("values must be (n, dim), or with factor (bags, dim), in the table's type"));
  }
  // a pooled gradient: each entry's bag, counted from the bags' starts as the reference's
  // _bag_ids counts it (the number of starts at or before the entry, less one)
  auto bag = std::make_shared<std::vector<int32_t>>();
  if (pooled) {
    a.bags = values.dimensions()[0];
    if (static_cast<int64_t>(starts.element_count()) != a.bags ||
        static_cast<int64_t>(factor.element_count()) != a.n ||
        factor.element_type() != table.element_type()) {
      return failed(invalid("starts must hold one start per bag, factor one per id in the "
                            "table's type"));
    }
    const int64_t pn = static_cast<int64_t>(pos.element_count());
    if (pn != 0 && pn != a.bags * a.dim) return failed(invalid("pos must be (bags, dim) or empty"));
    bag->assign(a.n + 1, 0);
    int32_t* marks = bag->data();
    for (int64_t b = 0; b < a.bags; ++b) {
      const int64_t s = starts.typed_data()[b];
      if (s >= 0 && s <= a.n) ++marks[s];  // a start past every entry marks none
    }
    int32_t running = -1;
    for (int64_t e = 0; e < a.n; ++e) marks[e] = running += marks[e];
    a.bag = marks;
    a.factor = factor.untyped_data();
    a.pos = pn ? pos.typed_data() : nullptr;
  } else if (starts.element_count() != 0 || pos.element_count() != 0) {
    return failed(invalid("starts and pos go with factor"));
  }
  // the states each optimizer keeps
  const int64_t full = a.rows * a.dim;
  int64_t want0 = 0, want1 = 0;
  if (a.optimizer == Optimizer::kAdagrad || a.optimizer == Optimizer::kLazyAdam) want0 = full;
  if (a.optimizer == Optimizer::kRowwiseAdagrad) want0 = a.rows;
  if (a.optimizer == Optimizer::kLazyAdam) want1 = full;
  if (static_cast<int64_t>(state0.element_count()) != want0 ||
      static_cast<int64_t>(state1.element_count()) != want1 ||
      (want0 && state0.element_type() != table.element_type()) ||
      (want1 && state1.element_type() != table.element_type())) {
    return failed(invalid("the optimizer's states do not match the table"));
  }
  if (!same_shape(table, *table_out) || !same_shape(state0, *state0_out) ||
      !same_shape(state1, *state1_out)) {
    return failed(invalid("the outputs must be laid out as the table and states"));
  }
  if (a.n > int64_t{2147483647}) return failed(invalid("more than 2^31 - 1 ids"));
  alias(table, *table_out);
  alias(state0, *state0_out);
  alias(state1, *state1_out);
  a.table = table_out->untyped_data();
  a.state0 = state0_out->untyped_data();
  a.state1 = state1_out->untyped_data();
  a.values = values.untyped_data();
  a.row_rate = row_rate.element_count() ? row_rate.untyped_data() : nullptr;
  a.rate = a.dtype == Dtype::kF64 ? *static_cast<const double*>(rate.untyped_data())
                                  : *static_cast<const float*>(rate.untyped_data());
  a.eps = eps;
  a.b1 = b1;
  a.b2 = b2;
  a.weight_decay = weight_decay;
  a.maximize = maximize;

  // The rows are split into ranges, a task each: a task picks the entries of its rows out of
  // all of them (a read of the ids, small beside its share of the values), groups them, and
  // updates its rows. No two tasks touch one row, none waits for another.
  const int64_t tasks =
      std::min<int64_t>(task_count(pool, a.n * a.dim), std::max<int64_t>(a.n / 8192, 1));
  UpdateFn body = kernels().update;
  return run_tasks(pool, tasks, [a, body, bag, tasks](int64_t t) {
    UpdateArgs mine = a;
    const int64_t lo = a.rows * t / tasks, hi = a.rows * (t + 1) / tasks;
    std::vector<int32_t> order;
    std::vector<int64_t> first;
    if (a.ids64) {
      group(static_cast<const int64_t*>(a.ids), a.n, lo, hi, &order, &first);
    } else {
      group(static_cast<const int32_t*>(a.ids), a.n, lo, hi, &order, &first);
    }
    mine.order = order.data();
    mine.first = first.data();
    mine.unique = static_cast<int64_t>(first.size()) - 1;
    body(mine, 0, mine.unique);
  });
}

}  // namespace jaxembed

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxembed_sparse_update, jaxembed::SparseUpdate,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::AnyBuffer>()   // table
                                  .Arg<xla::ffi::AnyBuffer>()   // state0
                                  .Arg<xla::ffi::AnyBuffer>()   // state1
                                  .Arg<xla::ffi::AnyBuffer>()   // ids
                                  .Arg<xla::ffi::AnyBuffer>()   // values
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()  // starts
                                  .Arg<xla::ffi::AnyBuffer>()   // factor
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()  // pos
                                  .Arg<xla::ffi::AnyBuffer>()   // row_rate
                                  .Arg<xla::ffi::AnyBuffer>()   // rate
                                  .Ret<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::AnyBuffer>()
                                  .Attr<int32_t>("optimizer")
                                  .Attr<double>("eps")
                                  .Attr<double>("b1")
                                  .Attr<double>("b2")
                                  .Attr<double>("weight_decay")
                                  .Attr<bool>("maximize"));
