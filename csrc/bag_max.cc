// jaxembed_bag_max: max bags of a table's rows, and per bag and column the position of the
// first maximal entry (the entry the gradient goes to; -1 where a bag keeps nothing).
//
// Inputs as jaxembed_bag_sum's, without weights. Attributes: fill, format, dim. Outputs: (bags, dim) in the
// table's type, (bags, dim) int32.

#include "bag_inputs.h"

namespace jaxembed {

static ffi::Future BagMax(ffi::ThreadPool pool, ffi::AnyBuffer table, ffi::AnyBuffer ids,
                          ffi::Buffer<ffi::PRED> keep, ffi::Buffer<ffi::S32> starts,
                          ffi::Buffer<ffi::S32> ends, ffi::Result<ffi::AnyBuffer> out,
                          ffi::Result<ffi::Buffer<ffi::S32>> pos, double fill, int32_t format,
                          int64_t dim) {
  BagArgs a{};
  if (auto e = table_and_ids(table, ids, format, dim, out->element_type(), &a); e.failure()) {
    return failed(e);
  }
  int64_t kn = static_cast<int64_t>(keep.element_count());
  if (kn != a.n && kn != 0) return failed(invalid("keep must hold one flag per id"));
  a.keep = kn ? keep.typed_data() : nullptr;
  if (starts.element_count() != ends.element_count()) {
    return failed(invalid("starts and ends must be of one length"));
  }
  a.bags = static_cast<int64_t>(starts.element_count());
  a.starts = starts.typed_data();
  a.ends = ends.typed_data();
  if (out->dimensions().size() != 2 || out->dimensions()[0] != a.bags || out->dimensions()[1] != a.dim ||
      static_cast<int64_t>(pos->element_count()) != a.bags * a.dim) {
    return failed(invalid("the outputs must be (bags, dim)"));
  }
  a.out = out->untyped_data();
  a.pos = pos->typed_data();
  a.fill = fill;
  return run_bags(pool, a, kernels().bag_max);
}

}  // namespace jaxembed

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxembed_bag_max, jaxembed::BagMax,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::PRED>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Ret<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Attr<double>("fill")
                                  .Attr<int32_t>("format")
                                  .Attr<int64_t>("dim"));
