// jaxembed_bag_sum: sum or mean bags of a table's rows (jaxembed/core/_bag.py's forward).
//
// Inputs: table (rows, dim) floats, or packed rows (attributes format and dim); ids (n,) int32/int64; keep (n,) or (0,); weights (n,) or (0,) in
// float32 (float64 for a float64 table); starts, ends (bags,) int32. Attributes: mean, fill.
// Output: (bags, dim) in the table's type (a packed table's: float32, bfloat16 or float16). Split over bags, by entries, on XLA's pool.

#include "bag_inputs.h"

namespace jaxembed {

static ffi::Future BagSum(ffi::ThreadPool pool, ffi::AnyBuffer table, ffi::AnyBuffer ids,
                          ffi::Buffer<ffi::PRED> keep, ffi::AnyBuffer weights,
                          ffi::Buffer<ffi::S32> starts, ffi::Buffer<ffi::S32> ends,
                          ffi::Result<ffi::AnyBuffer> out, bool mean, double fill,
                          int32_t format, int64_t dim) {
  BagArgs a{};
  if (auto e = bag_inputs(table, ids, keep, weights, starts, ends, *out, format, dim, &a);
      e.failure()) {
    return failed(e);
  }
  a.mean = mean;
  a.fill = fill;
  return run_bags(pool, a, kernels().bag_sum);
}

}  // namespace jaxembed

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxembed_bag_sum, jaxembed::BagSum,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::PRED>>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Ret<xla::ffi::AnyBuffer>()
                                  .Attr<bool>("mean")
                                  .Attr<double>("fill")
                                  .Attr<int32_t>("format")
                                  .Attr<int64_t>("dim"));
