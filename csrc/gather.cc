// jaxembed_gather: a table's rows by id (jaxembed.embedding's forward), a row of `fill` for an
// id outside the table. Inputs: table (rows, dim) floats, or packed rows; ids (n,) int32/int64.
// Attributes: fill, format, dim. Output: (n, dim) in the table's type (a packed table's
// decoded rows in float32, bfloat16 or float16). Split over the ids on XLA's pool.

#include "bag_inputs.h"

namespace jaxembed {

static ffi::Future Gather(ffi::ThreadPool pool, ffi::AnyBuffer table, ffi::AnyBuffer ids,
                          ffi::Result<ffi::AnyBuffer> out, double fill, int32_t format,
                          int64_t dim) {
  BagArgs a{};
  if (auto e = table_and_ids(table, ids, format, dim, out->element_type(), &a); e.failure()) {
    return failed(e);
  }
  if (out->dimensions().size() != 2 || out->dimensions()[0] != a.n ||
      out->dimensions()[1] != a.dim) {
    return failed(invalid("the output must be (n, dim)"));
  }
  a.out = out->untyped_data();
  a.fill = fill;
  BagFn body = kernels().gather;
  return run_split(pool, a.n, a.n * a.dim, nullptr,
                   [a, body](int64_t begin, int64_t end) { body(a, begin, end); });
}

}  // namespace jaxembed

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxembed_gather, jaxembed::Gather,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::AnyBuffer>()
                                  .Attr<double>("fill")
                                  .Attr<int32_t>("format")
                                  .Attr<int64_t>("dim"));
