// jaxembed_bucket: a device's entries bucketed by the device that owns their rows, at a static
// capacity (jaxembed.sharding._route, step 1: XLA's CPU sort and binary search of the same cost
// ~15x more here). Inputs: owner, local (n,) int32, each entry's owner in [0, devices) and row
// in the owner's block, in [0, rows); send (n,) bool, the entries to route. Attributes: devices,
// rows, capacity. Outputs:
//   slot (n,) int32: the entry's slot, owner * capacity + rank, where rank numbers the owner's
//     distinct rows in ascending order; devices * capacity (past the end) for an entry not sent
//     or past its owner's capacity (the owner's highest rows overflow);
//   keys (devices * capacity,) int32: the row each slot holds, `rows` in an empty slot;
//   counts (devices * capacity,) int32: how many entries each slot stands for;
//   per_owner (devices,) int32: each owner's distinct rows (served or not);
//   order (n,) int32: the served entries by slot (a slot's entries in their input order), then
//     the others in input order: a stable sort of the entries by slot.
// One thread (a device's own work; the devices of a mesh run side by side): a stable counting
// sort of the keys owner * rows + local (sort.h), then one pass. A sent entry outside
// [0, devices) x [0, rows) is refused before anything is written.

#include "common.h"
#include "sort.h"

namespace jaxembed {
namespace {

ffi::Error Bucket(ffi::Buffer<ffi::S32> owner, ffi::Buffer<ffi::S32> local,
                  ffi::Buffer<ffi::PRED> send, int64_t devices, int64_t rows, int64_t capacity,
                  ffi::Result<ffi::Buffer<ffi::S32>> slot_out,
                  ffi::Result<ffi::Buffer<ffi::S32>> keys_out,
                  ffi::Result<ffi::Buffer<ffi::S32>> counts_out,
                  ffi::Result<ffi::Buffer<ffi::S32>> per_owner_out,
                  ffi::Result<ffi::Buffer<ffi::S32>> order_out) {
  const int64_t n = static_cast<int64_t>(owner.element_count());
  if (devices < 1 || rows < 1 || capacity < 0) {
    return invalid("devices and rows must be positive, capacity not negative");
  }
  if (devices * rows > INT32_MAX || devices * capacity > INT32_MAX) {
    return invalid("devices * rows and devices * capacity must fit in int32");
  }
  const int64_t size = devices * capacity;
  if (static_cast<int64_t>(local.element_count()) != n ||
      static_cast<int64_t>(send.element_count()) != n ||
      static_cast<int64_t>(slot_out->element_count()) != n ||
      static_cast<int64_t>(order_out->element_count()) != n) {
    return invalid("owner, local, send, slot and order must have n entries each");
  }
  if (static_cast<int64_t>(keys_out->element_count()) != size ||
      static_cast<int64_t>(counts_out->element_count()) != size) {
    return invalid("keys and counts must have devices * capacity entries each");
  }
  if (static_cast<int64_t>(per_owner_out->element_count()) != devices) {
    return invalid("per_owner must have devices entries");
  }
  if (n > INT32_MAX) return invalid("at most 2^31 - 1 entries");
  const int32_t* o = owner.typed_data();
  const int32_t* l = local.typed_data();
  const bool* s = send.typed_data();
  Ordered sorted;
  sorted.key.reserve(n);
  sorted.at.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    if (!s[i]) continue;
    if (o[i] < 0 || o[i] >= devices || l[i] < 0 || l[i] >= rows) {
      return invalid("a sent entry's owner or row is outside [0, devices) x [0, rows)");
    }
    sorted.key.push_back(static_cast<uint64_t>(o[i]) * rows + l[i]);
    sorted.at.push_back(static_cast<int32_t>(i));
  }
  sort_ordered(&sorted);

  int32_t* slot = slot_out->typed_data();
  int32_t* keys = keys_out->typed_data();
  int32_t* counts = counts_out->typed_data();
  int32_t* per_owner = per_owner_out->typed_data();
  int32_t* order = order_out->typed_data();
  const int32_t past = static_cast<int32_t>(size);
  std::fill(slot, slot + n, past);
  std::fill(keys, keys + size, static_cast<int32_t>(rows));
  std::fill(counts, counts + size, 0);
  std::fill(per_owner, per_owner + devices, 0);
  const int64_t m = static_cast<int64_t>(sorted.key.size());
  int32_t here = past;  // the slot of the current distinct key
  int64_t served = 0;
  for (int64_t i = 0; i < m; ++i) {
    const uint64_t k = sorted.key[i];
    if (i == 0 || k != sorted.key[i - 1]) {
      const int64_t who = static_cast<int64_t>(k / rows);
      const int64_t rank = per_owner[who]++;
      here = past;
      if (rank < capacity) {
        here = static_cast<int32_t>(who * capacity + rank);
        keys[here] = static_cast<int32_t>(k % rows);
      }
    }
    if (here != past) {
      ++counts[here];
      slot[sorted.at[i]] = here;
      order[served++] = sorted.at[i];
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    if (slot[i] == past) order[served++] = static_cast<int32_t>(i);
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jaxembed

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxembed_bucket, jaxembed::Bucket,
                              xla::ffi::Ffi::Bind()
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::PRED>>()
                                  .Attr<int64_t>("devices")
                                  .Attr<int64_t>("rows")
                                  .Attr<int64_t>("capacity")
                                  .Ret<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::S32>>());
