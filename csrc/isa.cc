// One instruction set's kernel bodies: compiled once per ISA with -DJAXEMBED_ISA=<name> and
// that ISA's flags (csrc/CMakeLists.txt), so each build has its own copy of kernels.h.

#include "kernels.h"
#include "update.h"

#define JAXEMBED_CONCAT2(a, b) a##b
#define JAXEMBED_CONCAT(a, b) JAXEMBED_CONCAT2(a, b)
#define JAXEMBED_STRING2(a) #a
#define JAXEMBED_STRING(a) JAXEMBED_STRING2(a)

namespace jaxembed {

const Kernels& JAXEMBED_CONCAT(kernels_, JAXEMBED_ISA)() {
  static const Kernels k{JAXEMBED_STRING(JAXEMBED_ISA), JAXEMBED_ISA::bag_sum,
                         JAXEMBED_ISA::bag_max, JAXEMBED_ISA::gather, JAXEMBED_ISA::update};
  return k;
}

}  // namespace jaxembed
