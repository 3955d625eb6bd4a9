// The kernels this CPU runs: AVX-512 where it has AVX-512F/BW/VL, else AVX2 with FMA and F16C,
// else the generic build (every other x86-64 CPU, aarch64 and the rest). JAXEMBED_KERNEL_ISA
// (generic, avx2 or avx512) picks a lower one, so the tests can run each build on one machine.

#include <cstdlib>
#include <cstring>

#include "common.h"

namespace jaxembed {

const Kernels& kernels_generic();
#if defined(JAXEMBED_X86_ISAS)
const Kernels& kernels_avx2();
const Kernels& kernels_avx512();
#endif

namespace {

const Kernels& choose() {
  const char* want = std::getenv("JAXEMBED_KERNEL_ISA");
  auto allowed = [want](const char* isa) {
    if (want == nullptr || *want == '\0') return true;
    if (std::strcmp(want, "generic") == 0) return false;
    if (std::strcmp(want, "avx2") == 0) return std::strcmp(isa, "avx2") == 0;
    return true;
  };
#if defined(JAXEMBED_X86_ISAS)
  __builtin_cpu_init();
  if (allowed("avx512") && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    return kernels_avx512();
  }
  if (allowed("avx2") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c")) {
    return kernels_avx2();
  }
#endif
  (void)allowed;
  return kernels_generic();
}

}  // namespace

const Kernels& kernels() {
  static const Kernels& k = choose();
  return k;
}

}  // namespace jaxembed
