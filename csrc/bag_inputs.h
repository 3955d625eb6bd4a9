// The checks every bag and gather handler makes of its buffers, before any is read.

#ifndef JAXEMBED_CSRC_BAG_INPUTS_H_
#define JAXEMBED_CSRC_BAG_INPUTS_H_

#include <string>

#include "common.h"

namespace jaxembed {

inline std::string shape_of(ffi::AnyBuffer::Dimensions dims) {
  std::string s = "(";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + (dims.size() == 1 ? ",)" : ")");
}

// The bytes of one packed row of `dim` values in `format`, or -1 for a format that cannot
// hold `dim` values (jaxembed/quantized/_format.py's row_bytes).
inline int64_t packed_row_bytes(int32_t format, int64_t dim) {
  if (dim <= 0) return -1;
  switch (format) {
    case 8: return dim + 8;
    case 4: return dim % 2 ? -1 : dim / 2 + 4;
    case 2: return dim % 4 ? -1 : dim / 4 + 4;
    case kFormatE4M3:
    case kFormatE5M2: return dim + 4;
    default: return -1;
  }
}

// The table and its flat ids (n,): fills the table and id fields of `a`. A float table
// (format 0) is (rows, dim) and its rows come out in its own type; a packed one is (rows,
// row bytes) uint8 holding `dim` values a row, decoded into `out_type`.
inline ffi::Error table_and_ids(ffi::AnyBuffer table, ffi::AnyBuffer ids, int32_t format,
                                int64_t dim, ffi::DataType out_type, BagArgs* a) {
  if (table.dimensions().size() != 2) {
    return invalid("table must be 2-D, got " + shape_of(table.dimensions()));
  }
  a->format = format;
  a->table = table.untyped_data();
  a->rows = table.dimensions()[0];
  if (format == kFormatFloat) {
    if (!dtype_of(table.element_type(), &a->dtype)) {
      return invalid("table must be float32, bfloat16, float16 or float64");
    }
    if (out_type != table.element_type()) return invalid("the output must be in the table's type");
    a->dim = table.dimensions()[1];
    a->row_bytes = a->dim * static_cast<int64_t>(ffi::ByteWidth(table.element_type()));
  } else {
    int64_t width = packed_row_bytes(format, dim);
    if (width < 0) return invalid("unknown packed format, or a dim it does not pack");
    if (table.element_type() != ffi::DataType::U8 || table.dimensions()[1] != width) {
      return invalid("a packed table must be (rows, " + std::to_string(width) + ") uint8");
    }
    if (!dtype_of(out_type, &a->dtype) || a->dtype == Dtype::kF64) {
      return invalid("a packed table decodes to float32, bfloat16 or float16");
    }
    a->dim = dim;
    a->row_bytes = width;
  }
  if (ids.dimensions().size() != 1) return invalid("ids must be 1-D");
  if (ids.element_type() != ffi::DataType::S32 && ids.element_type() != ffi::DataType::S64) {
    return invalid("ids must be int32 or int64");
  }
  a->ids = ids.untyped_data();
  a->ids64 = ids.element_type() == ffi::DataType::S64;
  a->n = ids.dimensions()[0];
  if (a->n > int64_t{2147483647}) return invalid("more than 2^31 - 1 ids");
  return ffi::Error::Success();
}

// keep (n,) or (0,) for every entry kept; weights (n,) in the accumulator's type or (0,);
// starts and ends (bags,); the output (bags, dim) in the table's type.
inline ffi::Error bag_inputs(ffi::AnyBuffer table, ffi::AnyBuffer ids,
                             ffi::Buffer<ffi::PRED> keep, ffi::AnyBuffer weights,
                             ffi::Buffer<ffi::S32> starts, ffi::Buffer<ffi::S32> ends,
                             ffi::AnyBuffer out, int32_t format, int64_t dim, BagArgs* a) {
  if (auto e = table_and_ids(table, ids, format, dim, out.element_type(), a); e.failure()) {
    return e;
  }
  int64_t kn = static_cast<int64_t>(keep.element_count());
  if (kn != a->n && kn != 0) return invalid("keep must hold one flag per id");
  a->keep = kn ? keep.typed_data() : nullptr;
  int64_t wn = static_cast<int64_t>(weights.element_count());
  ffi::DataType acc = a->dtype == Dtype::kF64 ? ffi::DataType::F64 : ffi::DataType::F32;  // out's
  if (wn != 0 && (wn != a->n || weights.element_type() != acc)) {
    return invalid("weights must hold one value per id, in the accumulator's type");
  }
  a->weights = wn ? weights.untyped_data() : nullptr;
  if (starts.dimensions().size() != 1 || ends.dimensions().size() != 1 ||
      starts.element_count() != ends.element_count()) {
    return invalid("starts and ends must be 1-D and of one length");
  }
  a->bags = static_cast<int64_t>(starts.element_count());
  a->starts = starts.typed_data();
  a->ends = ends.typed_data();
  if (out.dimensions().size() != 2 || out.dimensions()[0] != a->bags ||
      out.dimensions()[1] != a->dim) {
    return invalid("the output must be (bags, dim)");
  }
  a->out = out.untyped_data();
  return ffi::Error::Success();
}

// Runs a bag body over the bags on the pool, split by entries (prefix sums of bag lengths).
inline ffi::Future run_bags(ffi::ThreadPool& pool, const BagArgs& a, BagFn body) {
  auto cumulative = std::make_shared<std::vector<int64_t>>(a.bags + 1, 0);
  int64_t* c = cumulative->data();
  for (int64_t b = 0; b < a.bags; ++b) {
    int64_t s = std::clamp<int64_t>(a.starts[b], 0, a.n);
    int64_t e = std::clamp<int64_t>(a.ends[b], s, a.n);
    c[b + 1] = c[b] + (e - s) + 1;  // every bag costs at least its output row
  }
  int64_t work = c[a.bags] * a.dim;
  BagArgs args = a;
  return run_split(pool, a.bags, work, c,
                   [args, body, cumulative](int64_t begin, int64_t end) { body(args, begin, end); });
}

}  // namespace jaxembed

#endif  // JAXEMBED_CSRC_BAG_INPUTS_H_
